"""Storms on the control socket's JSON lines, against a served daemon (issue #21).

What a client may send: deep nesting, huge lines, no newline, invalid
UTF-8, every field of every command with the wrong type, unknown commands,
``merge`` with hostile arguments, many connections at once, half-closed
and reset connections. What must hold: each answer is one JSON object with
``ok``; the daemon runs on, keeps its data, answers ``status``, logs no
traceback and counts what it refused (``rejected_inputs["control-json"]``).
"""

from __future__ import annotations

import json
import socket
import struct
import time

from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_lib import HANG_SECONDS, Hang, connect, exchange, storm_settings

# -- what a client sends -----------------------------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=24),
    st.sampled_from(["status", "merge", "start", "pause", "resume", "status\x00", "disk", "snap", "",
                     "STATUS", " status", "\u202e", "é" * 3]),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


@st.composite
def _request_object(draw) -> bytes:
    """A JSON object request: right or wrong command, fields of any type."""
    obj = {}
    if draw(st.integers(0, 9)):  # sometimes no "cmd" at all
        obj["cmd"] = draw(st.one_of(st.sampled_from(["status", "merge", "merge", "frobnicate"]), _values))
    if obj.get("cmd") == "merge" or draw(st.booleans()):
        obj["action"] = draw(st.one_of(st.sampled_from(["start", "pause", "resume", "status", "stop"]), _values))
        obj["target"] = draw(st.one_of(st.sampled_from(["snap", "disk", "nope"]), _values))
    obj.update(draw(st.dictionaries(st.text(max_size=6), _values, max_size=3)))
    return json.dumps(obj).encode()


@st.composite
def _deep(draw) -> bytes:
    """Nesting far past any sane depth (the JSON decoder recurses)."""
    depth = draw(st.sampled_from([33, 100, 999, 1000, 5000, 10_000, 60_000]))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    closed = draw(st.booleans())
    inner = opener * depth + (b"1" if opener == b"[" else b"1") + (closer * depth if closed else b"")
    where = draw(st.sampled_from(["field", "cmd", "top"]))
    if where == "top":
        return b"{" + b'"x":' + inner + b"}"
    if where == "cmd":
        return b'{"cmd":' + inner + b"}"
    return b'{"cmd":"status","x":' + inner + b"}"


@st.composite
def _huge(draw) -> bytes:
    """Lines around and far past the request size limit (64 KiB)."""
    size = draw(st.sampled_from([65_000, 65_535, 65_536, 65_537, 70_000, 1 << 20]))
    return b'{"cmd":"status","pad":"' + b"x" * size + b'"}'


_number_bombs = st.sampled_from([
    b'{"cmd":"status","n":' + b"9" * 4301 + b"}",  # past int's digit limit
    b'{"cmd":"status","n":1e999999}',
    b'{"cmd":"status","n":-Infinity,"m":NaN}',
    b'{"cmd":"merge","action":"start","target":' + b"7" * 4000 + b"}",
    b'{"cmd":1e400}',
])

_raw = st.one_of(
    st.binary(min_size=1, max_size=200),  # invalid UTF-8, NULs, lone braces
    st.builds(lambda b: b'{"cmd":"' + b + b'"}', st.binary(max_size=40)),
    st.sampled_from([b"{", b"{}", b"[]", b"null", b'"status"', b'{"cmd":"status"', b"{\x00}", b'{"cmd":"status"}}',
                     b'{"cmd":"status","cmd":"merge"}', b"\xef\xbb\xbf{}", b"\r", b" "]),
)

_valid = st.just(b'{"cmd":"status"}')

_line = st.one_of(_request_object(), _deep(), _huge(), _number_bombs, _raw, _valid)


@st.composite
def connections(draw):
    """One connection: its lines (the first starts with ``{``, so it is JSON), chunking and ending."""
    lines = draw(st.lists(_line, min_size=1, max_size=5))
    if not lines[0].startswith(b"{"):
        lines[0] = b"{" + lines[0]
    stream = b"\n".join(lines)
    if draw(st.integers(0, 4)):  # mostly a final newline, sometimes none
        stream += b"\n"
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    end = draw(st.sampled_from(["shutdown", "shutdown", "shutdown", "close", "reset"]))
    return chunks, end


def _is_hostile(chunks) -> bool:
    """Whether a connection certainly holds a request the daemon must refuse."""
    data = b"".join(chunks)
    for line in data.split(b"\n")[: data.count(b"\n")]:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            return True
        if not isinstance(request, dict) or request.get("cmd") not in ("status", "merge"):
            return True
    return False


