"""``ota serve`` serves each partition as soon as its COW file is written and checks it while it is served
(the old image's SHA-256, the rendered partition's): the check's result is said per partition; a partition
whose check fails (an old image of the right size but other bytes, which a payload without per-operation
source hashes cannot tell before) is taken away and the command ends with one line naming it."""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from pathlib import Path

import pytest
from ota_vectors import BS, PartitionBuilder, write_payload
from test_ota_serve import OtaServe

from dmuserd.snapshot import _payload_proto as proto
from dmuserd.snapshot.payload import OpType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))
from daemon_harness import need_root_tools  # noqa: E402


def _material(d: Path) -> dict:
    """Two partitions; SOURCE_COPY ops without src_sha256_hash, old_partition_info without a hash."""
    r = random.Random(5)
    images = {}
    manifest = proto.DeltaArchiveManifest(block_size=BS, minor_version=8)
    blobs: list[bytes] = []
    for name, blocks in (("system", 96), ("vendor", 32)):
        old = r.randbytes(blocks * BS)
        new = bytearray(old)
        for k in range(0, blocks, 7):
            new[k * BS : k * BS + 8] = b"changed!"
        images[name] = (old, bytes(new))
        b = PartitionBuilder(manifest, name, old, bytes(new), blobs, source_hashes=False)
        for k in range(blocks):
            if k % 7:
                b.op(OpType.SOURCE_COPY, [(k, 1)], [(k, 1)])
            else:
                b.replace([(k, 1)])
    write_payload(d / "payload.bin", manifest, blobs)
    (d / "old").mkdir()
    for name, (old, _) in images.items():
        (d / "old" / f"{name}.img").write_bytes(old)
    return {"payload": d / "payload.bin", "old": d / "old", "images": images}


@pytest.fixture
def fuse_ready():
    need_root_tools("losetup")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: FUSE exports cannot be mounted here")


def test_partitions_are_served_then_checked(tmp_path, fuse_ready):
    m = _material(tmp_path)
    fuse = tmp_path / "fuse"
    served = OtaServe(tmp_path, m["payload"], "--source", m["old"], "--export", f"fuse:{fuse}")
    try:
        served.wait([fuse / "system", fuse / "vendor"])
        for name, (_, new) in m["images"].items():
            assert served.loop_sha256(fuse / name) == hashlib.sha256(new).hexdigest()
        deadline = time.monotonic() + 60
        while served.log_text().count(": checked, ") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        log = served.log_text()
        for name, (_, new) in m["images"].items():
            assert f"served as {name}; checking it" in log
            assert f"{name}: checked, the old image and the new partition match the payload (sha256 " \
                   f"{hashlib.sha256(new).hexdigest()})" in log
    finally:
        assert served.stop() == 0, served.log_text()


def test_a_partition_failing_its_check_is_taken_away_and_the_command_fails(tmp_path, fuse_ready):
    m = _material(tmp_path)
    old = bytearray(m["images"]["system"][0])
    old[3 * BS] ^= 0xFF  # a block the update copies: the rendered partition differs from the new build
    (m["old"] / "system.img").write_bytes(old)
    fuse = tmp_path / "fuse"
    served = OtaServe(tmp_path, m["payload"], "--source", m["old"], "--export", f"fuse:{fuse}")
    try:
        assert served.proc.wait(60) == 1, served.log_text()
        errors = [line for line in served.log_text().splitlines() if line.startswith("dmuserd: error:")]
        assert len(errors) == 1, served.log_text()
        assert "partition 'system': the converted COW renders to SHA-256" in errors[0]
        assert "the old image may not be the one the payload was made for" in errors[0]
        assert not os.path.ismount(fuse)
    finally:
        served.stop()
