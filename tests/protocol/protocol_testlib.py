"""Helpers shared by the protocol tests (imported by name: no package here).

They are deliberately small and independent of the code under test where
that matters: headers are packed/unpacked here with :mod:`struct` from the
spec's offsets, not with :class:`dmuserd.protocol.Header`.
"""

from __future__ import annotations

import struct

from dmuserd.protocol import WOULD_BLOCK, Channel, DaemonConnection, NEED_DATA

#: The spec's layout: seq @0, type @8, flags @16, sector @24, len @32, LE u64.
SPEC_HEADER = struct.Struct("<QQQQQ")


def pack(seq: int, type_: int, flags: int = 0, sector: int = 0, length: int = 0) -> bytes:
    """A 40-byte header, packed independently of the library."""
    return SPEC_HEADER.pack(seq, type_, flags, sector, length)


def unpack(data: bytes) -> tuple[int, int, int, int, int]:
    return SPEC_HEADER.unpack(bytes(data[:40]))


def pattern(length: int, salt: int = 0) -> bytes:
    """Deterministic, position-dependent bytes (so misplaced data shows)."""
    return bytes((i * 7 + salt * 31 + (i >> 8)) & 0xFF for i in range(length))


def read_message(channel: Channel, size: int = 1 << 20) -> bytes:
    """Read one whole message (header, then any WRITE payload) from a channel."""
    out = bytearray()
    head = channel.read(size)
    assert head is not WOULD_BLOCK, "nothing queued"
    out += head
    while len(out) < 40:
        out += channel.read(size)
    _, type_, _, _, length = unpack(out)
    if type_ == 1:  # WRITE
        while len(out) < 40 + length:
            out += channel.read(size)
    return bytes(out)


def read_into(channel: Channel, conn: DaemonConnection, sizes) -> list:
    """Read from ``channel`` with read sizes from ``sizes`` (an iterator of
    ints) until it would block, feeding ``conn``; return the requests."""
    requests = []
    while True:
        data = channel.read(next(sizes))
        if data is WOULD_BLOCK:
            return requests
        conn.receive_data(data)
        while (event := conn.next_event()) is not NEED_DATA:
            requests.append(event)

