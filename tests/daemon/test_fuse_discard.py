"""Discard and write-zeroes travel loop → FUSE fallocate → dm-user → backend."""

from __future__ import annotations

import os


from daemon_harness import need_root_tools, run

MiB = 1024 * 1024


def _hole_at(path, offset: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_HOLE) == offset
    finally:
        os.close(fd)


def test_discard_punches_holes_and_zeroout_writes_zeros(serve, tmp_path):
    need_root_tools("blkdiscard")
    image = tmp_path / "backing.img"
    daemon = serve(f"file:path={image},size=64M,create=1")
    loop = daemon.attach_loop(direct_io=True)
    run("dd", "if=/dev/urandom", f"of={loop}", "bs=1M", "count=8", "oflag=direct")
    assert not _hole_at(image, 2 * MiB)
    run("blkdiscard", "-o", str(2 * MiB), "-l", str(MiB), loop)
    assert _hole_at(image, 2 * MiB), "discard did not punch a hole in the backing file"
    run("blkdiscard", "-z", "-o", str(4 * MiB), "-l", str(MiB), loop)
    with open(image, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(MiB) == bytes(MiB), "zero-out did not reach the backing file"
        f.seek(5 * MiB)
        assert f.read(4096) != bytes(4096)  # the neighbour kept its data
    requests = daemon.status()["targets"]["disk"]["requests"]
    assert requests["discard"] >= 1 and requests["write_zeroes"] >= 1
