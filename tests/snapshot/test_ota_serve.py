"""``dmuserd ota serve``: each new partition served as a snapshot target.

Through FUSE, a read-only loop device (``losetup -r``) on each served file
reads exactly the new image (SHA-256 = ``new_partition_info.hash``); the
COW files the daemon served then merge into copies of the old images with
``dmuserd cow merge``, which become the new images too. The same over NBD
when nbdkit is installed."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ota_vectors import DELTA, FULL, HASHES, OLD, source_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))
from daemon_harness import DMUSERD, need_root_tools, run  # noqa: E402


class OtaServe:
    """A ``dmuserd ota serve`` subprocess; ``wait(paths)`` returns once they exist and it is ready."""

    def __init__(self, workdir: Path, payload, *args) -> None:
        self.control = workdir / "control.sock"
        self.log_path = workdir / "serve.log"
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(
            DMUSERD + ["ota", "serve", str(payload), "--control-socket", str(self.control), *map(str, args)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.loops: list[str] = []

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def wait(self, paths, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ota serve exited with {self.proc.returncode}:\n{self.log_text()}")
            if self.control.exists() and all(Path(p).exists() for p in paths):
                return
            time.sleep(0.05)
        raise AssertionError(f"ota serve not ready in {timeout} s:\n{self.log_text()}")

    def loop_sha256(self, path) -> str:
        device = run("losetup", "-r", "--find", "--show", path).stdout.strip()
        self.loops.append(device)
        with open(device, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def stop(self) -> int:
        for device in self.loops:
            run("losetup", "-d", device, check=False)
        self.loops = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def ota_serve(tmp_path):
    started: list[OtaServe] = []

    def start(payload, *args) -> OtaServe:
        served = OtaServe(tmp_path, payload, *args)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()
    fuse = tmp_path / "fuse"
    if os.path.ismount(fuse):
        run("umount", "-l", fuse, check=False)


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("kind", ["delta", "full"])
def test_served_partitions_read_the_new_images_then_merge_into_the_old(tmp_path, ota_serve, kind, version):
    need_root_tools("losetup")
    src = source_dir(tmp_path) if kind == "delta" else None
    fuse, cows = tmp_path / "fuse", tmp_path / "cows"
    args = ["--export", f"fuse:{fuse}", "--cow-dir", cows, "--cow-version", version, "--compression", "lz4"]
    payload = DELTA if kind == "delta" else FULL
    served = ota_serve(payload, *args, *(["--source-dir", src] if src else []))
    served.wait([fuse / "kernel", fuse / "root"])
    for name in ("kernel", "root"):
        assert served.loop_sha256(fuse / name) == HASHES[name]
    # ota verify reads the served files
    verified = subprocess.run(DMUSERD + ["ota", "verify", payload, "--image-dir", fuse], capture_output=True,
                              text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert served.stop() == 0
    assert not os.path.ismount(fuse)
    # the COW files the daemon served, merged in place into copies of the old images
    for name in ("kernel", "root"):
        base = tmp_path / f"{name}.merged"
        old = OLD[name].read_bytes() if src else b""
        size = {"kernel": 4194304, "root": 12288}[name]
        base.write_bytes(old + bytes(max(0, size - len(old))))  # the partition resized first, as on a device
        merged = subprocess.run(DMUSERD + ["cow", "merge", "--base", base, cows / f"{name}.cow", "--offload", "cpu"],
                                capture_output=True, text=True)
        assert merged.returncode == 0, merged.stderr
        assert hashlib.sha256(base.read_bytes()).hexdigest() == HASHES[name]


def test_served_over_nbd(tmp_path, ota_serve):
    from nbd_harness import need_nbd_tools

    need_nbd_tools("nbdcopy")
    src = source_dir(tmp_path)
    sockets = tmp_path / "nbd"
    sockets.mkdir()
    served = ota_serve(DELTA, "--source-dir", src, "--export", f"nbd:{sockets}/{{name}}.sock,on-stop=stop")
    served.wait([sockets / "kernel.sock", sockets / "root.sock"])
    for name in ("kernel", "root"):
        data = subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sockets / name}.sock", "-"], check=True,
                              capture_output=True, timeout=60).stdout
        assert hashlib.sha256(data).hexdigest() == HASHES[name]
    assert served.stop() == 0
