"""The message codec: constants, round trips, and decoding hand-written bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dmuserd.protocol as p
from dmuserd.protocol import (
    ALL_FLAGS,
    HEADER_SIZE,
    NEED_DATA,
    DaemonConnection,
    Flag,
    Header,
    ProtocolError,
    Request,
    RequestType,
    Response,
    ResponseType,
)
from protocol_testlib import pack, pattern, unpack

U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)

# -- the numbers, straight from the spec's tables ----------------------------

SPEC_REQUEST_TYPES = {
    "READ": 0, "WRITE": 1, "FLUSH": 2, "DISCARD": 3, "SECURE_ERASE": 4,
    "WRITE_SAME": 5, "WRITE_ZEROES": 6, "ZONE_OPEN": 7, "ZONE_CLOSE": 8,
    "ZONE_FINISH": 9, "ZONE_APPEND": 10, "ZONE_RESET": 11, "ZONE_RESET_ALL": 12,
}  # fmt: skip
SPEC_RESPONSE_TYPES = {"SUCCESS": 0, "ERROR": 1, "UNSUPPORTED": 2}
SPEC_FLAGS = {
    "FAILFAST_DEV": 0x1, "FAILFAST_TRANSPORT": 0x2, "FAILFAST_DRIVER": 0x4,
    "SYNC": 0x8, "META": 0x10, "PRIO": 0x20, "NOMERGE": 0x40, "IDLE": 0x80,
    "INTEGRITY": 0x100, "FUA": 0x200, "PREFLUSH": 0x400, "RAHEAD": 0x800,
    "BACKGROUND": 0x1000, "NOWAIT": 0x2000, "CGROUP_PUNT": 0x4000,
    "NOUNMAP": 0x8000, "HIPRI": 0x10000, "DRV": 0x20000, "SWAP": 0x40000,
}  # fmt: skip


def test_constants_match_spec():
    assert HEADER_SIZE == 40
    assert p.SECTOR_SIZE == 512
    assert p.MESSAGE_POOL_RESERVE == 128
    assert p.DEFAULT_DAEMON_TIMEOUT_MS == 4000


def test_request_types_match_spec():
    assert {t.name: t.value for t in RequestType} == SPEC_REQUEST_TYPES


def test_response_types_match_spec():
    assert {t.name: t.value for t in ResponseType} == SPEC_RESPONSE_TYPES


def test_flags_match_spec():
    assert {f.name: f.value for f in Flag} == SPEC_FLAGS
    assert ALL_FLAGS == sum(SPEC_FLAGS.values()) == 0x7FFFF


def test_forwarded_types_exclude_zone_ops():
    assert p.FORWARDED_TYPES == {RequestType(v) for v in range(7)}


def test_public_api_names_stable():
    expected = {
        "ALL_FLAGS", "DEFAULT_DAEMON_TIMEOUT_MS", "DEFAULT_MAX_IO", "FORWARDED_TYPES",
        "HEADER_SIZE", "MESSAGE_POOL_RESERVE", "NEED_DATA", "SECTOR_SIZE", "WOULD_BLOCK",
        "FORWARDED_FLAGS", "Bio", "BioState", "Channel", "DaemonConnection", "Flag", "Header",
        "KernelError", "KernelTarget", "OversizedRequest", "ProtocolError", "Request", "RequestType",
        "Response", "ResponseType",
    }  # fmt: skip
    assert expected <= set(p.__all__)
    for name in p.__all__:
        assert hasattr(p, name), name


# -- decoding hand-written bytes (offsets from the spec) ---------------------

# READ, seq 5, flags SYNC|META (0x18), sector 8, len 4096 (0x1000).
READ_HEX = (
    "0500000000000000"  # seq    @0
    "0000000000000000"  # type   @8   READ
    "1800000000000000"  # flags  @16  SYNC|META
    "0800000000000000"  # sector @24
    "0010000000000000"  # len    @32  4096
)
# WRITE, seq 0x0102030405060708, flags FUA|PREFLUSH (0x600), sector 0x10, len 512.
WRITE_HEX = (
    "0807060504030201"
    "0100000000000000"
    "0006000000000000"
    "1000000000000000"
    "0002000000000000"
)


def test_decode_hand_written_read_header():
    header = Header.decode(bytes.fromhex(READ_HEX))
    assert header == Header(seq=5, type=0, flags=0x18, sector=8, len=4096)


def test_decode_hand_written_header_ignores_trailing_bytes():
    header = Header.decode(bytes.fromhex(WRITE_HEX) + b"\xff" * 7)
    assert header == Header(0x0102030405060708, 1, 0x600, 0x10, 512)


def test_decode_hand_written_read_request():
    conn = DaemonConnection()
    conn.receive_data(bytes.fromhex(READ_HEX))
    request = conn.next_event()
    assert request == Request(5, RequestType.READ, Flag.SYNC | Flag.META, 8, 4096, None)
    assert request.offset == 8 * 512
    assert conn.next_event() is NEED_DATA


def test_decode_hand_written_write_request_with_payload():
    payload = bytes(range(256)) * 2
    conn = DaemonConnection()
    conn.receive_data(bytes.fromhex(WRITE_HEX) + payload)
    request = conn.next_event()
    assert request.seq == 0x0102030405060708
    assert request.type is RequestType.WRITE
    assert request.flags == Flag.FUA | Flag.PREFLUSH
    assert request.sector == 16 and request.len == 512
    assert request.payload == payload


def test_decode_hand_written_flush_as_write_preflush_len0():
    # What a 6.1 kernel really sends for a flush: WRITE, len 0, PREFLUSH.
    raw = bytes.fromhex("2a00000000000000" "0100000000000000" "0004000000000000" + "00" * 16)
    conn = DaemonConnection()
    conn.receive_data(raw)
    request = conn.next_event()
    assert request == Request(42, RequestType.WRITE, Flag.PREFLUSH, 0, 0, b"")


def test_decode_hand_written_max_u64_fields():
    raw = bytes.fromhex("ff" * 8 + "0300000000000000" + "00" * 8 + "0100000000000000" + "0002000000000000")
    conn = DaemonConnection()
    conn.receive_data(raw)
    request = conn.next_event()
    assert request.seq == (1 << 64) - 1
    assert request.type is RequestType.DISCARD and request.sector == 1 and request.len == 512


def test_encode_success_read_response_matches_hand_written_bytes():
    conn = DaemonConnection()
    conn.receive_data(bytes.fromhex(READ_HEX))
    conn.next_event()
    data = b"\xab" * 4096
    buffers = conn.send_response(Response(5, ResponseType.SUCCESS, data))
    # The header echoes the request's flags, sector and len.
    assert bytes(buffers[0]) == bytes.fromhex(READ_HEX)
    assert bytes(buffers[1]) == data
    assert len(buffers) == 2


@pytest.mark.parametrize(
    "rtype, hex_type", [(ResponseType.ERROR, "0100000000000000"), (ResponseType.UNSUPPORTED, "0200000000000000")]
)
def test_encode_error_response_matches_hand_written_bytes(rtype, hex_type):
    conn = DaemonConnection()
    conn.receive_data(bytes.fromhex(READ_HEX))
    conn.next_event()
    (header,) = conn.send_response(Response(5, rtype))
    assert header == bytes.fromhex("0500000000000000" + hex_type + READ_HEX[32:])


def test_header_encode_matches_spec_offsets():
    raw = Header(1, 2, 3, 4, 5).encode()
    assert raw == bytes.fromhex("".join(f"{v:02x}00000000000000" for v in (1, 2, 3, 4, 5)))


def test_header_decode_truncated():
    with pytest.raises(ProtocolError) as info:
        Header.decode(bytes.fromhex(READ_HEX)[:39])
    assert info.value.field == "header" and info.value.value == 39


def test_header_encode_out_of_range():
    with pytest.raises(ProtocolError) as info:
        Header(1 << 64, 0, 0, 0, 0).encode()
    assert info.value.field == "header"
    with pytest.raises(ProtocolError):
        Header(-1, 0, 0, 0, 0).encode()


# -- round trips ---------------------------------------------------------------


def _payload_for(rtype: RequestType, length: int):
    return pattern(length, int(rtype)) if rtype is RequestType.WRITE else None


@pytest.mark.parametrize("rtype", list(RequestType), ids=lambda t: t.name)
def test_request_round_trip_every_type(rtype):
    request = Request(7, rtype, Flag.SYNC, 123, 1024, _payload_for(rtype, 1024))
    raw = request.encode()
    assert unpack(raw) == (7, int(rtype), int(Flag.SYNC), 123, 1024)
    assert len(raw) == 40 + (1024 if rtype is RequestType.WRITE else 0)
    conn = DaemonConnection()
    conn.receive_data(raw)
    assert conn.next_event() == request
    assert conn.next_event() is NEED_DATA
    assert conn.buffered == 0


@pytest.mark.parametrize("flag", [*Flag, Flag(ALL_FLAGS), Flag(0)], ids=lambda f: str(int(f)))
@pytest.mark.parametrize("rtype", [RequestType.READ, RequestType.WRITE], ids=lambda t: t.name)
def test_request_round_trip_every_flag(rtype, flag):
    request = Request(1, rtype, flag, 0, 512, _payload_for(rtype, 512))
    conn = DaemonConnection()
    conn.receive_data(request.encode())
    decoded = conn.next_event()
    assert decoded == request
    assert int(decoded.flags) == int(flag)


@pytest.mark.parametrize("rtype", list(ResponseType), ids=lambda t: t.name)
@pytest.mark.parametrize(
    "req_type", [RequestType.READ, RequestType.WRITE, RequestType.FLUSH, RequestType.DISCARD], ids=lambda t: t.name
)
def test_response_round_trip_every_type(rtype, req_type):
    request = Request(9, req_type, Flag.FUA, 64, 1024, _payload_for(req_type, 1024))
    conn = DaemonConnection()
    conn.receive_data(request.encode())
    assert conn.next_event() == request
    with_payload = rtype is ResponseType.SUCCESS and req_type is RequestType.READ
    data = pattern(1024, 3) if with_payload else None
    buffers = conn.send_response(Response(9, rtype, data))
    raw = b"".join(bytes(b) for b in buffers)
    assert unpack(raw) == (9, int(rtype), int(Flag.FUA), 64, 1024)
    assert raw[40:] == (data or b"")
    assert conn.outstanding == 0


@settings(max_examples=200, deadline=None)
@given(U64, U64, U64, U64, U64)
def test_header_round_trip_any_u64(seq, type_, flags, sector, length):
    header = Header(seq, type_, flags, sector, length)
    raw = header.encode()
    assert raw == pack(seq, type_, flags, sector, length)
    assert Header.decode(raw) == header


@settings(max_examples=200, deadline=None)
@given(
    seq=U64,
    rtype=st.sampled_from(sorted(p.FORWARDED_TYPES)),
    flags=st.integers(0, ALL_FLAGS),
    sector=st.integers(0, (1 << 40)),
    blocks=st.integers(0, 16),
)
def test_request_round_trip_property(seq, rtype, flags, sector, blocks):
    length = blocks * 512
    request = Request(seq, rtype, Flag(flags), sector, length, _payload_for(rtype, length))
    conn = DaemonConnection()
    conn.receive_data(request.encode())
    assert conn.next_event() == request