def _check_answers(received: bytes) -> None:
    """Every answer is a whole line holding one JSON object with a boolean ``ok``."""
    if not received:
        return
    assert received.endswith(b"\n"), f"an answer was cut off: {received[-200:]!r}"
    for line in received.split(b"\n")[:-1]:
        answer = json.loads(line)
        assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool), answer
        if answer["ok"] is False:
            assert isinstance(answer.get("error"), str) and answer["error"], answer


def _one_connection(daemon, chunks, end) -> None:
    received, _ = exchange(daemon.control, chunks, end=end)
    _check_answers(received)


# -- the storms ----------------------------------------------------------------------------------


def test_control_json_storm(control_daemon):
    """Hostile JSON lines, one connection per example."""
    daemon = control_daemon
    before = daemon.rejected()
    hostile = []

    @storm_settings(ci=250, fuzz=4000)
    @given(connections())
    # the review's killer: RecursionError in json.loads took the daemon down
    @example(([b'{"cmd":"status","x":' + b"[" * 10_000 + b"]" * 10_000 + b"}\n"], "shutdown"))
    @example(([b'{"cmd":[]}\n'], "shutdown"))  # an unhashable command
    @example(([b'{"cmd":"merge","action":"status","target":["snap"]}\n'], "shutdown"))  # an unhashable target
    @example(([b'{"cmd":"status"\xff\xfe}\n'], "shutdown"))
    @example(([b'{"cmd":"status","pad":"' + b"x" * 70_000], "shutdown"))  # too long, no newline
    def storm(connection):
        chunks, end = connection
        hostile.append(_is_hostile(chunks))
        daemon.run_example(_one_connection, daemon, chunks, end)

    storm()
    daemon.check_after_storm(surfaces=("control-json",) if any(hostile) else (), before=before)


@st.composite
def crowds(draw):
    """Many connections at once: each sends a prefix and then holds, half-closes or resets."""
    count = draw(st.integers(1, 96))
    prefix = st.one_of(st.just(b""), st.just(b"{"), st.just(b'{"cmd":"status"}\n'), st.just(b'{"cmd":"sta'),
                       st.just(b'{"cmd":"status","x":' + b"[" * 200), st.just(b"query"), st.binary(max_size=16))
    return [(draw(prefix), draw(st.sampled_from(["hold", "half", "reset", "close"]))) for _ in range(count)]


def _crowd(daemon, crowd) -> None:
    socks = []
    try:
        for prefix, _ in crowd:
            sock = connect(daemon.control)
            socks.append(sock)
            if prefix:
                try:
                    sock.sendall(prefix)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # closed on us already (told "too many connections", say)
        for sock, (_, how) in zip(socks, crowd):
            if how == "half":
                sock.shutdown(socket.SHUT_WR)
            elif how == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            elif how == "close":
                sock.close()
        # While the crowd holds its connections, a new client gets an answer or is
        # told to go away, promptly: a refusal is a typed error, silence is a hang.
        received, closed = exchange(daemon.control, [b'{"cmd":"status"}\n'])
        _check_answers(received)
        assert received or closed
        # The half-closed ones are answered (or just closed), each in turn.
        for sock, (prefix, how) in zip(socks, crowd):
            if how != "half":
                continue
            data = bytearray()
            deadline = time.monotonic() + HANG_SECONDS
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                except socket.timeout:
                    raise Hang("a half-closed control connection was never closed by the daemon") from None
                if not chunk:
                    break
                data += chunk
                if time.monotonic() > deadline:
                    raise Hang("a half-closed control connection kept receiving data")
            if not data:
                continue  # closed without an answer (an unfinished request, say)
            if data.startswith(b"{"):  # JSON (also "too many connections", whatever the prefix)
                _check_answers(bytes(data))
            else:  # snapuserd's protocol: short ASCII replies
                assert not prefix.startswith(b"{") and all(32 <= c < 127 for c in data), data
    finally:
        for sock in socks:
            sock.close()


def test_control_many_connections(control_daemon):
    """Crowds of simultaneous connections, some silent, some half-closed, some reset."""
    daemon = control_daemon

    @storm_settings(ci=12, fuzz=200)
    @given(crowds())
    @example([(b"", "hold")] * 80)  # past any connection limit, all silent
    def storm(crowd):
        daemon.run_example(_crowd, daemon, crowd)

    storm()
    daemon.check_after_storm()
