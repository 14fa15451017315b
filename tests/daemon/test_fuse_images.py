"""The ``sparse`` and ``super`` backends for real: served over FUSE, a read-only loop device on the
served file mounts the file system inside (ext4 from a sparse image, EROFS from a logical partition
of a sparse super image) and reads exactly the raw image; bad specs are refused in one line."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from daemon_harness import mounted, need_root_tools, run

from dmuserd.backends import BackendError, Op, from_spec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "images"))
from lp_writer import SuperBuilder  # noqa: E402


def _tree(root: Path) -> None:
    r = random.Random(7)
    (root / "d").mkdir(parents=True)
    for i in range(30):
        (root / "d" / f"f{i}").write_bytes(r.randbytes(r.randrange(100, 50000)))
    (root / "text.txt").write_text("hello\n" * 5000)


def _need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (scripts/system-packages.txt)")


def _check_mount(device: str, mnt: Path, tree: Path) -> None:
    with mounted(device, mnt) as m:
        for path in tree.rglob("*"):
            if path.is_file():
                assert (m / path.relative_to(tree)).read_bytes() == path.read_bytes(), path


def test_sparse_backend_serves_a_mountable_ext4(serve, tmp_path):
    need_root_tools("losetup", "mount", "cmp")
    _need("mkfs.ext4", "img2simg")
    tree = tmp_path / "tree"
    _tree(tree)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", tree, tmp_path / "raw.img", "16M")
    run("img2simg", tmp_path / "raw.img", tmp_path / "sparse.img")
    assert (tmp_path / "sparse.img").stat().st_size < (tmp_path / "raw.img").stat().st_size
    daemon = serve(f"sparse:path={tmp_path / 'sparse.img'}")
    device = run("losetup", "-r", "--find", "--show", daemon.path).stdout.strip()
    daemon.loops.append(device)
    run("cmp", device, tmp_path / "raw.img")
    _check_mount(device, tmp_path / "mnt", tree)
    status = daemon.status()["targets"]["disk"]
    assert status["errors"] == 0 and status["bytes_read"] >= 16 << 20


def test_super_backend_serves_a_mountable_erofs_partition(serve, tmp_path):
    need_root_tools("losetup", "mount", "cmp")
    _need("mkfs.erofs", "img2simg")
    tree = tmp_path / "tree"
    _tree(tree)
    subprocess.run(["mkfs.erofs", "-zlz4", "--quiet", str(tmp_path / "v.erofs"), str(tree)], check=True)
    data = (tmp_path / "v.erofs").read_bytes()
    data += bytes(-len(data) % 4096)
    (tmp_path / "v.raw").write_bytes(data)
    b = SuperBuilder(size=16 << 20)
    b.add_partition("system_a", random.Random(1).randbytes(64 << 10))
    b.add_partition("vendor_a", data, pieces=3)  # three extents with gaps between them
    b.add_partition("vendor_b", b"")
    b.write(tmp_path / "super.img")
    run("img2simg", tmp_path / "super.img", tmp_path / "super_sparse.img")
    daemon = serve(f"super:path={tmp_path / 'super_sparse.img'},partition=vendor_a")
    device = run("losetup", "-r", "--find", "--show", daemon.path).stdout.strip()
    daemon.loops.append(device)
    run("cmp", device, tmp_path / "v.raw")
    _check_mount(device, tmp_path / "mnt", tree)


def test_bad_specs_are_refused(tmp_path):
    (tmp_path / "raw.img").write_bytes(bytes(8192))
    with pytest.raises(BackendError, match="not an Android sparse image"):
        from_spec(f"sparse:path={tmp_path / 'raw.img'}")
    with pytest.raises(BackendError, match="backend 'sparse': cannot open"):
        from_spec(f"sparse:path={tmp_path / 'missing.img'}")
    b = SuperBuilder(size=4 << 20)
    b.add_partition("system_a", bytes(8192))
    b.write(tmp_path / "super.img")
    with pytest.raises(BackendError, match=r"backend 'super': .*no partition 'odm_a'.*it has: system_a"):
        from_spec(f"super:path={tmp_path / 'super.img'},partition=odm_a")
    with pytest.raises(BackendError, match="no slot c"):
        from_spec(f"super:path={tmp_path / 'super.img'},partition=system_a,slot=c")
    with pytest.raises(BackendError, match="needs the option partition"):
        from_spec(f"super:path={tmp_path / 'super.img'}")
    with pytest.raises(BackendError, match=r"rule geometry-magic"):
        from_spec(f"super:path={tmp_path / 'raw.img'},partition=system_a")


def test_image_backends_read_at_any_sector_and_refuse_writes(tmp_path):
    b = SuperBuilder(size=4 << 20)
    data = random.Random(3).randbytes(96 << 10)
    b.add_partition("system_a", data, pieces=2, zero_sectors=8)
    b.write(tmp_path / "super.img")
    backend = from_spec(f"super:path={tmp_path / 'super.img'},partition=system_a")
    want = data + bytes(8 * 512)
    assert backend.size == len(want) and backend.block_size == 512
    assert Op.READ in backend.capabilities and Op.WRITE not in backend.capabilities

    async def reads():
        r = random.Random(4)
        for _ in range(300):
            first = r.randrange(len(want) // 512)
            count = r.randrange(1, min(64, len(want) // 512 - first) + 1)
            got = await backend.read(first * 512, count * 512)
            assert bytes(got) == want[first * 512 : (first + count) * 512]
        await backend.close()

    trio.run(reads)
