"""``cow create`` throughput: MB/s of target image scanned.

A base image and a target made from it with mixed changes (about 10 % of
the blocks: moved blocks, zeroed blocks, blocks differing in a few bytes,
new random data, swapped pairs that form copy cycles) are diffed into a COW
file, once plainly (v2, no compression) and once the heavy way (v3, lz4,
``--xor``). Anchors, measured in the same run on the same (page-cached)
target: ``sha256sum`` and a plain read with 1 MiB preads. ``cow create``
reads the base and the target and hashes every block, so it cannot beat a
plain read; the ratios say how close it gets.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile

TITLE = "cow create: MB/s of target scanned (1 GiB mixed changes; quick: 64 MiB)"

BS = 4096
CHUNK = 1 << 20


def _make_images(directory: str, size: int, seed: int = 6) -> tuple[str, str]:
    rng = random.Random(seed)
    base_path, target_path = os.path.join(directory, "base.img"), os.path.join(directory, "target.img")
    nblocks = size // BS
    with open(base_path, "wb") as base:
        for _ in range(size // CHUNK):
            base.write(rng.randbytes(CHUNK))
    shutil.copyfile(base_path, target_path)
    with open(base_path, "rb") as base, open(target_path, "r+b") as target:
        for _ in range(nblocks // 10):
            block, kind = rng.randrange(nblocks), rng.randrange(5)
            if kind == 0:  # moved: a copy of another base block
                source = rng.randrange(nblocks)
                data = os.pread(base.fileno(), BS, source * BS)
            elif kind == 1:
                data = bytes(BS)
            elif kind == 2:  # a few bytes differ
                data = bytearray(os.pread(base.fileno(), BS, block * BS))
                i = rng.randrange(BS - 32)
                data[i : i + 32] = rng.randbytes(32)
            elif kind == 3:  # new, compressible data
                data = bytes([rng.randrange(8)]) * BS
            else:  # a swapped pair: a copy cycle
                other = rng.randrange(nblocks)
                os.pwrite(target.fileno(), os.pread(base.fileno(), BS, block * BS), other * BS)
                data = os.pread(base.fileno(), BS, other * BS)
            os.pwrite(target.fileno(), bytes(data), block * BS)
    return base_path, target_path


def _plain_read(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while chunk := os.pread(fd, CHUNK, offset):
            offset += len(chunk)
    finally:
        os.close(fd)


def run(quick: bool) -> dict:
    from bench.run import Skip, best_seconds

    from dmuserd.snapshot._cow_tools import create_cow, verify_cow

    if shutil.which("sha256sum") is None:
        raise Skip("sha256sum is not installed")
    size = (64 if quick else 1024) << 20
    repeat = 2 if quick else 1
    mb = size / 1e6
    with tempfile.TemporaryDirectory(prefix="dmuserd-bench-cow-") as tmp:
        base, target = _make_images(tmp, size)
        _plain_read(base)  # warm the page cache: every measurement reads cached data
        _plain_read(target)
        cow = os.path.join(tmp, "t.cow")

        plain = best_seconds(lambda: create_cow(base, target, cow, progress=False), repeat)
        stats = create_cow(base, target, cow, progress=False)
        heavy = best_seconds(
            lambda: create_cow(base, target, cow, version=3, compression="lz4", xor=True, progress=False), repeat
        )
        assert verify_cow(base, target, cow, progress=False) is None, "the benchmark COW file is wrong"
        cow_bytes = os.path.getsize(cow)

        sha = best_seconds(
            lambda: subprocess.run(["sha256sum", target], check=True, capture_output=True), repeat
        )
        read = best_seconds(lambda: _plain_read(target), repeat)

    figures = {
        "cow_create_v2_mbps": round(mb / plain, 1),
        "cow_create_v3_lz4_xor_mbps": round(mb / heavy, 1),
    }
    anchors = {"sha256sum_mbps": round(mb / sha, 1), "plain_read_mbps": round(mb / read, 1)}
    return {
        "figures": figures,
        "anchors": anchors,
        "ratios": {
            "v2_vs_sha256sum": round(sha / plain, 3),
            "v3_lz4_xor_vs_sha256sum": round(sha / heavy, 3),
            "v2_vs_plain_read": round(read / plain, 3),
        },
        "targets": {"v2_vs_sha256sum": 0.25, "v3_lz4_xor_vs_sha256sum": 0.1},
        "units": {**{k: "MB/s" for k in figures}, **{k: "MB/s" for k in anchors}},
        "notes": (
            f"{size >> 20} MiB base and target, page-cached; changed blocks: "
            f"{stats['copy']} copy, {stats['zero']} zero, {stats['replace']} replace "
            f"({stats['cycles_broken']} copy cycles broken), {stats['unchanged']} unchanged; "
            f"v3 lz4 --xor COW file {cow_bytes >> 20} MiB; best of {repeat}"
        ),
    }
