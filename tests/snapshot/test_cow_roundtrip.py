"""create → render equals the target, and the in-place merge in merge order
does too (which only holds if the ordering is safe), for every version,
compression, with and without Xor."""

import random

import pytest
from cow_helpers import BS, make_images, merge_in_place, pattern_block, write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmuserd.snapshot._cow_tools import _order, create_cow, render_cow, verify_cow
from dmuserd.snapshot.cow import Compression, CowReader, CowWriter, OpType

COMPRESSIONS = ["none", "gz", "brotli", "lz4", "zstd"]
SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))


def _roundtrip(tmp_path, seed, nblocks, changes, **options):
    rng = random.Random(seed)
    base, target = make_images(rng, nblocks, changes)
    b, t = write(tmp_path / "base.img", base), write(tmp_path / "target.img", target)
    cow = tmp_path / "t.cow"
    stats = create_cow(b, t, cow, **options)
    render_cow(b, cow, tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == target
    assert merge_in_place(base, cow) == target
    assert verify_cow(b, t, cow) is None
    with CowReader(cow) as r:
        assert r.version == options.get("version", 2)
        n_ops = {k: v for k, v in r.counts().items() if k in ("copy", "xor", "zero")}
        assert n_ops == {k: stats[k] for k in ("copy", "xor", "zero")}
    return stats


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("xor", [False, True])
def test_create_render_roundtrip(tmp_path_factory, version, compression, xor):
    @SETTINGS
    @given(seed=st.integers(0, 2**32), nblocks=st.integers(1, 40), changes=st.integers(0, 30))
    def check(seed, nblocks, changes):
        tmp = tmp_path_factory.mktemp("rt")
        level = {"brotli": 4, "gz": 6}.get(compression)
        stats = _roundtrip(tmp, seed, nblocks, changes, version=version, compression=compression,
                           compression_level=level, xor=xor)
        if not xor:
            assert stats["xor"] == 0

    check()


@pytest.mark.parametrize("factor", [BS * 4, BS * 64])
@pytest.mark.parametrize("compression", ["none", "zstd", "gz"])
def test_v3_compression_factors(tmp_path, factor, compression):
    rng = random.Random(factor)
    base = b"".join(pattern_block(i) for i in range(200))
    target = bytearray(base)
    target[3 * BS : 150 * BS] = bytes(rng.randrange(3) for _ in range(147 * BS))  # long Replace runs
    b, t = write(tmp_path / "b", base), write(tmp_path / "t", bytes(target))
    create_cow(b, t, tmp_path / "c", version=3, compression=compression, compression_factor=factor)
    with CowReader(tmp_path / "c") as r:
        chunks = {op.chunk_size for op in r.data_ops if op.type == OpType.REPLACE}
        assert max(chunks) == factor
    render_cow(b, tmp_path / "c", tmp_path / "o")
    assert (tmp_path / "o").read_bytes() == bytes(target)


@pytest.mark.parametrize("cluster_ops", [0, 2, 5, 200])
def test_v2_cluster_sizes(tmp_path, cluster_ops):
    _roundtrip(tmp_path, cluster_ops, 60, 50, version=2, cluster_ops=cluster_ops, compression="lz4", xor=True)


def test_moved_blocks_become_copies_and_cycles_are_broken():
    # 1->2->3->1 is a cycle of copies; 5 reads 6, which reads 7: a chain
    kinds = bytearray(10)
    sources = {1: 2, 2: 3, 3: 1, 5: 6, 6: 7}
    for b in sources:
        kinds[b] = OpType.COPY
    kinds[7] = OpType.XOR
    order, broken = _order(kinds, sources)
    assert broken == 1
    assert sum(1 for b in (1, 2, 3) if kinds[b] == OpType.REPLACE) == 1
    pos = {b: i for i, b in enumerate(order)}
    for b in order:  # every reader merges before the op overwriting its source
        src = sources.get(b)
        if src in pos:
            assert pos[b] < pos[src]
    assert set(order) == {b for b in range(10) if kinds[b] in (OpType.COPY, OpType.XOR)}


def test_compressed_blocks_store_raw_when_incompressible(tmp_path):
    rng = random.Random(7)
    noise = rng.randbytes(BS)
    for version in (2, 3):
        for algo in COMPRESSIONS:
            path = tmp_path / f"{version}{algo}"
            w = CowWriter(path, version=version, compression=algo, op_count_max=4, buffer_size=0)
            w.add_replace(0, noise)
            w.add_replace(1, bytes(BS))
            w.finalize()
            with CowReader(path) as r:
                noisy, zeros = r.data_ops
                raw_rule = version == 3 or algo in ("none", "lz4", "zstd")
                if raw_rule:
                    assert noisy.data_length == BS
                else:  # v2 gz/brotli keep the compressed form, even if larger
                    assert noisy.data_length > BS
                if algo != "none":
                    assert zeros.data_length < 100
                    assert r.compression == Compression.parse(algo)
                assert r.read_data(noisy) == noise and r.read_data(zeros) == bytes(BS)
