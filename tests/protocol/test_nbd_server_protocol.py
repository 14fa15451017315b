"""NbdServerConnection: the handshake's answers byte for byte, requests under any
chunking, refusals that fail one request, typed errors where the framing is lost;
structured replies, the ``base:allocation`` meta context and block status
replies byte for byte, and malformed meta context options refused alone."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmuserd.protocol import (
    NBD_MAX_PAYLOAD,
    NBD_NEED_DATA,
    NbdAllocationFlag,
    NbdCommand,
    NbdDisconnect,
    NbdErrno,
    NbdNegotiated,
    NbdProtocolError,
    NbdRefused,
    NbdRequest,
    NbdServerConnection,
    TransmissionFlag,
    nbd_block_status_chunk,
    nbd_data_chunk,
    nbd_error_chunk,
    nbd_simple_reply,
)
from dmuserd.protocol._nbd import MAX_EXTENTS

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
    assert kinds == [(3, 2), (3, 1), (3, err + 3), (8, 1), (5, err + 2), (99, err + 1), (7, err + 3), (2, 1)]
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
    (request(0, 9, 0, 512, flags=4), b"", NbdErrno.EINVAL),  # DF without structured replies
    (request(6, 9, 0, 512, flags=0x10), b"", NbdErrno.EINVAL),  # FAST_ZERO not advertised
    (request(0, 9, 0, 512, flags=8), b"", NbdErrno.EINVAL),  # REQ_ONE on a read
    (request(3, 9, 0, 0, flags=2), b"", NbdErrno.EINVAL),  # NO_HOLE on a flush
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


# -- structured replies, meta contexts, block status ---------------------------------------------------------

STRUCTURED_MAGIC = 0x668E33EF
ERR = 1 << 31


def meta_data(name: bytes = b"", *queries: bytes) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def reply(opt: int, kind: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", REPLY_MAGIC, opt, kind, len(data)) + data


def negotiating(flags=ALL, structured: bool = True) -> NbdServerConnection:
    """A connection past the client flags, structured replies on (their ACK taken) unless not asked."""
    conn = NbdServerConnection(SIZE, flags)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3) + (option(8) if structured else b""))
    assert events(conn) == []
    assert conn.data_to_send() == (reply(8, 1) if structured else b"")
    assert conn.structured is structured
    return conn


def test_structured_reply_option():
    conn = negotiating(structured=False)
    conn.receive_data(option(8, b"x") + option(8) + option(8))
    assert events(conn) == []
    assert conn.data_to_send() == reply(8, ERR + 3, b"NBD_OPT_STRUCTURED_REPLY takes no data") + reply(8, 1) * 2
    assert conn.structured


def test_structured_replies_advertise_df():
    """SEND_DF goes with the export once structured replies are on (INFO, GO and EXPORT_NAME alike), never
    before; then a READ may carry DF (one chunk is all a READ ever gets)."""
    conn = negotiating()
    conn.receive_data(option(6, go_data()) + option(7, go_data()))
    assert events(conn) == [NbdNegotiated("", True)]
    replies = option_replies(conn.data_to_send())
    flags = ALL | TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_DF
    assert replies[0][2] == replies[3][2] == struct.pack(">HQH", 0, SIZE, flags)
    conn.receive_data(request(0, 1, 512, 4096, flags=4) + request(0, 2, 0, 512, flags=5))
    assert events(conn) == [NbdRequest(1, NbdCommand.READ, 4, 512, 4096), NbdRequest(2, NbdCommand.READ, 5, 0, 512)]
    old = negotiating()
    old.receive_data(option(1, b"d"))
    assert events(old) == [NbdNegotiated("d", True)]
    assert old.data_to_send() == struct.pack(">QH", SIZE, flags)


def test_meta_context_needs_structured_replies():
    conn = negotiating(structured=False)
    conn.receive_data(option(9, meta_data()) + option(10, meta_data(b"", b"base:allocation")))
    assert events(conn) == []
    assert conn.data_to_send() == (
        reply(9, ERR + 3, b"NBD_OPT_LIST_META_CONTEXT needs NBD_OPT_STRUCTURED_REPLY first")
        + reply(10, ERR + 3, b"NBD_OPT_SET_META_CONTEXT needs NBD_OPT_STRUCTURED_REPLY first"))
    assert conn.allocation_context is None


def test_list_meta_context():
    """LIST with no query or the ``base:`` wildcard names base:allocation (id 0, reserved); a query of another
    namespace, or an unknown leaf, finds nothing: a lone ACK. Nothing is selected by a LIST."""
    conn = negotiating()
    context = struct.pack(">I", 0) + b"base:allocation"
    for queries, found in [((), True), ((b"base:",), True), ((b"base:allocation",), True),
                           ((b"qemu:dirty-bitmap:x", b"base:"), True), ((b"qemu:allocation-depth",), False),
                           ((b"base:nothing", b"nocolon"), False)]:
        conn.receive_data(option(9, meta_data(b"disk", *queries)))
        assert events(conn) == []
        assert conn.data_to_send() == (reply(9, 4, context) if found else b"") + reply(9, 1), queries
    assert conn.allocation_context is None


def test_set_meta_context_then_block_status():
    conn = negotiating()
    conn.receive_data(option(10, meta_data(b"disk", b"base:", b"qemu:dirty-bitmap:b", b"base:allocation")))
    assert events(conn) == []
    assert conn.data_to_send() == reply(10, 4, struct.pack(">I", 1) + b"base:allocation") + reply(10, 1)
    conn.receive_data(option(7, go_data(b"disk")))
    assert events(conn) == [NbdNegotiated("disk", True)]
    conn.data_to_send()
    assert conn.allocation_context == 1
    conn.receive_data(request(7, 1, 4096, 8192) + request(7, 2, 0, SIZE, flags=8)
                      + request(7, 3, SIZE - 512, 1024) + request(7, 4, 100, 512) + request(7, 5, 0, 512, flags=1 << 4))
    got = events(conn)
    assert got[:2] == [NbdRequest(1, NbdCommand.BLOCK_STATUS, 0, 4096, 8192),
                       NbdRequest(2, NbdCommand.BLOCK_STATUS, 8, 0, SIZE)]
    assert [(e.cookie, e.error) for e in got[2:]] == [(3, NbdErrno.EINVAL), (4, NbdErrno.EINVAL), (5, NbdErrno.EINVAL)]


@pytest.mark.parametrize("steps, why", [
    ([option(10, meta_data(b"a", b"base:allocation")), option(7, go_data(b"b"))], "another export chosen"),
    ([option(10, meta_data(b"", b"base:allocation")), option(10, meta_data(b"")), option(7, go_data())],
     "a later SET with no query selects nothing"),
    ([option(10, meta_data(b"", b"base:allocation")), option(10, b"\x00"), option(7, go_data())],
     "a later malformed SET still replaces the selection"),
    ([option(10, meta_data(b"", b"base:")), option(1)], "base: selects nothing in a SET"),
])
def test_block_status_without_a_context_is_einval(steps, why):
    conn = negotiating()
    conn.receive_data(b"".join(steps))
    assert len(events(conn)) == 1  # NbdNegotiated
    assert conn.allocation_context is None, why
    conn.receive_data(request(7, 1, 0, 4096) + request(0, 2, 0, 512))
    got = events(conn)
    assert got[0].error == NbdErrno.EINVAL and "metadata context" in got[0].reason
    assert got[1] == NbdRequest(2, NbdCommand.READ, 0, 0, 512)


@pytest.mark.parametrize("data, message", [
    (b"", b"0 bytes, fewer than the 8 of the name length and the query count"),
    (struct.pack(">I", 4097) + b"n" * 4097 + struct.pack(">I", 0), b"export name length 4097 over 4096"),
    (struct.pack(">I", 10) + b"name", b"export name length 10 runs past the option's 8 bytes"),
    (meta_data(b"") + b"\x00" * 4, b"4 bytes after the last query"),
    (struct.pack(">II", 0, 0xFFFFFFFF) + b"\x00" * 12, b"4294967295 queries cannot fit in the 12 bytes after the count"),
    (struct.pack(">III", 0, 1, 50) + b"base:", b"query 0 of 1 (at byte 8): length 50 runs past the option's data"),
    (struct.pack(">III", 0, 1, 5000) + b"q" * 5000, b"query 0 of 1 (at byte 8): length 5000 over 4096"),
    (struct.pack(">III", 0, 2, 4) + b"abcd\x00\x07", b"query 1 of 2: its length (at byte 16) runs past the option's data"),
])
@pytest.mark.parametrize("code", [9, 10])
def test_malformed_meta_context_fails_that_option_alone(code, data, message):
    """The option is answered ERR_INVALID naming what is wrong; the handshake goes on and a GO still works."""
    conn = negotiating()
    conn.receive_data(option(code, data) + option(7, go_data()))
    assert events(conn) == [NbdNegotiated("", True)]
    name = b"LIST" if code == 9 else b"SET"
    replies = option_replies(conn.data_to_send())
    assert replies[0] == (code, ERR + 3, b"malformed NBD_OPT_" + name + b"_META_CONTEXT: " + message)
    assert [k for _, k, _ in replies[1:]] == [3, 3, 1]


def test_oversized_meta_context_option_loses_the_framing():
    conn = negotiating()
    conn.receive_data(struct.pack(">QII", IHAVEOPT, 10, (64 << 10) + 1))
    with pytest.raises(NbdProtocolError) as err:
        events(conn)
    assert err.value.field == "option_length" and err.value.position == 4 + 16


def test_fast_zero_and_fua_flags():
    """FAST_ZERO rides WRITE_ZEROES where SEND_FAST_ZERO is advertised (never without SEND_WRITE_ZEROES); FUA is
    accepted on any command where SEND_FUA is (a READ has nothing to persist), refused where it is not."""
    with pytest.raises(ValueError):
        NbdServerConnection(SIZE, TransmissionFlag.SEND_FAST_ZERO)
    conn = in_transmission(ALL | TransmissionFlag.SEND_FAST_ZERO)
    conn.receive_data(request(6, 1, 0, 4096, flags=0x10) + request(6, 2, 0, 4096, flags=0x13)
                      + request(0, 3, 0, 512, flags=1) + request(3, 4, flags=1) + request(6, 5, 0, 512, flags=0x20))
    got = events(conn)
    assert got[:4] == [NbdRequest(1, NbdCommand.WRITE_ZEROES, 0x10, 0, 4096),
                       NbdRequest(2, NbdCommand.WRITE_ZEROES, 0x13, 0, 4096),
                       NbdRequest(3, NbdCommand.READ, 1, 0, 512), NbdRequest(4, NbdCommand.FLUSH, 1, 0, 0)]
    assert got[4].error == NbdErrno.EINVAL
    no_fua = in_transmission(TransmissionFlag.SEND_FLUSH)
    no_fua.receive_data(request(0, 1, 0, 512, flags=1))
    assert [(e.error, e.reason) for e in events(no_fua)] == [(NbdErrno.EINVAL, "FUA was not advertised")]


def test_data_chunk():
    assert nbd_data_chunk(0x0102030405060708, 4096, 512) == struct.pack(
        ">IHHQIQ", STRUCTURED_MAGIC, 1, 1, 0x0102030405060708, 520, 4096)
    assert len(nbd_data_chunk(1, 0, NBD_MAX_PAYLOAD)) == 28


def test_error_chunk():
    assert nbd_error_chunk(7, NbdErrno.EINVAL, "bad") == struct.pack(
        ">IHHQIIH", STRUCTURED_MAGIC, 1, 0x8001, 7, 9, 22, 3) + b"bad"
    assert nbd_error_chunk(7, NbdErrno.EIO) == struct.pack(">IHHQIIH", STRUCTURED_MAGIC, 1, 0x8001, 7, 6, 5, 0)
    long = nbd_error_chunk(7, NbdErrno.EIO, "é" * 3000)  # 6000 bytes of UTF-8: cut at 4096, between characters
    assert struct.unpack_from(">IH", long, 20) == (5, 4096) and long[26:].decode() == "é" * 2048
    with pytest.raises(ValueError):
        nbd_error_chunk(7, 0)


def test_error_reply_follows_the_negotiation():
    simple = in_transmission()
    assert simple.error_reply(3, NbdErrno.EINVAL, "why") == nbd_simple_reply(3, NbdErrno.EINVAL)
    conn = negotiating()
    assert conn.error_reply(3, NbdErrno.EINVAL, "why") == nbd_error_chunk(3, NbdErrno.EINVAL, "why")


HOLE = int(NbdAllocationFlag.HOLE | NbdAllocationFlag.ZERO)


def status_chunk(cookie: int, context: int, *descriptors: tuple[int, int]) -> bytes:
    return struct.pack(">IHHQII", STRUCTURED_MAGIC, 1, 5, cookie, 4 + 8 * len(descriptors), context) + b"".join(
        struct.pack(">II", *d) for d in descriptors)


@pytest.mark.parametrize("extents, length, req_one, want", [
    ([(4096, 0)], 4096, False, [(4096, 0)]),
    ([(4096, 0), (8192, HOLE), (512, 0)], 12800, False, [(4096, 0), (8192, HOLE), (512, 0)]),
    ([(4096, HOLE), (4096, HOLE), (512, 0)], 8704, False, [(8192, HOLE), (512, 0)]),  # same status: merged
    ([(65536, 0), (65536, HOLE)], 70000, False, [(65536, 0), (4464, HOLE)]),  # cut at the length asked
    ([(0, 0), (512, HOLE)], 512, False, [(512, HOLE)]),  # an empty extent is skipped
    ([(4096, HOLE), (4096, 0)], 8192, True, [(4096, HOLE)]),  # REQ_ONE: one descriptor
    ([(1 << 20, 0)], 4096, True, [(4096, 0)]),  # REQ_ONE: never longer than asked
    ([(512, 0), (512, 0), (512, HOLE)], 1536, True, [(1024, 0)]),
])
def test_block_status_chunk(extents, length, req_one, want):
    assert nbd_block_status_chunk(9, 1, extents, length, req_one) == status_chunk(9, 1, *want)


def test_block_status_chunk_limits():
    with pytest.raises(ValueError):
        nbd_block_status_chunk(9, 1, [], 4096)
    with pytest.raises(ValueError):
        nbd_block_status_chunk(9, 1, [(0, 0)], 4096)
    many = ((512, i & 1) for i in range(MAX_EXTENTS + 10))  # alternating: nothing merges
    chunk = nbd_block_status_chunk(9, 1, many, (MAX_EXTENTS + 10) * 512)
    assert struct.unpack_from(">I", chunk, 16)[0] == 4 + 8 * MAX_EXTENTS
