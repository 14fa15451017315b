"""Hostile byte streams into the NBD server's protocol (protocol/_nbd.py), sans I/O.

Random bytes, and valid client streams (handshake, then requests) with
bytes flipped, cut, inserted or repeated, fed in random chunks: the
connection only ever raises :class:`~dmuserd.protocol.NbdProtocolError`
(and then hands out nothing more), every event is one of its typed events,
a request it hands out lies within the export and the payload limit, and
what it keeps buffered never exceeds what a single message may hold. The
streams negotiate structured replies and meta contexts (well formed or
not): a flag it lets through was advertised (DF only with structured
replies, FAST_ZERO only where SEND_FAST_ZERO is), a BLOCK_STATUS only once
``base:allocation`` was selected, every refusal's reply has the form
negotiated. A META_CONTEXT option with any payload fails that option alone
(option replies that parse, ending in ACK or an error), and a BLOCK_STATUS
reply built from any extents a backend returns stays within the query.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from dmuserd.protocol import (
    NBD_MAX_PAYLOAD,
    NBD_NEED_DATA,
    NbdCommand,
    NbdDisconnect,
    NbdNegotiated,
    NbdProtocolError,
    NbdRefused,
    NbdRequest,
    NbdServerConnection,
    TransmissionFlag,
    nbd_block_status_chunk,
)
from fuzz_lib import storm_settings

SIZE = 1 << 20
IHAVEOPT = 0x49484156454F5054
FLAGS = (TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM
         | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_CACHE | TransmissionFlag.SEND_FAST_ZERO)
QUERIES = (b"base:allocation", b"base:", b"base:other", b"qemu:dirty-bitmap:x", b"", b"nocolon", b"\xff\xfe")
#: The most a connection may buffer: an option's data or a WRITE's payload, plus the chunk just fed.
MAX_CHUNK = 4096


def option(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def request(command: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, command, cookie, offset, length)


def meta_data(name: bytes, queries: list[bytes]) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


@st.composite
def valid_streams(draw) -> bytes:
    stream = struct.pack(">I", draw(st.sampled_from([0, 1, 2, 3])))
    for code in draw(st.lists(st.sampled_from([3, 6, 8, 8, 5, 9, 10, 10, 11, 99]), max_size=4)):
        data = struct.pack(">IH", 0, 0) if code == 6 else b""
        if code in (9, 10):
            data = meta_data(draw(st.sampled_from([b"", b"disk"])), draw(st.lists(st.sampled_from(QUERIES), max_size=3)))
        stream += option(code, data)
    stream += option(1, b"") if draw(st.booleans()) else option(7, struct.pack(">IHH", 0, 1, 3))
    for cookie in range(draw(st.integers(0, 12))):
        command = draw(st.sampled_from([0, 1, 3, 4, 5, 6, 2, 7, 7, 200]))
        offset = draw(st.one_of(st.integers(0, SIZE // 512).map(lambda s: s * 512), st.integers(0, 2**64 - 1)))
        length = draw(st.one_of(st.integers(0, 64).map(lambda s: s * 512), st.integers(0, 2**32 - 1)))
        flags = draw(st.sampled_from([0, 1, 2, 3, 4, 8, 0x10, 0x12, 0xFFFF]))
        stream += request(command, cookie, offset, length, flags)
        if command == 1:
            stream += b"\xab" * min(length, 64 * 512)
    return stream


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(valid_streams()))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 64))]
    return bytes(data)


def feed(stream: bytes, chunk: int) -> None:
    conn = NbdServerConnection(SIZE, FLAGS)
    conn.data_to_send()
    for i in range(0, len(stream), chunk):
        conn.receive_data(stream[i:i + chunk])
        try:
            while (event := conn.next_event()) is not NBD_NEED_DATA:
                conn.data_to_send()
                assert type(event) in (NbdRequest, NbdRefused, NbdNegotiated, NbdDisconnect), event
                if type(event) is NbdRequest:
                    assert event.offset + event.length <= SIZE
                    assert event.length <= NBD_MAX_PAYLOAD or event.command is NbdCommand.BLOCK_STATUS
                    assert event.offset % 512 == 0 and event.length % 512 == 0
                    if event.payload is not None:
                        assert len(event.payload) == event.length
                    if event.flags & 4:  # DF
                        assert event.command is NbdCommand.READ and conn.structured
                    if event.flags & 0x10:  # FAST_ZERO
                        assert event.command is NbdCommand.WRITE_ZEROES
                    if event.command is NbdCommand.BLOCK_STATUS:
                        assert conn.allocation_context is not None and conn.structured
                elif type(event) is NbdRefused:
                    reply = conn.error_reply(event.cookie, event.error, event.reason)
                    if conn.structured:  # an ERROR chunk carrying the reason
                        assert struct.unpack_from(">IHHQ", reply) == (0x668E33EF, 1, 0x8001, event.cookie)
                        assert struct.unpack_from(">IIH", reply, 16) == (len(reply) - 20, event.error, len(reply) - 26)
                    else:
                        assert len(reply) == 16
        except NbdProtocolError as exc:
            assert exc.field and exc.position >= 0
            assert conn.next_event() is NBD_NEED_DATA  # nothing after the framing is lost
            return
        assert conn.buffered <= max(64 * 1024, NBD_MAX_PAYLOAD) + 16 + chunk


@storm_settings(ci=200, fuzz=5000)
@given(st.binary(max_size=2048), st.integers(1, MAX_CHUNK))
def test_random_bytes(stream, chunk):
    feed(stream, chunk)


@storm_settings(ci=200, fuzz=5000)
@given(st.binary(max_size=512), st.integers(1, MAX_CHUNK))
def test_random_bytes_in_transmission(tail, chunk):
    feed(struct.pack(">I", 3) + option(1) + tail, chunk)


@storm_settings(ci=300, fuzz=10000)
@given(mutated(), st.integers(1, MAX_CHUNK))
def test_mutated_valid_streams(stream, chunk):
    feed(stream, chunk)


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, data) of each option reply, checking each one's framing."""
    replies = []
    while data:
        magic, code, kind, length = struct.unpack_from(">QIII", data)
        assert magic == 0x3E889045565A9 and len(data) >= 20 + length
        replies.append((code, kind, data[20:20 + length]))
        data = data[20 + length:]
    return replies


