"""DaemonConnection: framing under any chunking, typed errors for bad input,
and oversized requests that fail alone."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmuserd.protocol import (
    ALL_FLAGS,
    DEFAULT_MAX_IO,
    FORWARDED_TYPES,
    NEED_DATA,
    HEADER_SIZE,
    DaemonConnection,
    Flag,
    OversizedRequest,
    ProtocolError,
    Request,
    RequestType,
    Response,
    ResponseType,
)
from protocol_testlib import pack, pattern

U64_MAX = (1 << 64) - 1

# -- strategies ------------------------------------------------------------------


@st.composite
def request_lists(draw, max_size=12):
    """Valid requests with distinct seqs, WRITEs carrying payloads."""
    seqs = draw(st.lists(st.integers(0, U64_MAX), min_size=1, max_size=max_size, unique=True))
    requests = []
    for seq in seqs:
        rtype = draw(st.sampled_from(sorted(FORWARDED_TYPES)))
        flags = Flag(draw(st.integers(0, ALL_FLAGS)))
        sector = draw(st.integers(0, 1 << 32))
        length = draw(st.integers(0, 8)) * 512
        payload = pattern(length, seq & 0xFF) if rtype is RequestType.WRITE else None
        requests.append(Request(seq, rtype, flags, sector, length, payload))
    return requests


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, start = [], 0
    for point in [*points, len(data)]:
        chunks.append(data[start:point])
        start = point
    return chunks


def feed_all(conn: DaemonConnection, chunks) -> list:
    events = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    return events


# -- framing -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(requests=request_lists(), cuts=st.lists(st.integers(0, 1 << 20), max_size=40))
def test_any_split_of_stream_decodes_to_same_requests(requests, cuts):
    stream = b"".join(r.encode() for r in requests)
    conn = DaemonConnection()
    events = feed_all(conn, split(stream, cuts))
    assert events == requests
    assert conn.buffered == 0
    assert conn.outstanding == len(requests)


@settings(max_examples=100, deadline=None)
@given(requests=request_lists(max_size=6))
def test_byte_at_a_time_decodes_to_same_requests(requests):
    stream = b"".join(r.encode() for r in requests)
    conn = DaemonConnection()
    assert feed_all(conn, [stream[i : i + 1] for i in range(len(stream))]) == requests


def test_need_data_until_header_complete():
    conn = DaemonConnection()
    assert conn.next_event() is NEED_DATA
    raw = pack(3, RequestType.READ, 0, 0, 512)
    for i in range(39):
        conn.receive_data(raw[i : i + 1])
        assert conn.next_event() is NEED_DATA
    conn.receive_data(raw[39:])
    assert conn.next_event() == Request(3, RequestType.READ, Flag(0), 0, 512)


def test_need_data_until_write_payload_complete():
    conn = DaemonConnection()
    conn.receive_data(pack(4, RequestType.WRITE, 0, 2, 1024))
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"x" * 1023)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"y")
    request = conn.next_event()
    assert request.payload == b"x" * 1023 + b"y"


def test_write_payload_received_whole_is_taken_as_is():
    conn = DaemonConnection()
    payload = pattern(1024, 3)
    conn.receive_data(pack(7, RequestType.WRITE, 0, 16, 1024))
    assert conn.next_event() is NEED_DATA
    conn.receive_data(payload)  # exactly the payload due, as bytes
    conn.receive_data(pack(8, RequestType.READ, 0, 0, 512))  # the next message follows
    assert conn.buffered == 1024 + 40
    first = conn.next_event()
    assert first.seq == 7 and first.payload is payload  # no copy
    second = conn.next_event()
    assert second.seq == 8 and second.type is RequestType.READ and second.payload is None
    assert conn.next_event() is NEED_DATA and conn.buffered == 0


def test_empty_receive_is_harmless():
    conn = DaemonConnection()
    conn.receive_data(b"")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(memoryview(pack(1, RequestType.FLUSH)))
    conn.receive_data(bytearray())
    assert conn.next_event().type is RequestType.FLUSH


def test_non_write_requests_carry_no_payload_even_with_len():
    conn = DaemonConnection()
    conn.receive_data(pack(1, RequestType.DISCARD, 0, 0, 1 << 20) + pack(2, RequestType.READ, 0, 0, 4096))
    first, second = conn.next_event(), conn.next_event()
    assert first.payload is None and first.len == 1 << 20
    assert second.seq == 2 and second.payload is None


def test_seq_reusable_after_answer():
    conn = DaemonConnection()
    conn.receive_data(pack(1, RequestType.FLUSH))
    conn.send_response(Response(conn.next_event().seq))
    conn.receive_data(pack(1, RequestType.FLUSH))
    assert conn.next_event().seq == 1


def test_response_payload_counts_bytes_not_items():
    conn = DaemonConnection()
    conn.receive_data(pack(1, RequestType.READ, 0, 0, 512))
    conn.next_event()
    buffers = conn.send_response(Response(1, ResponseType.SUCCESS, array("I", [7] * 128)))
    assert memoryview(buffers[1]).nbytes == 512


def test_read_response_as_a_list_of_buffers_is_sent_unjoined():
    conn = DaemonConnection()
    conn.receive_data(pack(1, RequestType.READ, 0, 8, 1024) + pack(2, RequestType.READ, 0, 8, 1024))
    conn.next_event(), conn.next_event()
    pieces = [b"a" * 512, bytearray(b"b" * 256), memoryview(b"c" * 256)]
    header, *rest = conn.send_response(Response(1, ResponseType.SUCCESS, pieces))
    assert bytes(header) == pack(1, ResponseType.SUCCESS, 0, 8, 1024)
    assert rest == pieces and all(a is b for a, b in zip(rest, pieces))
    with pytest.raises(ProtocolError) as err:
        conn.send_response(Response(2, ResponseType.SUCCESS, [b"a" * 512, b"b" * 511]))
    assert err.value.field == "payload" and err.value.value == 1023
    assert conn.outstanding == 1  # the refused answer leaves its request outstanding


# -- malformed requests ------------------------------------------------------------

BAD_REQUESTS = {
    "unknown type 13": (pack(1, 13, 0, 0, 512), "type", 13),
    "unknown type u64 max": (pack(1, U64_MAX, 0, 0, 0), "type", U64_MAX),
    "unknown flag bit 0x80000": (pack(1, 0, 0x80000, 0, 512), "flags", 0x80000),
    "unknown flag bit 1<<63 with known ones": (pack(1, 0, (1 << 63) | 0x8, 0, 512), "flags", (1 << 63) | 0x8),
    "oversized write with an unknown flag": (pack(1, 1, 0x80000, 0, DEFAULT_MAX_IO + 512), "flags", 0x80000),
    "oversized read not a multiple of 512": (pack(1, 0, 0, 0, DEFAULT_MAX_IO + 100), "len", DEFAULT_MAX_IO + 100),
    "absurd write len u64 max": (pack(1, 1, 0, 0, U64_MAX), "len", U64_MAX),
    "len not a multiple of 512": (pack(1, 0, 0, 0, 100), "len", 100),
    "write len not a multiple of 512": (pack(1, 1, 0, 0, 513), "len", 513),
    "end beyond 2**64 bytes": (pack(1, 0, 0, U64_MAX, 512), "sector", U64_MAX),
}


@pytest.mark.parametrize("raw, field, value", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_malformed_request_raises_typed_error(raw, field, value):
    conn = DaemonConnection()
    conn.receive_data(raw)
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert info.value.field == field
    assert info.value.value == value
    assert field in str(info.value)


@pytest.mark.parametrize("raw, field, value", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_truncated_header_needs_data_then_bad_data_raises(raw, field, value):
    conn = DaemonConnection()
    conn.receive_data(raw[:17])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(raw[17:39])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(raw[39:])
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert (info.value.field, info.value.value) == (field, value)


# -- oversized requests: an event, not an error ----------------------------------------


def test_max_io_is_configurable_and_longer_io_is_an_oversized_request():
    conn = DaemonConnection(max_io=4096)
    conn.receive_data(pack(1, RequestType.WRITE, 0, 0, 4096) + bytes(4096) + pack(2, RequestType.READ, 0x8, 16, 8192))
    assert type(conn.next_event()) is Request
    event = conn.next_event()
    assert event == OversizedRequest(2, RequestType.READ, Flag.SYNC, 16, 8192)
    assert event.offset == 16 * 512
    assert conn.outstanding == 2 and conn.next_event() is NEED_DATA


def test_oversized_write_payload_is_dropped_as_it_streams_in():
    conn = DaemonConnection(max_io=4096)
    conn.receive_data(pack(7, RequestType.WRITE, 0, 0, 64 * 1024) + bytes(1000))
    assert conn.next_event() is NEED_DATA and conn.buffered == 0
    sent = 1000
    while sent < 64 * 1024:
        assert conn.need_bytes == min(64 * 1024 - sent, 4096)  # a bounded piece at a time
        piece = min(3000, 64 * 1024 - sent)
        conn.receive_data(memoryview(bytes(piece)))
        sent += piece
        assert conn.buffered == 0  # never kept
        if sent < 64 * 1024:
            assert conn.next_event() is NEED_DATA
    assert conn.next_event() == OversizedRequest(7, RequestType.WRITE, Flag(0), 0, 64 * 1024)
    assert conn.outstanding == 1


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, 1 << 16), max_size=30), at=st.integers(0, 3))
def test_oversized_write_in_any_split_leaves_the_stream_framed(cuts, at):
    normal = [Request(i, RequestType.WRITE, Flag(0), i, 1024, pattern(1024, i)) for i in range(4)]
    huge = Request(99, RequestType.WRITE, Flag.FUA, 64, 20 * 1024, pattern(20 * 1024, 9))
    stream = b"".join(r.encode() for r in normal[:at]) + huge.encode() + b"".join(r.encode() for r in normal[at:])
    conn = DaemonConnection(max_io=4096)
    events = feed_all(conn, split(stream, cuts))
    oversized = OversizedRequest(99, RequestType.WRITE, Flag.FUA, 64, 20 * 1024)
    assert events == [*normal[:at], oversized, *normal[at:]]


def test_oversized_request_answered_with_error_never_success():
    conn = DaemonConnection(max_io=4096)
    conn.receive_data(pack(1, RequestType.WRITE, 0, 8, 8192) + bytes(8192) + pack(2, RequestType.READ, 0, 0, 8192))
    write, read = conn.next_event(), conn.next_event()
    for event, payload in ((write, None), (read, bytes(8192))):
        with pytest.raises(ProtocolError) as info:
            conn.send_response(Response(event.seq, ResponseType.SUCCESS, payload))
        assert info.value.field == "type" and "ERROR" in str(info.value)
    assert conn.outstanding == 2  # refused answers leave both outstanding
    assert conn.send_response(Response(1, ResponseType.ERROR)) == [pack(1, ResponseType.ERROR, 0, 8, 8192)]
    assert len(conn.send_response(Response(2, ResponseType.UNSUPPORTED))[0]) == HEADER_SIZE
    assert conn.outstanding == 0


def test_discard_len_not_bounded_by_max_io():
    conn = DaemonConnection(max_io=4096)
    conn.receive_data(pack(1, RequestType.DISCARD, 0, 0, 1 << 30))
    assert conn.next_event().len == 1 << 30


def test_duplicate_outstanding_seq():
    conn = DaemonConnection()
    conn.receive_data(pack(8, RequestType.READ, 0, 0, 512) + pack(8, RequestType.FLUSH))
    conn.next_event()
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert (info.value.field, info.value.value) == ("seq", 8)


# -- malformed responses ---------------------------------------------------------


@pytest.fixture
def served():
    """A connection with READ seq 1 (len 1024), WRITE seq 2 and FLUSH seq 3 outstanding."""
    conn = DaemonConnection()
    conn.receive_data(
        pack(1, RequestType.READ, 0, 0, 1024) + pack(2, RequestType.WRITE, 0, 8, 512) + bytes(512)
        + pack(3, RequestType.FLUSH)
    )  # fmt: skip
    assert len(feed_all(conn, [b""])) == 3
    return conn


BAD_RESPONSES = {
    "unknown seq": (Response(99), "seq", 99),
    "unknown response type 3": (Response(1, 3, bytes(1024)), "type", 3),
    "unknown response type u64 max": (Response(3, U64_MAX), "type", U64_MAX),
    "read response too short": (Response(1, ResponseType.SUCCESS, bytes(512)), "payload", 512),
    "read response too long": (Response(1, ResponseType.SUCCESS, bytes(1025)), "payload", 1025),
    "read response without payload": (Response(1, ResponseType.SUCCESS), "payload", None),
    "payload on write response": (Response(2, ResponseType.SUCCESS, b"x" * 512), "payload", 512),
    "payload on flush response": (Response(3, ResponseType.SUCCESS, b"x"), "payload", 1),
    "payload on read error response": (Response(1, ResponseType.ERROR, bytes(1024)), "payload", 1024),
    "list payload on write response": (Response(2, ResponseType.SUCCESS, [b"x" * 512, b"y"]), "payload", 513),
}


@pytest.mark.parametrize("response, field, value", BAD_RESPONSES.values(), ids=BAD_RESPONSES.keys())
def test_malformed_response_raises_typed_error(served, response, field, value):
    with pytest.raises(ProtocolError) as info:
        served.send_response(response)
    assert (info.value.field, info.value.value) == (field, value)
    # A refused response consumes nothing: the request can still be answered.
    assert served.outstanding == 3


def test_response_answered_twice_is_unknown_seq(served):
    served.send_response(Response(3))
    with pytest.raises(ProtocolError) as info:
        served.send_response(Response(3))
    assert (info.value.field, info.value.value) == ("seq", 3)


def test_empty_payload_on_non_read_is_accepted(served):
    assert len(served.send_response(Response(2, ResponseType.SUCCESS, b""))) == 1


# -- fuzzing ---------------------------------------------------------------------------

VALID_EVENT_TYPES = set(RequestType)


def _check_clean(event, max_io):
    if type(event) is OversizedRequest:
        assert event.type in (RequestType.READ, RequestType.WRITE) and event.len > max_io
        return
    assert type(event) is Request
    assert event.type in VALID_EVENT_TYPES
    assert not int(event.flags) & ~ALL_FLAGS
    assert event.len % 512 == 0
    if event.type is RequestType.WRITE:
        assert len(event.payload) == event.len
    else:
        assert event.payload is None


def _fuzz(conn, chunks):
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                _check_clean(event, conn.max_io)
    except ProtocolError as exc:
        assert exc.field in {"type", "len", "seq", "flags", "payload", "header", "sector"}


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=20))
def test_fuzz_random_bytes_only_protocol_errors(data, cuts):
    _fuzz(DaemonConnection(max_io=4096), split(data, cuts))


# Headers close to valid, so the fuzzer gets past the first check often.
FIELD_VALUES = {
    "seq": st.one_of(st.integers(0, 3), st.just(U64_MAX)),
    "type": st.one_of(st.integers(0, 14), st.just(U64_MAX), st.just(1 << 63)),
    "flags": st.one_of(st.integers(0, ALL_FLAGS), st.sampled_from([1 << 19, 1 << 63, U64_MAX])),
    "sector": st.one_of(st.integers(0, 16), st.sampled_from([U64_MAX // 512, U64_MAX // 512 + 1, U64_MAX])),
    "len": st.one_of(st.sampled_from([0, 512, 1024, 4096, 4608, 1, 511, U64_MAX]), st.integers(0, 5000)),
}


@st.composite
def near_valid_streams(draw):
    out = bytearray()
    for _ in range(draw(st.integers(1, 6))):
        fields = [draw(FIELD_VALUES[name]) for name in ("seq", "type", "flags", "sector", "len")]
        out += pack(*fields)
        out += draw(st.binary(max_size=min(fields[4], 1100)))
    return bytes(out)


@settings(max_examples=200, deadline=None)
@given(stream=near_valid_streams(), cuts=st.lists(st.integers(0, 8000), max_size=20))
def test_fuzz_near_valid_headers_only_protocol_errors(stream, cuts):
    _fuzz(DaemonConnection(max_io=4096), split(stream, cuts))


responses = st.builds(
    Response,
    seq=st.one_of(st.integers(0, 4), st.integers(0, U64_MAX)),
    type=st.one_of(st.sampled_from(list(ResponseType)), st.integers(0, U64_MAX)),
    payload=st.one_of(st.none(), st.binary(max_size=1100), st.just(bytes(1024))),
)


@settings(max_examples=200, deadline=None)
@given(answers=st.lists(responses, max_size=8))
def test_fuzz_responses_only_protocol_errors(answers):
    conn = DaemonConnection()
    conn.receive_data(
        pack(1, RequestType.READ, 0, 0, 1024) + pack(2, RequestType.WRITE, 0, 8, 512) + bytes(512)
        + pack(3, RequestType.FLUSH)
    )  # fmt: skip
    feed_all(conn, [b""])
    for response in answers:
        before = conn.outstanding
        try:
            buffers = conn.send_response(response)
        except ProtocolError as exc:
            assert exc.field in {"seq", "type", "payload"}
            assert conn.outstanding == before
        else:
            assert conn.outstanding == before - 1
            assert b"".join(bytes(b) for b in buffers)[:8] == response.seq.to_bytes(8, "little")
