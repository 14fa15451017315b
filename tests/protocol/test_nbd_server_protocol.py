"""NbdServerConnection: the handshake's answers byte for byte, requests under any
chunking, refusals that fail one request, typed errors where the framing is lost."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmuserd.protocol import (
    NBD_MAX_PAYLOAD,
    NBD_NEED_DATA,
    NbdCommand,
    NbdDisconnect,
    NbdErrno,
    NbdNegotiated,
    NbdProtocolError,
    NbdRefused,
    NbdRequest,
    NbdServerConnection,
    TransmissionFlag,
    nbd_simple_reply,
)

SIZE = 1 << 20
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
ALL = (TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM
       | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.CAN_MULTI_CONN | TransmissionFlag.SEND_CACHE)


def option(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go_data(name: bytes = b"", infos: tuple[int, ...] = ()) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def request(command: int, cookie: int = 1, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, command, cookie, offset, length)


def events(conn: NbdServerConnection) -> list:
    out = []
    while (event := conn.next_event()) is not NBD_NEED_DATA:
        out.append(event)
    return out


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, data) of each option reply in ``data``."""
    replies = []
    while data:
        magic, opt, kind, length = struct.unpack_from(">QIII", data)
        assert magic == REPLY_MAGIC
        replies.append((opt, kind, data[20:20 + length]))
        data = data[20 + length:]
    return replies


def in_transmission(flags=ALL, block_size: int = 512, size: int = SIZE) -> NbdServerConnection:
    conn = NbdServerConnection(size, flags, block_size=block_size)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3) + option(1))
    assert events(conn) == [NbdNegotiated("", True)]
    conn.data_to_send()
    return conn


def test_greeting():
    conn = NbdServerConnection(SIZE)
    assert conn.data_to_send() == b"NBDMAGICIHAVEOPT" + struct.pack(">H", 3)
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes):
    conn = NbdServerConnection(SIZE, ALL)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 1 | (2 if no_zeroes else 0)) + option(1, b"disk"))
    assert events(conn) == [NbdNegotiated("disk", no_zeroes)]
    reply = conn.data_to_send()
    assert reply[:10] == struct.pack(">QH", SIZE, ALL | TransmissionFlag.HAS_FLAGS)
    assert reply[10:] == (b"" if no_zeroes else bytes(124))
    assert conn.in_transmission


def test_info_then_go():
    conn = NbdServerConnection(SIZE, ALL | TransmissionFlag.READ_ONLY, block_size=4096)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3) + option(6, go_data(b"x", (3,))))
    assert events(conn) == []
    replies = option_replies(conn.data_to_send())
    assert [(o, k) for o, k, _ in replies] == [(6, 3), (6, 3), (6, 1)]
    assert replies[0][2] == struct.pack(">HQH", 0, SIZE, ALL | TransmissionFlag.READ_ONLY | TransmissionFlag.HAS_FLAGS)
    assert replies[1][2] == struct.pack(">HIII", 3, 4096, 4096, NBD_MAX_PAYLOAD)
    assert not conn.in_transmission
    conn.receive_data(option(7, go_data(b"disk")))
    assert events(conn) == [NbdNegotiated("disk", True)]
    assert [(o, k) for o, k, _ in option_replies(conn.data_to_send())] == [(7, 3), (7, 3), (7, 1)]
    assert conn.in_transmission


def test_list_unsupported_and_abort():
    conn = NbdServerConnection(SIZE)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 1) + option(3) + option(3, b"x") + option(8) + option(5) + option(99)
                      + option(7, b"\x00\x00") + option(2))
    assert events(conn) == [NbdDisconnect("NBD_OPT_ABORT")]
    replies = option_replies(conn.data_to_send())
    kinds = [(o, k) for o, k, _ in replies]
    err = 1 << 31
    assert kinds == [(3, 2), (3, 1), (3, err + 3), (8, err + 1), (5, err + 2), (99, err + 1), (7, err + 3), (2, 1)]
    assert replies[0][2] == struct.pack(">I", 0)  # the one export, named ""
    conn.receive_data(request(0, length=512))  # after the end: ignored
    assert events(conn) == []


@pytest.mark.parametrize("stream, field", [
    (struct.pack(">I", 4), "client_flags"),
    (struct.pack(">I", 1) + struct.pack(">QII", 1234, 7, 0), "option_magic"),
    (struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, 7, 1 << 20), "option_length"),
    (struct.pack(">I", 1) + option(1, b"n" * 5000), "export_name"),
])
def test_handshake_errors_name_the_field(stream, field):
    conn = NbdServerConnection(SIZE)
    conn.receive_data(stream)
    with pytest.raises(NbdProtocolError) as err:
        events(conn)
    assert err.value.field == field
    assert field in str(err.value)


def test_requests_under_any_chunking():
    stream = (request(0, 1, 4096, 4096) + request(1, 2, 512, 1024, flags=1) + bytes(range(256)) * 4
              + request(3, 3) + request(4, 4, 0, 8192, flags=1) + request(6, 5, 8192, 512, flags=2)
              + request(5, 6, 0, 4096) + request(2, 7))
    expected = [
        NbdRequest(1, NbdCommand.READ, 0, 4096, 4096),
        NbdRequest(2, NbdCommand.WRITE, 1, 512, 1024, bytes(range(256)) * 4),
        NbdRequest(3, NbdCommand.FLUSH, 0, 0, 0),
        NbdRequest(4, NbdCommand.TRIM, 1, 0, 8192),
        NbdRequest(5, NbdCommand.WRITE_ZEROES, 2, 8192, 512),
        NbdRequest(6, NbdCommand.CACHE, 0, 0, 4096),
        NbdDisconnect("NBD_CMD_DISC"),
    ]
    for step in (1, 3, 28, 100, len(stream)):
        conn = in_transmission()
        got = []
        for i in range(0, len(stream), step):
            conn.receive_data(stream[i:i + step])
            got += events(conn)
        assert got == expected, step