@st.composite
def meta_payloads(draw) -> bytes:
    """A META_CONTEXT payload: random bytes, or a well-formed one with lengths, counts or bytes changed."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=256))
    data = bytearray(meta_data(draw(st.binary(max_size=8)), draw(st.lists(st.sampled_from(QUERIES), max_size=4))))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "cut", "length"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:]
            if not data:
                break
        else:
            data[at:at + 4] = struct.pack(">I", draw(st.sampled_from([0, 1, 4095, 4096, 4097, 2**31, 2**32 - 1])))
    return bytes(data)


@storm_settings(ci=300, fuzz=10000)
@given(st.sampled_from([9, 10]), meta_payloads(), st.booleans())
def test_meta_context_payloads_fail_that_option_alone(code, payload, structured):
    conn = NbdServerConnection(SIZE, FLAGS)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3) + (option(8) if structured else b"") + option(code, payload)
                      + option(7, struct.pack(">IH", 0, 0)))
    events = []
    while (event := conn.next_event()) is not NBD_NEED_DATA:
        events.append(event)
    assert events == [NbdNegotiated("", True)]
    replies = [r for r in option_replies(conn.data_to_send()) if r[0] == code]
    assert replies and (replies[-1][1] == 1 or replies[-1][1] >> 31)  # ACK, or one error ending the option
    if replies[-1][1] >> 31:
        assert len(replies) == 1 and replies[0][2]  # an error alone, saying what is wrong
    else:
        assert all(kind == 4 for _, kind, _ in replies[:-1])
    if conn.allocation_context is not None:
        assert code == 10 and structured and len(replies) == 2


@storm_settings(ci=200, fuzz=5000)
@given(st.lists(st.tuples(st.integers(0, 2**33), st.sampled_from([0, 1, 2, 3])), max_size=20),
       st.integers(1, 2**32 - 1), st.booleans())
def test_block_status_reply_from_any_extents(extents, length, req_one):
    try:
        chunk = nbd_block_status_chunk(5, 1, extents, length, req_one)
    except ValueError:
        assert not any(size > 0 for size, _ in extents)
        return
    magic, flags, kind, cookie, size, context = struct.unpack_from(">IHHQII", chunk)
    assert (magic, flags, kind, cookie, context) == (0x668E33EF, 1, 5, 5, 1) and size == len(chunk) - 20
    descriptors = list(struct.iter_unpack(">II", chunk[24:]))
    assert descriptors and all(n > 0 for n, _ in descriptors)
    assert sum(n for n, _ in descriptors) <= length
    assert not req_one or len(descriptors) == 1
