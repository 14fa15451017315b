"""A COW served over an RBD base read straight from librbd, and merged into it online.

The snapshot backend's ``base`` names the rbd backend
(``base=rbd:pool=P:image=I:conf=C``): base reads are librbd reads, and the
online merge writes and flushes the image through librbd. Checked against
the local cluster: reads give the new image before, during and after the
merge, and ``rbd export`` of the merged image equals it byte for byte.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import subprocess
import sys

import pytest
import trio

from daemon_harness import DMUSERD, ServedDaemon, need_root_tools, run
from dmuserd.backends import BackendError, from_spec
from dmuserd.snapshot.backend import SnapshotBackend
from dmuserd.snapshot.merge import MergeUnsafeError

BLOCK = 4096
BLOCKS = 2048  # 8 MiB


def _images() -> tuple[bytes, bytes]:
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
def update(ceph_cluster, tmp_path):
    """(the rbd image holding the old bytes, the COW file, the old bytes, the new bytes)."""
    old, new = _images()
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(new)
    image = ceph_cluster.import_image(tmp_path / "old.img")
    cow = tmp_path / "new.cow"
    subprocess.run([sys.executable, "-m", "dmuserd", "cow", "create", "--base", tmp_path / "old.img",
                    "--target", tmp_path / "new.img", "-o", cow, "--xor"], check=True, capture_output=True)
    (tmp_path / "old.img").unlink()  # the base is on the cluster only
    return image, cow, old, new


def _base(cluster, image: str, **options: str) -> str:
    """A ``base=`` value naming the rbd backend (options separated by ':')."""
    return cluster.spec(image, **options).replace(",", ":")


async def test_cow_over_an_rbd_base_read_from_librbd_and_merged_into_it(ceph_cluster, update, tmp_path):
    image, cow, old, new = update
    backend = SnapshotBackend.from_options({"base": _base(ceph_cluster, image), "cow": str(cow), "offload": "cpu"})
    try:
        assert backend.size == len(new)
        assert hashlib.sha256(await backend.read(0, len(new))).digest() == hashlib.sha256(new).digest()
        # Small reads too (the event loop never reads an rbd base itself), at unaligned sectors.
        for offset in (0, 512, 4096 * 777 + 1536, len(new) - 512):
            assert await backend.read(offset, 512) == new[offset:offset + 512]
        base_status = backend.describe()["base_backend"]
        assert (base_status["pool"], base_status["image"]) == ("rbd", image)
        reads_before = base_status["latency"]["read"]["count"]
        assert reads_before > 0  # the base came from librbd

        rng = random.Random(7)
        checked = 0
        async with trio.open_nursery() as nursery:
            backend.merge.start(nursery)
            # Reads while the merge writes the image: always the new bytes.
            while backend.merge.describe()["state"] == "merging":
                offset = rng.randrange(BLOCKS) * BLOCK
                length = BLOCK * rng.randrange(1, 64)
                length = min(length, len(new) - offset)
                assert await backend.read(offset, length) == new[offset:offset + length], (offset, length)
                checked += 1
        assert backend.merge.describe()["state"] == "merged", backend.merge.error
        assert await backend.read(0, len(new)) == new
        assert await backend.read(4096 * 5 + 512, 512) == new[4096 * 5 + 512:4096 * 5 + 1024]
        status = backend.describe()
        lat = status["base_backend"]["latency"]
        assert lat["write"]["count"] > 0 and lat["flush"]["count"] > 0  # merge writes and syncs went to librbd
        assert status["base_backend"]["timeouts"] == 0
        assert status["summary"].startswith(f"base: rbd rbd/{image} on cluster ")
    finally:
        await backend.close()
    # The merged image on the cluster is the new one, byte for byte.
    assert ceph_cluster.export(image, tmp_path / "merged.img").read_bytes() == new
    assert checked >= 1  # the first read came while the merge was running


async def test_a_merge_the_cluster_stops_answering_fails_then_resumes_byte_exact(ceph_cluster, update, tmp_path):
    """The OSD freezes while the merge waits at a pause: the merge's next base I/O times
    out, the merge fails with the rbd error (the target and the process go on), reads fail
    with EIO meanwhile; once the OSD is back, starting the merge again resumes from what
    the COW file recorded and the image ends byte-exact."""
    image, cow, old, new = update
    backend = SnapshotBackend.from_options({"base": _base(ceph_cluster, image, timeout="2"), "cow": str(cow),
                                            "offload": "cpu"})
    try:
        async with trio.open_nursery() as nursery:
            backend.merge.start(nursery)
            backend.merge.pause()
            with trio.fail_after(60):
                while not backend.merge.parked:
                    await trio.sleep(0.01)
            with ceph_cluster.osd_paused():
                with pytest.raises(OSError) as caught:
                    await backend.read(0, 65536)
                assert caught.value.errno == errno.EIO
                backend.merge.resume()
                with trio.fail_after(60):
                    while backend.merge.describe()["state"] == "merging":
                        await trio.sleep(0.05)
        failed = backend.merge.describe()
        assert failed["state"] == "failed" and "not answered within 2s" in failed["error"], failed
        assert backend.describe()["base_backend"]["timeouts"] >= 2
        async with trio.open_nursery() as nursery:
            backend.merge.start(nursery)
        assert backend.merge.describe()["state"] == "merged", backend.merge.error
        assert await backend.read(0, len(new)) == new
    finally:
        await backend.close()
    assert ceph_cluster.export(image, tmp_path / "merged.img").read_bytes() == new


async def test_a_read_only_rbd_base_is_served_but_not_merged(ceph_cluster, update):
    image, cow, old, new = update
    backend = SnapshotBackend.from_options({"base": _base(ceph_cluster, image, readonly="1"), "cow": str(cow),
                                            "offload": "cpu"})
    try:
        assert await backend.read(0, len(new)) == new
        with pytest.raises(MergeUnsafeError, match=r"cannot write \(read-only\?\): a merge writes the base"):
            backend.merge.check_startable()
    finally:
        await backend.close()
    rbd = from_spec(ceph_cluster.spec(image, readonly="1"))
    try:
        assert await rbd.read(0, len(old)) == old  # untouched
    finally:
        await rbd.close()


def test_a_missing_rbd_base_image_is_a_backend_error_naming_it(ceph_cluster, update):
    _, cow, _, _ = update
    base = _base(ceph_cluster, "no-such-image", connect_timeout="5")
    with pytest.raises(BackendError, match=r"base rbd:pool=rbd:image=no-such-image.*no image 'no-such-image'"):
        SnapshotBackend.from_options({"base": base, "cow": str(cow)})


def test_served_snapshot_over_rbd_merged_online_by_the_daemon(ceph_cluster, update, tmp_path):
    need_root_tools("cmp")
    image, cow, old, new = update
    (tmp_path / "new.img").write_bytes(new)
    workdir = tmp_path / "daemon"
    workdir.mkdir()
    daemon = ServedDaemon(workdir, f"snapshot:base={_base(ceph_cluster, image)},cow={cow},offload=cpu")
    try:
        assert run("cmp", daemon.path, tmp_path / "new.img", check=False).returncode == 0
        merged = json.loads(run(*DMUSERD, "merge", "start", "--json", "--wait", "--control-socket", daemon.control,
                                "disk").stdout)
        assert merged["state"] == "merged", merged
        assert run("cmp", daemon.path, tmp_path / "new.img", check=False).returncode == 0
        text = run(*DMUSERD, "status", "--control-socket", daemon.control).stdout
        assert f"base: rbd rbd/{image} on cluster" in text and "latency mean/max" in text, text
        status = daemon.status()["targets"]["disk"]
        assert status["errors"] == 0 and status["base_backend"]["latency"]["write"]["count"] > 0
        assert daemon.terminate() == 0
    finally:
        daemon.cleanup()
    assert ceph_cluster.export(image, tmp_path / "merged.img").read_bytes() == new
