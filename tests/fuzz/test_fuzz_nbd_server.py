"""Hostile byte streams into the NBD server's protocol (protocol/_nbd.py), sans I/O.

Random bytes, and valid client streams (handshake, then requests) with
bytes flipped, cut, inserted or repeated, fed in random chunks: the
connection only ever raises :class:`~dmuserd.protocol.NbdProtocolError`
(and then hands out nothing more), every event is one of its typed events,
a request it hands out lies within the export and the payload limit, and
what it keeps buffered never exceeds what a single message may hold.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from dmuserd.protocol import (
    NBD_MAX_PAYLOAD,
    NBD_NEED_DATA,
    NbdDisconnect,
    NbdNegotiated,
    NbdProtocolError,
    NbdRefused,
    NbdRequest,
    NbdServerConnection,
    TransmissionFlag,
)
from fuzz_lib import storm_settings

SIZE = 1 << 20
IHAVEOPT = 0x49484156454F5054
FLAGS = (TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM
         | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_CACHE)
#: The most a connection may buffer: an option's data or a WRITE's payload, plus the chunk just fed.
MAX_CHUNK = 4096


def option(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def request(command: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, command, cookie, offset, length)


@st.composite
def valid_streams(draw) -> bytes:
    stream = struct.pack(">I", draw(st.sampled_from([0, 1, 2, 3])))
    for code in draw(st.lists(st.sampled_from([3, 6, 8, 5, 9, 10, 11, 99]), max_size=3)):
        data = struct.pack(">IH", 0, 0) if code == 6 else b""
        stream += option(code, data)
    stream += option(1, b"") if draw(st.booleans()) else option(7, struct.pack(">IHH", 0, 1, 3))
    for cookie in range(draw(st.integers(0, 12))):
        command = draw(st.sampled_from([0, 1, 3, 4, 5, 6, 2, 7, 200]))
        offset = draw(st.one_of(st.integers(0, SIZE // 512).map(lambda s: s * 512), st.integers(0, 2**64 - 1)))
        length = draw(st.one_of(st.integers(0, 64).map(lambda s: s * 512), st.integers(0, 2**32 - 1)))
        flags = draw(st.sampled_from([0, 1, 2, 3, 4, 0xFFFF]))
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
                    assert event.offset + event.length <= SIZE and event.length <= NBD_MAX_PAYLOAD
                    assert event.offset % 512 == 0 and event.length % 512 == 0
                    if event.payload is not None:
                        assert len(event.payload) == event.length
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
