"""A snapshot target (base + Android COW) served through FUSE and loop."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys

import pytest

from daemon_harness import need_root_tools

BLOCK = 4096
BLOCKS = 2048  # 8 MiB


def _images(tmp_path):
    rng = random.Random(7)
    base = bytearray(rng.randbytes(BLOCKS * BLOCK))
    target = bytearray(base)
    for b in rng.sample(range(BLOCKS), 300):  # replaced blocks
        target[b * BLOCK:(b + 1) * BLOCK] = rng.randbytes(BLOCK)
    for b in rng.sample(range(BLOCKS), 100):  # zero blocks
        target[b * BLOCK:(b + 1) * BLOCK] = bytes(BLOCK)
    for _ in range(100):  # moved blocks (Copy)
        src, dst = rng.randrange(BLOCKS), rng.randrange(BLOCKS)
        target[dst * BLOCK:(dst + 1) * BLOCK] = base[src * BLOCK:(src + 1) * BLOCK]
    for b in rng.sample(range(BLOCKS), 50):  # nearly equal blocks (Xor)
        target[b * BLOCK + 100] ^= 0xFF
    (tmp_path / "old.img").write_bytes(base)
    (tmp_path / "new.img").write_bytes(target)
    return hashlib.sha256(target).hexdigest()


@pytest.mark.parametrize("version,compression", [(2, "gz"), (3, "lz4")])
def test_snapshot_over_fuse_reads_the_target(serve, tmp_path, version, compression):
    need_root_tools("losetup")
    want = _images(tmp_path)
    cow = tmp_path / "new.cow"
    subprocess.run([sys.executable, "-m", "dmuserd", "cow", "create", "--base", tmp_path / "old.img",
                    "--target", tmp_path / "new.img", "-o", cow, "--version", str(version),
                    "--compression", compression, "--xor"], check=True, capture_output=True)
    daemon = serve(f"snapshot:base={tmp_path / 'old.img'},cow={cow}")
    loop = daemon.attach_loop(direct_io=True)
    with open(loop, "rb") as f:
        got = hashlib.sha256(f.read()).hexdigest()
    assert got == want
    # snapuserd answers writes with an error; so do we, and the device stays up.
    with open(loop, "r+b", buffering=0) as f, pytest.raises(OSError):
        f.write(b"x" * BLOCK)
        os.fsync(f.fileno())
    assert daemon.status()["targets"]["disk"]["bytes_read"] >= BLOCKS * BLOCK
