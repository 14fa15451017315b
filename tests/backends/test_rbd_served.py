"""The rbd backend served by the real daemon: FUSE → loop → ext4, NBD with fio verify, an OSD outage under reads."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import time

import pytest

from daemon_harness import DMUSERD, ServedDaemon, mounted, need_root_tools, run, wait_until
from nbd_harness import fio_nbd, qemu_io  # the fixture nbd_session comes through conftest

FILES = 12
FILE_SIZE = 4 * 1024 * 1024


@pytest.fixture
def serve(tmp_path):
    started: list[ServedDaemon] = []

    def start(backend: str) -> ServedDaemon:
        need_root_tools("losetup", "mkfs.ext4", "e2fsck", "mount", "cmp")
        daemon = ServedDaemon(tmp_path, backend)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.cleanup()


def _content(index: int) -> bytes:
    return random.Random(index).randbytes(FILE_SIZE)


def test_ext4_on_loop_on_fuse_on_rbd(ceph_cluster, serve, tmp_path):
    image = ceph_cluster.new_image("256M")
    daemon = serve(ceph_cluster.spec(image))
    loop = daemon.attach_loop(direct_io=True)
    run("mkfs.ext4", "-q", "-F", loop)
    with mounted(loop, tmp_path / "mnt") as mnt:
        for i in range(FILES):
            (mnt / f"f{i}.bin").write_bytes(_content(i))
        os.sync()
    fsck = run("e2fsck", "-fn", loop, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
    with mounted(loop, tmp_path / "mnt") as mnt:
        for i in range(FILES):
            data = (mnt / f"f{i}.bin").read_bytes()
            assert hashlib.sha256(data).digest() == hashlib.sha256(_content(i)).digest(), f"f{i}.bin differs"
    status = daemon.status()["targets"]["disk"]
    assert status["errors"] == 0
    assert status["bytes_written"] >= FILES * FILE_SIZE
    assert (status["pool"], status["image"]) == ("rbd", image)
    assert status["latency"]["write"]["count"] > 0
    text = run(*DMUSERD, "status", "--control-socket", daemon.control).stdout
    assert f"rbd rbd/{image} on cluster {status['cluster']['fsid']}" in text and "write " in text, text
    # What the loop device reads is what the cluster stored (read by the rbd command).
    run("cmp", loop, ceph_cluster.export(image, tmp_path / "export.img"))


def test_nbd_fio_verify_on_rbd(ceph_cluster, nbd_session, tmp_path):
    if not __import__("shutil").which("fio"):
        pytest.skip("fio is missing")
    image = ceph_cluster.new_image("64M")
    daemon = nbd_session.start(ceph_cluster.spec(image))
    job = fio_nbd(nbd_session.uri, tmp_path, "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32M",
                  "--verify=crc32c", "--do_verify=1", "--randrepeat=0")
    assert job["_rc"] == 0, job["_stderr"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 32 << 20
    assert job["read"]["io_bytes"] >= 32 << 20  # the verify pass read it all back
    status = daemon.status()["targets"]["disk"]
    assert status["errors"] == 0 and status["timeouts"] == 0


def _disk(daemon) -> dict:
    return daemon.status()["targets"]["disk"]


def _wait_for_reads(daemon) -> None:
    """Until fio's reads reach the daemon (it may take a while to start on a loaded machine)."""
    before = _disk(daemon)["requests"]["read"]
    wait_until(lambda: _disk(daemon)["requests"]["read"] > before + 100, "fio's reads reach the daemon", 60)


def _reads(session, cwd, *, runtime: int) -> subprocess.Popen:
    """fio 4 KiB random reads over the export for ``runtime`` s, going on past errors (an outage's EIO)."""
    return subprocess.Popen(
        ["fio", "--name=reads", "--ioengine=nbd", f"--uri={session.uri}", "--rw=randread", "--bs=4k",
         "--iodepth=8", "--size=32M", "--time_based", f"--runtime={runtime}", "--continue_on_error=all",
         "--output-format=json"],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_osd_outage_under_reads_fails_requests_and_the_daemon_recovers(ceph_cluster, nbd_session, tmp_path):
    if not __import__("shutil").which("fio"):
        pytest.skip("fio is missing")
    image = ceph_cluster.new_image("64M")
    daemon = nbd_session.start(ceph_cluster.spec(image, timeout="2"))
    qemu_io(nbd_session.uri, "write -P 0xab 0 32M", "flush")
    reader = _reads(nbd_session, tmp_path, runtime=14)
    try:
        _wait_for_reads(daemon)
        with ceph_cluster.osd_paused():
            time.sleep(6)  # three times the backend's timeout: what is in flight fails with EIO
            # the daemon answers while the OSD does not
            wait_until(lambda: _disk(daemon)["timeouts"] > 0, "a read timed out while the OSD is frozen", 60)
            assert daemon.proc.poll() is None
        out, err = reader.communicate(timeout=120)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert daemon.proc.poll() is None, daemon.log_text()
    status = daemon.status()["targets"]["disk"]
    assert status["timeouts"] > 0 and status["errors"] > 0
    assert "not answered within 2s" in daemon.log_text()
    # Back: the data reads as written, through the same daemon and nbdkit.
    qemu_io(nbd_session.uri, "read -P 0xab 0 32M")
    after = daemon.status()["targets"]["disk"]
    assert after["errors"] == status["errors"]


def test_osd_killed_for_10s_under_reads_the_daemon_stays_up_and_recovers(ceph_cluster, nbd_session, tmp_path):
    if not __import__("shutil").which("fio"):
        pytest.skip("fio is missing")
    image = ceph_cluster.new_image("64M")
    daemon = nbd_session.start(ceph_cluster.spec(image, timeout="2"))
    qemu_io(nbd_session.uri, "write -P 0x5c 0 32M", "flush")
    reader = _reads(nbd_session, tmp_path, runtime=20)
    try:
        _wait_for_reads(daemon)
        with ceph_cluster.osd_killed():
            time.sleep(10)
            # Reads fail with EIO, none hangs (the timeout and the dispatcher's error are counted by two tasks).
            wait_until(lambda: (d := _disk(daemon))["timeouts"] > 0 and d["errors"] > 0, "reads failed with EIO", 60)
            assert daemon.proc.poll() is None
        out, err = reader.communicate(timeout=120)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert daemon.proc.poll() is None, daemon.log_text()
    errors = daemon.status()["targets"]["disk"]["errors"]
    # A new OSD process on the same disk: the same daemon reads the data back, no new error.
    qemu_io(nbd_session.uri, "read -P 0x5c 0 32M")
    assert daemon.status()["targets"]["disk"]["errors"] == errors
