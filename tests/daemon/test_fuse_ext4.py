"""FUSE + loop + ext4, for real: the first thing a user runs."""

from __future__ import annotations

import hashlib
import os
import random

from daemon_harness import mounted, need_root_tools, run

FILES = 26  # × 4 MiB = 104 MiB of known content
FILE_SIZE = 4 * 1024 * 1024


def _content(index: int) -> bytes:
    return random.Random(index).randbytes(FILE_SIZE)


def test_ext4_on_loop_on_fuse_file_backend(serve, tmp_path):
    need_root_tools("mkfs.ext4", "e2fsck", "mount", "cmp")
    image = tmp_path / "backing.img"
    daemon = serve(f"file:path={image},size=512M,create=1")
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
    # What the loop device reads is exactly what the backend stored.
    run("cmp", loop, image)
    status = daemon.status()["targets"]["disk"]
    assert status["errors"] == 0
    assert status["bytes_written"] >= FILES * FILE_SIZE


def test_fio_crc32c_verify_on_loop(serve, tmp_path):
    need_root_tools("fio")
    daemon = serve("memory:size=256M")
    loop = daemon.attach_loop(direct_io=True)
    result = run(
        "fio", "--name=verify", f"--filename={loop}", "--ioengine=libaio", "--direct=1",
        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=64M", "--verify=crc32c",
        "--verify_fatal=1", "--do_verify=1", "--output-format=json", check=False,
        cwd=tmp_path,  # fio leaves its verify state file in the working directory
    )
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    job = json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 64 * 1024 * 1024
    assert job["read"]["io_bytes"] >= 64 * 1024 * 1024  # the verify pass read it all back