@given(st.lists(st.tuples(st.integers(0, SIZE // 512 - 1), st.integers(1, 16)), min_size=1, max_size=40),
       st.integers(1, 64))
@settings(max_examples=50, deadline=None)
def test_pipelined_reads(reads, chunk):
    conn = in_transmission()
    stream = b"".join(request(0, i, sector * 512, min(n, SIZE // 512 - sector) * 512)
                      for i, (sector, n) in enumerate(reads))
    got = []
    for i in range(0, len(stream), chunk):
        conn.receive_data(stream[i:i + chunk])
        got += events(conn)
    assert [e.cookie for e in got] == list(range(len(reads)))
    assert conn.buffered == 0


@pytest.mark.parametrize("req, payload, error", [
    (request(0, 9, SIZE, 512), b"", NbdErrno.EINVAL),  # read past the end
    (request(1, 9, SIZE - 512, 1024), b"w" * 1024, NbdErrno.ENOSPC),  # write past the end
    (request(4, 9, SIZE, 512), b"", NbdErrno.ENOSPC),
    (request(0, 9, 100, 512), b"", NbdErrno.EINVAL),  # unaligned
    (request(0, 9, 0, 0), b"", NbdErrno.EINVAL),  # empty read
    (request(0, 9, 0, NBD_MAX_PAYLOAD + 512), b"", NbdErrno.EOVERFLOW),
    (request(7, 9, 0, 512), b"", NbdErrno.EINVAL),  # block status: not negotiated
    (request(77, 9, 0, 512), b"", NbdErrno.EINVAL),  # unknown command
    (request(0, 9, 0, 512, flags=1), b"", NbdErrno.EINVAL),  # FUA on a read
    (request(1, 9, 0, 512, flags=0x20), b"w" * 512, NbdErrno.EINVAL),  # unknown flag on a write
    (request(0, 9, (1 << 64) - 512, 512), b"", NbdErrno.EINVAL),  # offset near 2**64
])
def test_refusals_fail_one_request(req, payload, error):
    conn = in_transmission()
    conn.receive_data(req + payload + request(0, 10, 0, 512))
    got = events(conn)
    assert len(got) == 2
    assert isinstance(got[0], NbdRefused) and got[0].cookie == 9 and got[0].error == error
    assert got[0].reason
    assert got[1] == NbdRequest(10, NbdCommand.READ, 0, 0, 512)


def test_read_only_and_unadvertised():
    conn = in_transmission(TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_FLUSH)
    conn.receive_data(request(1, 1, 0, 512) + b"w" * 512 + request(4, 2, 0, 512) + request(6, 3, 0, 512)
                      + request(3, 4) + request(5, 5, 0, 512))
    got = events(conn)
    assert [(e.cookie, getattr(e, "error", 0)) for e in got] == [
        (1, NbdErrno.EPERM), (2, NbdErrno.EINVAL), (3, NbdErrno.EINVAL), (4, 0), (5, NbdErrno.EINVAL)]


def test_oversized_write_is_dropped_as_it_streams():
    conn = in_transmission()
    length = NBD_MAX_PAYLOAD + 4096
    conn.receive_data(request(1, 1, 0, length))
    assert events(conn) == []
    chunk = bytes(1 << 20)
    sent = 0
    while sent < length:
        piece = chunk[:length - sent]
        conn.receive_data(piece)
        sent += len(piece)
        if sent < length:
            assert events(conn) == []
        assert conn.buffered == 0  # never kept
    conn.receive_data(request(3, 2))
    got = events(conn)
    assert got[0].error == NbdErrno.EOVERFLOW and got[1] == NbdRequest(2, NbdCommand.FLUSH, 0, 0, 0)


def test_a_large_write_payload_is_not_kept_twice():
    """Once a WRITE's payload is out as its request, the receive buffer lets it go (a reader paused by its
    bounds would otherwise hold it twice); what follows it stays, and parses."""
    conn = in_transmission(size=8 << 20)
    payload = bytes(range(256)) * (8 << 10)  # 2 MiB
    conn.receive_data(request(1, 7, 4096, len(payload)) + payload + request(0, 8, 0, 4096)[:10])
    write = conn.next_event()  # and no more: the server's reader stops here when its bounds are reached
    assert write == NbdRequest(7, NbdCommand.WRITE, 0, 4096, len(payload), payload)
    assert conn.buffered == 10
    assert len(conn._buffer) < 1 << 20  # the 2 MiB taken went at once (COMPACT_MIN), not at the next event
    conn.receive_data(request(0, 8, 0, 4096)[10:])
    assert events(conn) == [NbdRequest(8, NbdCommand.READ, 0, 0, 4096)]


def test_bad_request_magic_names_the_position():
    conn = in_transmission()
    conn.receive_data(request(0, 1, 0, 512) + b"\xde\xad" * 14)
    assert len(conn.next_event()) == 6
    with pytest.raises(NbdProtocolError) as err:
        conn.next_event()
    assert err.value.field == "request_magic"
    assert err.value.position == 4 + 16 + 28  # client flags, the option, one request
    assert conn.next_event() is NBD_NEED_DATA  # closed: nothing more comes out


def test_block_size_must_be_a_power_of_two():
    with pytest.raises(ValueError):
        NbdServerConnection(SIZE, block_size=768)


def test_simple_reply():
    assert nbd_simple_reply(0x0102030405060708) == bytes.fromhex("67446698000000000102030405060708")
    assert nbd_simple_reply(1, NbdErrno.EIO)[4:8] == b"\x00\x00\x00\x05"
