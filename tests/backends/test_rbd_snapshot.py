"""A COW served over an RBD base and merged into it online.

The snapshot backend reads its base as a file; the rbd image reaches it as
one through a first daemon's FUSE export of the rbd backend. The merge then
writes the base's blocks back through FUSE into the image on the cluster.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys

import pytest
import trio

from daemon_harness import ServedDaemon, need_root_tools
from dmuserd.snapshot.backend import SnapshotBackend
from dmuserd.snapshot.merge_control import MergeState

BLOCK = 4096
BLOCKS = 2048  # 8 MiB


def _images(tmp_path) -> tuple[bytes, bytes]:
    rng = random.Random(25)
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
    return bytes(base), bytes(target)


@pytest.fixture
def rbd_as_file(tmp_path):
    started: list[ServedDaemon] = []

    def start(spec: str) -> ServedDaemon:
        need_root_tools("losetup")
        workdir = tmp_path / f"rbd-daemon{len(started)}"
        workdir.mkdir()
        daemon = ServedDaemon(workdir, spec)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.cleanup()


async def test_cow_over_an_rbd_base_served_and_merged_into_it(ceph_cluster, rbd_as_file, tmp_path):
    old, new = _images(tmp_path)
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(new)
    image = ceph_cluster.import_image(tmp_path / "old.img")
    cow = tmp_path / "new.cow"
    subprocess.run([sys.executable, "-m", "dmuserd", "cow", "create", "--base", tmp_path / "old.img",
                    "--target", tmp_path / "new.img", "-o", cow, "--xor"], check=True, capture_output=True)
    rbd_daemon = rbd_as_file(ceph_cluster.spec(image))
    base = rbd_daemon.path  # the rbd image, as a file
    assert base.read_bytes() == old

    backend = SnapshotBackend(base, cow, offload="cpu")
    try:
        assert hashlib.sha256(await backend.read(0, len(new))).digest() == hashlib.sha256(new).digest()
        async with trio.open_nursery() as nursery:
            backend.merge.start(nursery)
        assert backend.merge.state is MergeState.MERGED, backend.merge.error
        assert await backend.read(0, len(new)) == new
    finally:
        await backend.close()
    status = rbd_daemon.status()["targets"]["disk"]
    assert status["errors"] == 0 and status["bytes_written"] > 0
    assert rbd_daemon.terminate() == 0  # a clean stop flushes and closes the image
    # The merged image on the cluster is the new one, byte for byte.
    assert ceph_cluster.export(image, tmp_path / "merged.img").read_bytes() == new
