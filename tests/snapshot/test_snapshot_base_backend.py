"""A snapshot whose base is a backend (snapshot/base_backend.py), without a cluster: the ``file`` backend.

The RBD case runs in tests/backends/test_rbd_snapshot.py against a local
Ceph cluster; these checks cover the same adapters on any machine: reads
through the backend (Xor ops read the base at byte offsets no block
boundary aligns), the online merge writing and flushing the backend, a
read-only base refused for the merge, and how a ``base=`` value is told
from a path.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import trio

from dmuserd.backends import BackendError
from dmuserd.snapshot.backend import SnapshotBackend
from dmuserd.snapshot.base_backend import parse_base_spec
from dmuserd.snapshot.merge import MergeUnsafeError

BLOCK = 4096
BLOCKS = 512  # 2 MiB


@pytest.fixture
def update(tmp_path):
    """(the old image's path, the COW file, the new bytes): Replace, Zero, Copy and Xor ops."""
    rng = random.Random(7)
    old = bytearray(rng.randbytes(BLOCKS * BLOCK))
    new = bytearray(old)
    for b in rng.sample(range(BLOCKS), 60):
        new[b * BLOCK:(b + 1) * BLOCK] = rng.randbytes(BLOCK)
    for b in rng.sample(range(BLOCKS), 20):
        new[b * BLOCK:(b + 1) * BLOCK] = bytes(BLOCK)
    for _ in range(20):
        src, dst = rng.randrange(BLOCKS), rng.randrange(BLOCKS)
        new[dst * BLOCK:(dst + 1) * BLOCK] = old[src * BLOCK:(src + 1) * BLOCK]
    for b in rng.sample(range(BLOCKS), 20):
        new[b * BLOCK + 100] ^= 0xFF
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(new)
    cow = tmp_path / "new.cow"
    subprocess.run([sys.executable, "-m", "dmuserd", "cow", "create", "--base", tmp_path / "old.img",
                    "--target", tmp_path / "new.img", "-o", cow, "--xor"], check=True, capture_output=True)
    return tmp_path / "old.img", cow, bytes(new)


async def test_a_file_backend_base_is_read_and_merged_through_the_backend(update):
    old, cow, new = update
    backend = SnapshotBackend.from_options({"base": f"file:path={old}", "cow": str(cow), "offload": "cpu"})
    try:
        assert backend.base_backend is not None and backend.base_backend.name == "file"
        assert await backend.read(0, len(new)) == new
        for offset in (512, BLOCK * 100 + 1536, len(new) - 512):  # small reads: in worker threads too
            assert await backend.read(offset, 512) == new[offset:offset + 512]
        assert backend.describe()["base_backend"]["backend"] == "file"
        async with trio.open_nursery() as nursery:
            backend.merge.start(nursery)
        assert backend.merge.describe()["state"] == "merged", backend.merge.error
        assert await backend.read(0, len(new)) == new
        assert await backend.read(BLOCK * 7 + 512, 512) == new[BLOCK * 7 + 512:BLOCK * 7 + 1024]
    finally:
        await backend.close()
    assert old.read_bytes() == new  # the merge went through the backend into the file


async def test_a_read_only_backend_base_serves_and_refuses_the_merge(update):
    old, cow, new = update
    before = old.read_bytes()
    backend = SnapshotBackend.from_options({"base": f"file:path={old}:readonly=1", "cow": str(cow)})
    try:
        assert await backend.read(0, len(new)) == new
        with pytest.raises(MergeUnsafeError, match=r"cannot write \(read-only\?\)"):
            backend.merge.check_startable()
    finally:
        await backend.close()
    assert old.read_bytes() == before


def test_a_base_backend_that_cannot_open_is_an_error_naming_the_base(update, tmp_path):
    _, cow, _ = update
    with pytest.raises(BackendError, match=r"base file:path=.*nothere.img: .*nothere"):
        SnapshotBackend.from_options({"base": f"file:path={tmp_path}/nothere.img", "cow": str(cow)})


def test_what_names_a_backend_and_what_is_a_path(tmp_path):
    assert parse_base_spec("rbd:pool=p:image=i:conf=/etc/ceph/ceph.conf") == (
        "rbd", {"pool": "p", "image": "i", "conf": "/etc/ceph/ceph.conf"})
    assert parse_base_spec("file:path=/srv/a.img") == ("file", {"path": "/srv/a.img"})
    assert parse_base_spec("/srv/old.img") is None
    assert parse_base_spec("super.img::system_a") is None  # an image locator
    assert parse_base_spec("nosuchbackend:a=1") is None  # not a registered backend: a path
    assert parse_base_spec("rbd:pool") is None  # not key=value words
    odd = tmp_path / "file:path=x"
    odd.write_bytes(b"")
    assert parse_base_spec(str(odd)) is None  # a path that exists is a file, whatever its name
