"""The snapshot backend serves base + COW: every read equals the rendered
image (aligned, unaligned, spanning, across v3 chunks); writes fail."""

import random

import pytest
from cow_helpers import BS, make_images, write

from dmuserd.backends import Op, from_spec
from dmuserd.errors import DmuserdError
from dmuserd.snapshot._cow_tools import create_cow, render_cow
from dmuserd.snapshot.backend import SnapshotBackend, SnapshotReadOnly
from dmuserd.snapshot.cow import CowFormatError, CowReader, OpType
from dmuserd.snapshot.view import SnapshotView

NBLOCKS = 96


@pytest.fixture(params=[dict(version=3, compression="zstd", compression_factor=4 * BS, xor=True),
                        dict(version=2, compression="gz", compression_level=1, xor=True)],
                ids=["v3-zstd-16k", "v2-gz"])
def snapshot(request, tmp_path):
    rng = random.Random(11)
    base, target = make_images(rng, NBLOCKS, 70)
    target = bytearray(target)
    target[40 * BS : 60 * BS] = bytes(range(256)) * (20 * BS // 256)  # a long Replace run: v3 chunks
    b, t = write(tmp_path / "base.img", base), write(tmp_path / "target.img", bytes(target))
    cow = tmp_path / "t.cow"
    create_cow(b, t, cow, **request.param)
    render_cow(b, cow, tmp_path / "out.img")
    rendered = (tmp_path / "out.img").read_bytes()
    assert rendered == bytes(target)
    return b, str(cow), rendered


async def test_reads_equal_the_rendered_image(snapshot):
    base, cow, rendered = snapshot
    backend = from_spec(f"snapshot:base={base},cow={cow}")
    assert isinstance(backend, SnapshotBackend)
    assert backend.size == len(rendered) and backend.block_size == 512
    assert backend.supports(Op.READ)
    rng = random.Random(1)
    try:
        for block in range(NBLOCKS):  # aligned blocks
            assert bytes(await backend.read(block * BS, BS)) == rendered[block * BS : (block + 1) * BS], block
        assert bytes(await backend.read(0, len(rendered))) == rendered  # everything at once
        for _ in range(200):  # sector-aligned, not block-aligned, spanning blocks and chunks
            start = rng.randrange(len(rendered) // 512) * 512
            length = rng.randrange(1, min(64, (len(rendered) - start) // 512) + 1) * 512
            got = bytes(await backend.read(start, length))
            assert got == rendered[start : start + length], (start, length)
    finally:
        await backend.close()


async def test_reads_across_v3_chunk_boundaries(snapshot):
    base, cow, rendered = snapshot
    backend = SnapshotBackend(base, cow, cache_bytes=BS)  # a tiny cache still reads right
    try:
        chunked = [op for op in backend.reader.data_ops if op.type == OpType.REPLACE and op.blocks > 1]
        if backend.reader.version == 3:
            assert chunked, "the fixture should produce multi-block chunks"
        for op in chunked:
            end = (op.new_block + op.blocks) * BS
            for start in (end - 512, end - BS - 512, op.new_block * BS + 512):
                got = bytes(await backend.read(start, 2048))
                assert got == rendered[start : start + 2048]
        assert backend.view._cache_bytes <= BS * 4
    finally:
        await backend.close()


async def test_writes_fail(snapshot):
    base, cow, rendered = snapshot
    backend = SnapshotBackend(base, cow)
    try:
        with pytest.raises(SnapshotReadOnly) as info:
            await backend.write(0, b"\0" * 512)
        assert isinstance(info.value, DmuserdError) and "read-only" in str(info.value)
        assert bytes(await backend.read(0, 512)) == rendered[:512]
    finally:
        await backend.close()


async def test_size_option_and_errors(snapshot, tmp_path):
    base, cow, rendered = snapshot
    grown = SnapshotBackend.from_options({"base": base, "cow": cow, "size": str(len(rendered) + 8 * BS)})
    try:
        assert grown.size == len(rendered) + 8 * BS
        assert bytes(await grown.read(len(rendered), 8 * BS)) == bytes(8 * BS)  # past the base: zeros
    finally:
        await grown.close()
    with CowReader(cow) as r:
        last = max(op.new_block + op.blocks for op in r.data_ops)
    with pytest.raises(CowFormatError) as info:
        SnapshotBackend(base, cow, size=(last - 1) * BS)
    assert info.value.rule == "block-outside-target"
    with pytest.raises(DmuserdError, match="cow"):
        SnapshotBackend.from_options({"base": base})
    with pytest.raises(DmuserdError, match="base image"):
        SnapshotBackend(str(tmp_path / "missing.img"), cow)


def test_view_lookup_and_merge_switch(snapshot):
    base, cow, rendered = snapshot
    with CowReader(cow) as r, SnapshotView(r, base) as v:
        base_bytes = open(base, "rb").read()
        for op in r.data_ops:
            for i in range(op.blocks):
                assert v.op_for_block(op.new_block + i) == (op, i)
        written = {op.new_block + i for op in r.data_ops for i in range(op.blocks)}
        for block in set(range(NBLOCKS)) - written:
            assert v.op_for_block(block) is None
        # mark a written block merged: it now reads the base
        op = r.merge_order()[-1]
        v.mark_merged(op)
        assert v.read_block(op.new_block) == base_bytes[op.new_block * BS : (op.new_block + 1) * BS]
