"""The notify protocol against a real AF_UNIX datagram listener (as systemd).

``dmuserd serve`` runs as a subprocess with ``NOTIFY_SOCKET`` pointing at a
socket this test reads and ``WATCHDOG_USEC`` set: READY arrives only once the
FUSE file exists, watchdog pings keep their deadline while a writer loads the
device, SIGHUP changes nothing, and SIGTERM gives STOPPING then exit 0 within
the stop bound with every acknowledged write in the backing file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from daemon_harness import DMUSERD, need_root_tools
from dmuserd.daemon.notify import Notifier, watchdog_interval
from dmuserd.daemon.runtime import STOP_GRACE_SECONDS
from dmuserd.daemon.service import _unescape_mountinfo, merge_percent, mount_fstype

BLOCK = 64 * 1024
WATCHDOG_USEC = 4_000_000  # systemd kills when a gap between pings exceeds this

WRITER = (
    "import mmap, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)\n"
    f"buf = mmap.mmap(-1, {BLOCK})\n"
    "i = 0\n"
    "while True:\n"
    f"    buf[:8] = i.to_bytes(8, 'little'); buf[8:] = bytes([i % 251]) * ({BLOCK} - 8)\n"
    f"    os.pwrite(fd, buf, (i % 1024) * {BLOCK})\n"
    "    print(i, flush=True); i += 1\n"
)


class Listener:
    """systemd's side: a datagram socket collecting (time, {key: value}) messages."""

    def __init__(self, path: str) -> None:
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.changed = trio.Event()

    async def run(self, probe, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Collect messages; ``probe()`` runs the moment READY=1 arrives."""
        await self.sock.bind(self.path)
        task_status.started()
        while True:
            data = await self.sock.recv(4096)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            if fields.get("READY") == "1":
                fields["_live_at_ready"] = str(probe())
            self.messages.append((trio.current_time(), fields))
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, key: str) -> dict[str, str]:
        while True:
            for _, fields in self.messages:
                if key in fields:
                    return fields
            await self.changed.wait()


async def test_ready_watchdog_status_and_graceful_stop(tmp_path):
    need_root_tools("losetup")
    image = tmp_path / "backing.img"
    fuse_dir = tmp_path / "fuse"
    fuse_file = str(fuse_dir / "disk")
    listener = Listener(str(tmp_path / "notify.sock"))
    env = dict(os.environ, NOTIFY_SOCKET=listener.path, WATCHDOG_USEC=str(WATCHDOG_USEC))
    log = open(tmp_path / "daemon.log", "w+")
    loop = writer = None
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run, lambda: os.path.exists(fuse_file))
        daemon = await trio.lowlevel.open_process(
            DMUSERD + ["serve", "--backend", f"file:path={image},size=64M,create=1", "--export", f"fuse:{fuse_dir}",
                       "--control-socket", str(tmp_path / "control.sock")],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            with trio.fail_after(60):
                ready = await listener.wait_for("READY")
            assert ready["_live_at_ready"] == "True", "READY=1 before the FUSE file existed"
            assert ready["STATUS"].startswith("serving 1 target: disk")
            loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", fuse_file],
                                  check=True, capture_output=True, text=True).stdout.strip()
            writer = await trio.lowlevel.open_process([sys.executable, "-c", WRITER, loop],
                                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            load_started = trio.current_time()
            await trio.sleep(3 * WATCHDOG_USEC / 1e6)  # several watchdog periods under load
            daemon.send_signal(signal.SIGHUP)  # no reload: nothing may change
            await trio.sleep(1)
            assert daemon.poll() is None, "SIGHUP stopped the daemon"
            daemon.send_signal(signal.SIGTERM)
            with trio.fail_after(60):
                stopping = await listener.wait_for("STOPPING")
            with trio.fail_after(STOP_GRACE_SECONDS + 20):  # the stop bound, plus process exit
                rc = await daemon.wait()
            output = b""
            with trio.fail_after(30):
                while chunk := await writer.stdout.receive_some(65536):
                    output += chunk
        finally:
            for proc in (writer, daemon):
                if proc is not None and proc.poll() is None:
                    proc.kill()
            if loop:
                subprocess.run(["losetup", "-d", loop], capture_output=True)
            if os.path.ismount(fuse_dir):
                subprocess.run(["umount", "-l", fuse_dir], capture_output=True)
            nursery.cancel_scope.cancel()
    log.seek(0)
    daemon_log = log.read()
    assert rc == 0, daemon_log
    assert stopping["STATUS"] == "stopping (SIGTERM)"
    assert "SIGHUP ignored" in daemon_log

    # Watchdog: pinged from READY to STOPPING with no gap systemd would punish.
    pings = [t for t, f in listener.messages if f.get("WATCHDOG") == "1"]
    assert len(pings) >= 3, listener.messages
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) < WATCHDOG_USEC / 1e6, f"watchdog gap {max(gaps):.2f} s under load (pings at {pings})"
    assert any(t > load_started for t in pings)

    # STATUS saw the load.
    statuses = [f["STATUS"] for _, f in listener.messages if "STATUS" in f and "IOPS" in f["STATUS"]]
    assert any(not s.endswith(" 0 IOPS") for s in statuses), statuses

    # Every acknowledged (O_DSYNC) write is in the backing file.
    acknowledged = [int(x) for x in output.split()]
    assert len(acknowledged) > 10, daemon_log
    latest: dict[int, int] = {}
    for i in acknowledged:
        latest[i % 1024] = i
    with open(image, "rb") as f:
        for slot, i in latest.items():
            f.seek(slot * BLOCK)
            block = f.read(BLOCK)
            # The slot holds write i, or a later one to the same slot that
            # reached the disk without being acknowledged (it was cut off by
            # the stop): never anything older, never a torn block.
            found = int.from_bytes(block[:8], "little")
            assert found >= i and found % 1024 == slot, f"acknowledged write {i} is not in the backing file ({found})"
            assert block[8:] == bytes([found % 251]) * (BLOCK - 8), f"slot {slot} is torn"
    assert not os.path.ismount(fuse_dir)
    backing = subprocess.run(["losetup", "-n", "-O", "BACK-FILE", loop], capture_output=True, text=True).stdout
    assert fuse_file not in backing, "the stop left the loop device attached"


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


async def test_ready_only_once_the_nbd_socket_accepts(tmp_path):
    import shutil

    if not shutil.which("nbdkit"):
        pytest.skip("nbdkit is not installed (apt-get install nbdkit nbdkit-plugin-python)")
    nbd_socket = str(tmp_path / "nbd" / "disk.sock")
    listener = Listener(str(tmp_path / "notify.sock"))
    env = dict(os.environ, NOTIFY_SOCKET=listener.path)
    log = open(tmp_path / "daemon.log", "w+")
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run, lambda: _accepts(nbd_socket))
        daemon = await trio.lowlevel.open_process(
            DMUSERD + ["serve", "--backend", "memory:size=16M", "--export", f"nbd:{nbd_socket},on-stop=stop",
                       "--control-socket", str(tmp_path / "control.sock")],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            with trio.fail_after(60):
                while daemon.poll() is None and not any("READY" in f for _, f in listener.messages):
                    await trio.sleep(0.05)
            log.seek(0)
            if "not available in this version" in log.read():
                pytest.skip("this version has no NBD export")
            ready = await listener.wait_for("READY")
            assert ready["_live_at_ready"] == "True", "READY=1 before the NBD socket accepted connections"
            daemon.send_signal(signal.SIGTERM)
            with trio.fail_after(STOP_GRACE_SECONDS + 30):
                rc = await daemon.wait()
        finally:
            if daemon.poll() is None:
                daemon.kill()
            nursery.cancel_scope.cancel()
    log.seek(0)
    assert rc == 0, log.read()


# -- the protocol pieces ---------------------------------------------------------------------


def test_notifier_sends_to_path_and_abstract_sockets(tmp_path):
    for address, bind_to in ((str(tmp_path / "n.sock"), str(tmp_path / "n.sock")),
                             (f"@dmuserd-test-{os.getpid()}", f"\0dmuserd-test-{os.getpid()}")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(bind_to)
            notifier = Notifier({"NOTIFY_SOCKET": address})
            assert notifier.ready("two\nlines")
            assert sock.recv(4096) == b"READY=1\nSTATUS=two lines"
            notifier.close()


def test_notifier_without_systemd_does_nothing(tmp_path):
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.watchdog() and notifier.watchdog_interval is None
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert gone.enabled and not gone.status("x")  # a vanished manager costs the message only


def test_watchdog_interval():
    assert watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({}) is None


@given(st.text(max_size=30), st.one_of(st.none(), st.text(max_size=10)))
def test_watchdog_interval_never_raises(usec, pid):
    environ = {"WATCHDOG_USEC": usec} | ({"WATCHDOG_PID": pid} if pid is not None else {})
    value = watchdog_interval(environ, pid=123)
    assert value is None or value > 0


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_mountinfo_unescape_round_trips(path):
    escaped = "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)
    assert _unescape_mountinfo(escaped) == path


def test_mount_fstype_reads_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /run rw,nosuid shared:5 - tmpfs tmpfs rw\n"
        "90 22 0:50 / /run/my\\040disk rw - fuse.dmuserd dmuserd rw,user_id=0\n"
    )
    assert mount_fstype("/run/my disk", str(info)) == "fuse.dmuserd"
    assert mount_fstype("/run", str(info)) == "tmpfs"
    assert mount_fstype("/nowhere", str(info)) is None


def test_merge_percent_shapes():
    assert merge_percent({"merge_percent": 42}) == 42.0
    assert merge_percent({"merge": {"done": 1, "total": 4}}) == 25.0
    assert merge_percent({"merge": {"percent": 99.5}}) == 99.5
    assert merge_percent({"merge": {"total": 0}}) is None
    assert merge_percent({"merge": "running"}) is None
    assert merge_percent({}) is None
