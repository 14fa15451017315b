"""The NBD plugin's C helper (daemon/_nbd_exchange.c): one request on a channel in one GIL release.

Loaded by path as the plugin loads it (in nbdkit's Python, without the
dmuserd package), against a socket pair whose other end plays the daemon:
the frame goes out whole, the answer header comes back whole even in
pieces, a WRITE's data is in its slot before the frame goes out, a READ's
data is copied from the slot only when the answer is SUCCESS, and a daemon that closes the channel is an OSError (ECONNRESET)
so the plugin re-sends the request. With real nbdkit: the daemon's nbdkit
maps the helper, and a plugin in a tree without it does the same in Python.
"""

from __future__ import annotations

import errno
import importlib.machinery
import importlib.util
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nbd_harness import NbdSession, need_nbd_tools, qemu_io

DAEMON = Path(__file__).resolve().parents[2] / "daemon"
HEADER = struct.Struct("<5Q")


def _load():
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = DAEMON / ("_nbd_exchange" + suffix)
        if path.exists():
            loader = importlib.machinery.ExtensionFileLoader("_nbd_exchange", str(path))
            module = importlib.util.module_from_spec(importlib.util.spec_from_loader("_nbd_exchange", loader))
            loader.exec_module(module)
            return module.exchange
    pytest.skip("daemon/_nbd_exchange is not built (an optional extension: no C compiler at install time)")


@pytest.fixture
def exchange():
    return _load()


@pytest.fixture
def session(tmp_path):
    """A daemon serving an NBD export (and its nbdkit), stopped afterwards."""
    need_nbd_tools()
    (tmp_path / "export").mkdir()
    session = NbdSession(tmp_path / "export")
    yield session
    session.cleanup()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_read_answered_success_copies_the_slot(exchange, pair):
    plugin, daemon = pair
    frame = HEADER.pack(5, 0, 0, 8, 4096) + struct.pack("<Q", 3)
    slot, into = bytes(range(256)) * 16, bytearray(4096)
    answer = bytearray(40)

    def serve():
        assert daemon.recv(len(frame), socket.MSG_WAITALL) == frame
        reply = HEADER.pack(5, 0, 0, 8, 4096)
        daemon.send(reply[:13])  # the header in two pieces
        daemon.send(reply[13:])

    thread = threading.Thread(target=serve)
    thread.start()
    assert exchange(plugin.fileno(), frame, answer, memoryview(slot), into) == (5, 0)
    thread.join()
    assert into == slot and answer == HEADER.pack(5, 0, 0, 8, 4096)


def test_a_write_copies_into_the_slot_before_the_frame_goes_out(exchange, pair):
    plugin, daemon = pair
    slot = bytearray(8192)
    data = bytes(range(256)) * 16
    seen = []

    def serve():
        seen.append(daemon.recv(48, socket.MSG_WAITALL))
        seen.append(bytes(slot[:4096]))  # what the daemon finds in the slot once the frame is there
        daemon.send(HEADER.pack(9, 0, 0, 0, 4096))

    thread = threading.Thread(target=serve)
    thread.start()
    assert exchange(plugin.fileno(), b"w" * 48, bytearray(40), memoryview(data), memoryview(slot)[:4096], True) == (9, 0)
    thread.join()
    assert seen == [b"w" * 48, data] and slot[4096:] == bytes(4096)


def test_an_error_answer_leaves_the_destination_alone(exchange, pair):
    plugin, daemon = pair
    daemon.send(HEADER.pack(6, 1, 0, 0, 4096))  # ERROR
    into = bytearray(b"\xaa" * 4096)
    assert exchange(plugin.fileno(), b"x" * 48, bytearray(40), bytes(4096), into) == (6, 1)
    assert into == b"\xaa" * 4096


def test_a_request_without_data_and_a_closed_channel(exchange, pair):
    plugin, daemon = pair
    daemon.send(HEADER.pack(7, 0, 0, 0, 0))
    assert exchange(plugin.fileno(), b"f" * 48, bytearray(40), None, None) == (7, 0)
    assert daemon.recv(48) == b"f" * 48
    daemon.send(HEADER.pack(8, 0, 0, 0, 0)[:20])  # half a header, then the daemon is gone
    daemon.close()
    with pytest.raises(OSError) as info:
        exchange(plugin.fileno(), b"f" * 48, bytearray(40), None, None)
    assert info.value.errno in (errno.ECONNRESET, errno.EPIPE)


def test_bad_buffers_are_refused_before_any_io(exchange, pair):
    plugin, daemon = pair
    with pytest.raises(ValueError, match="header"):
        exchange(plugin.fileno(), b"x" * 48, bytearray(39), None, None)
    with pytest.raises(ValueError, match="length"):
        exchange(plugin.fileno(), b"x" * 48, bytearray(40), bytes(4096), bytearray(512))
    with pytest.raises(TypeError):
        exchange(plugin.fileno(), b"x" * 48, bytes(40), None, None)  # a read-only answer buffer
    daemon.setblocking(False)
    with pytest.raises(BlockingIOError):
        daemon.recv(1)  # nothing was sent


def _maps(pid: int, name: str) -> bool:
    return name in Path(f"/proc/{pid}/maps").read_text()


def test_the_plugin_uses_the_helper_and_does_the_same_in_python_without_it(session, tmp_path):
    """The daemon's nbdkit maps the helper; a second nbdkit, its plugin copied into a tree where the
    helper was never built, serves the same slotted channels in Python: both see each other's data,
    through the pool (it maps the daemon's pool), slot-sized and in between, READ and WRITE."""
    need_nbd_tools("qemu-io")
    _load()  # skips where the helper was not built: nothing to compare with
    session.start("memory:size=64M")
    assert _maps(session.nbdkit_pid(), "_nbd_exchange")
    tree = tmp_path / "dmuserd"
    for name in ("__init__.py", "errors.py"):
        shutil.copy(DAEMON.parent / name, _mkdir(tree) / name)
    shutil.copytree(DAEMON.parent / "protocol", tree / "protocol", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(DAEMON / "nbdkit_plugin.py", _mkdir(tree / "daemon") / "nbdkit_plugin.py")
    state, nbd = session.state_dir, tmp_path / "python.sock"
    nbdkit = subprocess.Popen(["nbdkit", "--foreground", "--unix", str(nbd), "python", str(tree / "daemon/nbdkit_plugin.py"),
                               f"channel={state / 'ch.sock'}", f"shm={state / 'shm.sock'}", f"size={64 << 20}",
                               "caps=read,write,flush"], stderr=subprocess.PIPE, text=True)
    try:
        while not nbd.exists():
            assert nbdkit.poll() is None, nbdkit.stderr.read()
            time.sleep(0.02)
        python = f"nbd+unix:///?socket={nbd}"
        qemu_io(python, "write -P 0x51 0 1M", "write -P 0x52 1M 4k", "write -P 0x53 2M 128k")
        qemu_io(session.uri, "read -P 0x51 0 1M", "read -P 0x52 1M 4k", "read -P 0x53 2M 128k",
                "write -P 0x54 4M 1M", "write -P 0x55 5M 64k")
        qemu_io(python, "read -P 0x54 4M 1M", "read -P 0x55 5M 64k", "read -P 0x51 0 1M")
        assert not _maps(nbdkit.pid, "_nbd_exchange") and _maps(nbdkit.pid, "dmuserd-nbd-pool")
    finally:
        nbdkit.kill()
        nbdkit.wait()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
