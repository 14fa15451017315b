"""Slotted channels (the NBD plugin's shared-memory data plane), sans I/O.

A :class:`DaemonConnection` given a :class:`SlotPool` reads a slot word
after each header: data of a READ or WRITE naming a slot moves through the
pool, never the stream; a slot index, a length or a type the pool cannot
take is a :class:`ProtocolError` naming the field; a slot belongs to one
request at a time across every connection sharing the pool.
"""

from __future__ import annotations

import struct

import pytest
from dmuserd.protocol import (
    ANNOUNCEMENT_SIZE,
    NEED_DATA,
    NO_SLOT,
    DaemonConnection,
    PoolLayout,
    ProtocolError,
    RequestType,
    Response,
    ResponseType,
    SlotPool,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_testlib import pack, pattern, unpack

SLOT = 4096
SLOTS = 4
WORD = struct.Struct("<Q")  # the slot word, packed independently of the library


def frame(seq, type_, sector=0, length=0, slot=NO_SLOT, flags=0) -> bytes:
    return pack(seq, type_, flags, sector, length) + WORD.pack(slot)


@pytest.fixture
def memory():
    return bytearray(SLOTS * SLOT)


@pytest.fixture
def pool(memory):
    return SlotPool(memory, PoolLayout(SLOTS, SLOT))


def one(conn: DaemonConnection, data: bytes):
    conn.receive_data(data)
    event = conn.next_event()
    assert event is not NEED_DATA
    return event


def test_a_write_in_a_slot_is_complete_with_its_frame(memory, pool):
    conn = DaemonConnection(pool=pool)
    memory[2 * SLOT:3 * SLOT] = pattern(SLOT, 3)
    request = one(conn, frame(7, RequestType.WRITE, 16, 1024, slot=2))
    assert request.type is RequestType.WRITE and request.offset == 16 * 512
    assert bytes(request.payload) == pattern(SLOT, 3)[:1024]
    assert pool.busy == 1
    buffers = conn.send_response(Response(7))
    assert len(buffers) == 1 and unpack(buffers[0])[:2] == (7, 0)
    assert pool.busy == 0


@pytest.mark.parametrize("answer", [
    lambda data: data,
    lambda data: [memoryview(data)[:1000], data[1000:3000], bytearray(data[3000:])],
    lambda data: memoryview(bytearray(data)),
], ids=["bytes", "pieces", "memoryview"])
def test_a_read_into_a_slot_answers_with_the_header_alone(memory, pool, answer):
    conn = DaemonConnection(pool=pool)
    request = one(conn, frame(9, RequestType.READ, 0, SLOT, slot=1))
    assert request.payload is None
    data = pattern(SLOT, 9)
    buffers = conn.send_response(Response(9, ResponseType.SUCCESS, answer(data)))
    assert len(buffers) == 1 and unpack(buffers[0]) == (9, 0, 0, 0, SLOT)
    assert bytes(memory[SLOT:2 * SLOT]) == data
    assert pool.busy == 0


def test_a_failed_read_leaves_the_slot_alone_and_frees_it(memory, pool):
    conn = DaemonConnection(pool=pool)
    one(conn, frame(1, RequestType.READ, 0, 512, slot=0))
    assert len(conn.send_response(Response(1, ResponseType.ERROR))) == 1
    assert memory == bytearray(SLOTS * SLOT) and pool.busy == 0


def test_no_slot_means_the_plain_message(pool):
    conn = DaemonConnection(pool=pool)
    write = one(conn, frame(1, RequestType.WRITE, 0, 512) + b"\x5a" * 512)
    assert write.payload == b"\x5a" * 512
    conn.send_response(Response(1))
    one(conn, frame(2, RequestType.READ, 0, 512))
    buffers = conn.send_response(Response(2, ResponseType.SUCCESS, b"\x11" * 512))
    assert buffers[1] == b"\x11" * 512
    flush = one(conn, frame(3, RequestType.FLUSH))
    assert flush.type is RequestType.FLUSH and pool.busy == 0


@given(cuts=st.lists(st.integers(0, 200), max_size=6))
@settings(max_examples=50)
def test_framing_holds_under_any_chunking(cuts):
    memory = bytearray(SLOTS * SLOT)
    memory[:SLOT] = pattern(SLOT, 1)
    conn = DaemonConnection(pool=SlotPool(memory, PoolLayout(SLOTS, SLOT)))
    stream = (frame(1, RequestType.WRITE, 0, 512, slot=0) + frame(2, RequestType.WRITE, 8, 512) + b"\x22" * 512
              + frame(3, RequestType.READ, 0, 1024, slot=3) + frame(4, RequestType.DISCARD, 0, 512))
    points = sorted({c % (len(stream) + 1) for c in cuts})
    events = []
    for a, b in zip([0, *points], [*points, len(stream)]):
        conn.receive_data(stream[a:b])
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert bytes(events[0].payload) == pattern(SLOT, 1)[:512] and events[1].payload == b"\x22" * 512
    assert events[2].payload is None and events[3].type is RequestType.DISCARD


@pytest.mark.parametrize(("message", "field"), [
    (frame(1, RequestType.READ, 0, 512, slot=SLOTS), "slot"),
    (frame(1, RequestType.WRITE, 0, 512, slot=2**63), "slot"),
    (frame(1, RequestType.READ, 0, SLOT + 512, slot=0), "len"),
    (frame(1, RequestType.WRITE, 0, 64 << 20, slot=0), "len"),  # over max_io as well
    (frame(1, RequestType.FLUSH, 0, 0, slot=0), "slot"),
    (frame(1, RequestType.DISCARD, 0, 512, slot=1), "slot"),
    (frame(1, 99, 0, 512, slot=1), "type"),
], ids=["index-past-the-end", "index-huge", "longer-than-a-slot", "oversized", "flush", "discard",
        "unknown-type"])
def test_a_bad_slot_is_a_typed_refusal(pool, message, field):
    conn = DaemonConnection(pool=pool)
    conn.receive_data(message)
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert info.value.field == field
    assert pool.busy == 0


def test_a_slot_belongs_to_one_request_across_connections(pool):
    first, second = DaemonConnection(pool=pool), DaemonConnection(pool=pool)
    one(first, frame(1, RequestType.READ, 0, 512, slot=2))
    second.receive_data(frame(1, RequestType.WRITE, 0, 512, slot=2))
    with pytest.raises(ProtocolError) as info:
        second.next_event()
    assert info.value.field == "slot" and "held" in str(info.value)
    first.send_response(Response(1, ResponseType.SUCCESS, bytes(512)))
    third = DaemonConnection(pool=pool)
    assert one(third, frame(5, RequestType.WRITE, 0, 512, slot=2)).seq == 5


def test_closing_a_connection_frees_its_unanswered_slots(pool):
    conn = DaemonConnection(pool=pool)
    one(conn, frame(1, RequestType.READ, 0, 512, slot=0))
    one(conn, frame(2, RequestType.WRITE, 0, 512, slot=1))
    assert pool.busy == 2
    conn.close()
    assert pool.busy == 0


def test_the_pool_announcement_round_trips_and_refuses_strangers():
    layout = PoolLayout(64, 1 << 20)
    data = layout.encode()
    assert len(data) == ANNOUNCEMENT_SIZE == 32 and data[:8] == b"dmuserdP"
    assert PoolLayout.decode(data) == layout and layout.size == 64 << 20
    for bad in (data[:31], b"x" * 32, data[:8] + struct.pack("<Q", 2) + data[16:],
                data[:16] + struct.pack("<QQ", 0, 4096), data[:16] + struct.pack("<QQ", 4, 1000)):
        with pytest.raises(ProtocolError) as info:
            PoolLayout.decode(bad)
        assert info.value.field == "pool"


def test_a_pool_needs_enough_writable_memory():
    with pytest.raises(ValueError):
        SlotPool(bytearray(SLOT), PoolLayout(2, SLOT))
    with pytest.raises(ValueError):
        SlotPool(bytes(2 * SLOT), PoolLayout(2, SLOT))
    with pytest.raises(ValueError):
        DaemonConnection(max_io=1024, pool=SlotPool(bytearray(2 * SLOT), PoolLayout(2, SLOT)))
