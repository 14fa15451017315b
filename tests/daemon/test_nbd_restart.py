"""The NBD export survives its daemon: SIGKILL, a timeout, SIGTERM, re-attach.

The backend is a file, so what was written survives the daemon process and
a verify pass can tell whether an acknowledged write was lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

from daemon_harness import wait_until
from nbd_harness import nbdkit_alive, need_nbd_tools, qemu_io

#: The daemon timeout of the restart tests: dm-user's 4 s would do, but a
#: daemon's start on a loaded CI machine can take seconds, and what is tested
#: (requests wait, then the next daemon serves them) does not depend on it.
TIMEOUT = ",timeout=10"


def _fio(uri: str, cwd, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", "--verify_state_save=0",
         *options],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
    )


def test_sigkill_during_fio_then_restart_within_timeout(nbd_session, tmp_path):
    need_nbd_tools("fio")
    backend = f"file:path={tmp_path / 'disk.img'},size=64M,create=1"
    first = nbd_session.start(backend, TIMEOUT)
    nbdkit = nbd_session.nbdkit_pid()
    fio = _fio(nbd_session.uri, tmp_path, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=24M", "--rate_iops=2000",
               "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randrepeat=0")
    try:
        # fio is writing through this daemon (its write phase takes about 3 s, rate-limited)
        wait_until(lambda: first.requests()["write"] > 0 or fio.poll() is not None, "fio writes", 60)
        assert fio.poll() is None, fio.stdout.read()
        first.kill()
        second = nbd_session.start(backend, TIMEOUT)  # well within the daemon timeout
        out, _ = fio.communicate(timeout=120)
    finally:
        if fio.poll() is None:
            fio.kill()
    assert fio.returncode == 0, out  # verify_fatal: a bad block would fail fio
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0, out
    assert job["write"]["io_bytes"] >= 24 << 20
    assert job["read"]["io_bytes"] >= 24 << 20  # the verify pass checked every block written
    # The same nbdkit served the whole job; the second daemon re-attached to it.
    assert nbd_session.nbdkit_pid() == nbdkit
    assert any(e.get("event") == "re-attached to the running nbdkit" for e in second.log_events())
    assert second.requests()["write"] > 0  # the rest of the job went to the new daemon


def test_no_daemon_past_the_timeout_is_eio_then_a_later_daemon_serves(nbd_session, tmp_path):
    need_nbd_tools("qemu-io")
    backend = f"file:path={tmp_path / 'disk.img'},size=8M,create=1"
    first = nbd_session.start(backend, ",timeout=1")
    nbdkit = nbd_session.nbdkit_pid()
    qemu_io(nbd_session.uri, "write -P 0x3c 64k 64k")
    first.kill()
    result = qemu_io(nbd_session.uri, "read -P 0x3c 64k 64k", check=False)
    assert "Input/output error" in result.stdout + result.stderr
    assert nbdkit_alive(nbdkit)
    nbd_session.start(backend, ",timeout=1")
    qemu_io(nbd_session.uri, "read -P 0x3c 64k 64k", "write -P 0x3d 0 4k", "read -P 0x3d 0 4k")
    assert nbd_session.nbdkit_pid() == nbdkit


def test_a_request_waits_for_the_next_daemon(nbd_session, tmp_path):
    """A client connected before the daemon died is served by the next one."""
    need_nbd_tools("qemu-io")
    backend = f"file:path={tmp_path / 'disk.img'},size=8M,create=1"
    first = nbd_session.start(backend, TIMEOUT)
    qemu_io(nbd_session.uri, "write -P 0x42 0 1M")
    first.kill()
    results = {}
    reader = threading.Thread(target=lambda: results.update(r=qemu_io(nbd_session.uri, "read -P 0x42 0 1M", check=False)))
    reader.start()
    time.sleep(0.5)  # the read is now waiting for a daemon
    nbd_session.start(backend, TIMEOUT)
    reader.join(60)
    output = results["r"].stdout + results["r"].stderr
    assert "read 1048576/1048576" in output and "failed" not in output, output


def test_graceful_stop_keeps_nbdkit_for_the_next_daemon(nbd_session, tmp_path):
    need_nbd_tools("qemu-io")
    backend = f"file:path={tmp_path / 'disk.img'},size=8M,create=1"
    first = nbd_session.start(backend)
    nbdkit = nbd_session.nbdkit_pid()
    qemu_io(nbd_session.uri, "write -P 0x61 4k 4k")
    assert first.terminate() == 0
    assert nbdkit_alive(nbdkit)
    assert any(e.get("event", "").startswith("leaving nbdkit running") for e in first.log_events())
    nbd_session.start(backend)
    qemu_io(nbd_session.uri, "read -P 0x61 4k 4k")
    assert nbd_session.nbdkit_pid() == nbdkit


def test_restart_with_sigterm_under_fio(nbd_session, tmp_path):
    """``systemctl restart``: SIGTERM, then a new daemon; a running client never notices."""
    need_nbd_tools("fio")
    backend = f"file:path={tmp_path / 'disk.img'},size=64M,create=1"
    first = nbd_session.start(backend, TIMEOUT)
    fio = _fio(nbd_session.uri, tmp_path, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M",
               "--rate_iops=2000", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randrepeat=0")
    try:
        wait_until(lambda: first.requests()["write"] > 0 or fio.poll() is not None, "fio writes", 60)
        assert fio.poll() is None, fio.stdout.read()
        assert first.terminate() == 0, first.log_text()
        second = nbd_session.start(backend, TIMEOUT)
        out, _ = fio.communicate(timeout=120)
    finally:
        if fio.poll() is None:
            fio.kill()
    assert fio.returncode == 0, out
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] >= 16 << 20, out
    assert second.requests()["write"] > 0


def test_on_stop_stop_stops_nbdkit(nbd_session):
    daemon = nbd_session.start("memory:size=1M", ",on-stop=stop")
    nbdkit = nbd_session.nbdkit_pid()
    assert daemon.terminate() == 0
    assert not nbdkit_alive(nbdkit)
    assert not nbd_session.socket.exists()
    # Nothing is left to re-attach to: the next daemon starts a new nbdkit.
    nbd_session.start("memory:size=1M", ",on-stop=stop")
    assert nbd_session.nbdkit_pid() not in (None, nbdkit)


def test_reattach_refuses_a_different_size(nbd_session):
    first = nbd_session.start("memory:size=1M")
    first.kill()
    second = nbd_session.start("memory:size=2M", wait=False)
    assert second.proc.wait(30) == 1
    text = second.log_text()
    assert "still serves" in text and "size 1048576" in text and "Traceback" not in text
    assert nbdkit_alive(nbd_session.nbdkit_pid())


def test_nbdkit_crash_is_restarted(nbd_session):
    daemon = nbd_session.start("memory:size=1M")
    old = nbd_session.nbdkit_pid()
    os.kill(old, 9)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and nbd_session.nbdkit_pid() in (None, old):
        time.sleep(0.05)
    new = nbd_session.nbdkit_pid()
    assert new not in (None, old), daemon.log_text()
    nbd_session.nbdkit_pids.add(new)
    qemu_io(nbd_session.uri, "write -P 0x11 0 4k", "read -P 0x11 0 4k")
