"""Hostile input on every socket of a served daemon fails alone (issue #21).

Each test serves a real ``dmuserd serve --export nbd:...`` with a control
socket, writes data through a real NBD client, sends what a hostile or
broken peer would, and then checks: the daemon still runs, the data reads
back, ``status`` answers and counts what it rejected, and no traceback went
to the log.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

import pytest

from nbd_harness import qemu_io, read_answer

from dmuserd.daemon import control
from dmuserd.protocol import HEADER_SIZE, RequestType, ResponseType

HEADER = struct.Struct("<5Q")


@pytest.fixture
def served(nbd_session):
    daemon = nbd_session.start("memory:size=1M")
    qemu_io(nbd_session.uri, "write -P 0x5a 0 64k")
    yield daemon
    assert daemon.proc.poll() is None, daemon.log_text()
    qemu_io(nbd_session.uri, "read -P 0x5a 0 64k")
    assert "Traceback" not in daemon.log_text()


def _control(daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(daemon.control))  # blocking: waits while the listen backlog is full
    sock.settimeout(10)
    return sock


def _ask(daemon, raw: bytes) -> dict:
    with _control(daemon) as sock:
        sock.sendall(raw)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, f"closed without an answer to {raw[:40]!r}"
            data += chunk
    return json.loads(data)


def _rejected(daemon) -> dict:
    return daemon.status()["rejected_inputs"]


def test_deeply_nested_json_is_refused_alone(served):
    answer = _ask(served, b'{"cmd":"status","x":' + b"[" * 10_000 + b"]" * 10_000 + b"}\n")
    assert answer["ok"] is False and "deeper" in answer["error"]
    # Within the recursion limit but past ours: refused by the depth check, not by json.
    answer = _ask(served, b'{"cmd":"status","x":' + b"[" * 100 + b"]" * 100 + b"}\n")
    assert answer["ok"] is False and "deeper" in answer["error"]
    assert _rejected(served)["control-json"]["json-too-deep"] == 2


@pytest.mark.parametrize("line, reason", [
    (b'{"cmd": []}', "bad-request"),
    (b'{"cmd": {"a": 1}}', "bad-request"),
    (b'{"cmd": 5}', "bad-request"),
    (b'{"cmd": null, "x": 1e999999}', "bad-request"),
    (b'{"cmd": "status"\xff\xfe}', "bad-json"),
    (b'{"cmd": "rm -rf"}', "unknown-command"),
    (b'{"cmd": "merge", "action": ["pause"], "target": {"x": 1}}', None),
])
def test_malformed_requests_get_an_error_answer(served, line, reason):
    answer = _ask(served, line + b"\n")
    assert answer["ok"] is False and answer["error"]
    if reason is not None:
        assert _rejected(served)["control-json"][reason] == 1
    # The same connection kind still works.
    assert _ask(served, b'{"cmd": "status"}\n')["ok"] is True


def test_a_line_without_end_is_cut_off(served):
    with _control(served) as sock:
        sock.sendall(b'{"cmd": "status", "pad": "' + b"x" * (control.MAX_REQUEST + 8192))
        data = sock.recv(65536)
    assert json.loads(data)["ok"] is False and b"too large" in data
    assert _rejected(served)["control-json"]["request-too-large"] == 1


def test_connections_beyond_the_limit_are_told_and_closed(served):
    held = [_control(served) for _ in range(control.MAX_CONNECTIONS)]
    try:
        # Every slot is taken (once the daemon has accepted them all).
        for sock in held:
            sock.sendall(b"{")
        answer = _ask(served, b'{"cmd": "status"}\n')
        assert answer["ok"] is False and "too many control connections" in answer["error"]
    finally:
        for sock in held:
            sock.close()
    assert _rejected(served)["control-json"]["too-many-connections"] >= 1


@pytest.mark.parametrize("message, reason", [
    (b"init,a\x00b,/nonexistent\x00,/dev/null,/dev/null", None),  # a failed init, not a rejected input
    (b"init,,,,", None),
    (b"start,../../etc", None),
    (b"getstatus", "malformed-request"),
    (b"init,a,b", "malformed-request"),
    (b"\x00\x01\x02", "unknown-request"),
    (b"x" * 512, "unknown-request"),
])
def test_snapuserd_garbage_is_answered_fail(served, message, reason):
    with _control(served) as sock:
        sock.sendall(message)
        reply = sock.recv(512)
    assert reply in (b"fail", b"snapshot-merge-failed")
    if reason is not None:
        assert _rejected(served)["control-snapuserd"][reason] == 1
    with _control(served) as sock:
        sock.sendall(b"query")
        assert sock.recv(512) == b"active"


def _channel(session) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(session.state_dir / "ch.sock"))
    return sock


def test_write_same_on_a_channel_is_unsupported_and_the_channel_goes_on(served, nbd_session):
    with _channel(nbd_session) as sock:
        sock.sendall(HEADER.pack(1, 5, 0, 0, 4096))  # WRITE_SAME, the review's daemon killer
        seq, kind, *_ = read_answer(sock)
        assert (seq, kind) == (1, ResponseType.UNSUPPORTED)
        sock.sendall(HEADER.pack(2, RequestType.READ, 0, 0, 4096))
        seq, kind, _flags, _sector, length = read_answer(sock)
        assert (seq, kind, length) == (2, ResponseType.SUCCESS, 4096)
        data = b""
        while len(data) < 4096:
            data += sock.recv(4096 - len(data))
        assert data == b"\x5a" * 4096
    assert served.status()["targets"]["disk"]["requests"]["other"] == 1


@pytest.mark.parametrize("header, reason", [
    (HEADER.pack(1, 99, 0, 0, 0), "protocol-type"),
    (HEADER.pack(1, 0, 1 << 40, 0, 4096), "protocol-flags"),
    (HEADER.pack(1, 0, 0, 0, 4097), "protocol-len"),
    (HEADER.pack(1, 0, 0, (1 << 64) - 1, 4096), "protocol-sector"),
])
def test_a_channel_breaking_the_protocol_ends_alone(served, nbd_session, header, reason):
    with _channel(nbd_session) as sock:
        sock.sendall(header)
        assert sock.recv(HEADER_SIZE) == b""  # closed, unanswered
    assert _rejected(served)["nbd-channel"][reason] == 1
    # Another channel of the same export is served.
    with _channel(nbd_session) as sock:
        sock.sendall(HEADER.pack(7, RequestType.READ, 0, 0, 512))
        assert read_answer(sock)[:2] == (7, ResponseType.SUCCESS)


def test_status_text_lists_rejected_inputs(served):
    from daemon_harness import DMUSERD, run

    _ask(served, b'{"cmd": "nope"}\n')
    text = run(*DMUSERD, "status", "--control-socket", served.control).stdout
    assert "rejected inputs" in text and "control-json: unknown-command 1" in text


def test_running_out_of_descriptors_does_not_end_the_export(served, nbd_session):
    """accept() failing with EMFILE (a peer opening channels without end) waits and retries."""
    import shutil
    import subprocess

    if not shutil.which("prlimit"):
        pytest.skip("prlimit (util-linux) is missing")
    open_fds = len(list((Path("/proc") / str(served.proc.pid) / "fd").iterdir()))
    subprocess.run(["prlimit", f"--pid={served.proc.pid}", f"--nofile={open_fds + 8}"], check=True)
    held = []
    try:
        for _ in range(30):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(nbd_session.state_dir / "ch.sock"))
            held.append(sock)
        deadline = time.monotonic() + 10
        while "accepting a channel failed" not in served.log_text():
            assert time.monotonic() < deadline, "the daemon never ran out of descriptors"
            time.sleep(0.05)
    finally:
        for sock in held:
            sock.close()
    with _channel(nbd_session) as sock:
        sock.sendall(HEADER.pack(9, RequestType.READ, 0, 0, 512))
        assert read_answer(sock)[:2] == (9, ResponseType.SUCCESS)
