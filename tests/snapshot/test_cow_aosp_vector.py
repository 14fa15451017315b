"""AOSP's frozen v2 test file decodes to exactly the ops its README lists,
merges in the documented order, renders correctly, and our writer
reproduces it byte for byte."""

import hashlib

from cow_helpers import AOSP_COW, AOSP_DATA, AOSP_SHA256, BS, merge_in_place, pattern_block

from dmuserd.snapshot._cow_tools import render_cow
from dmuserd.snapshot.cow import CowReader, CowWriter, OpType, xor_bytes
from dmuserd.snapshot.view import SnapshotView

# (type, new_block, source, data_length, data_offset) from inspect_cow -show_raw_ops
EXPECTED_RAW = [
    (OpType.COPY, 0, 5, 0, None),
    (OpType.REPLACE, 2, 2097290, 4096, 2097290),
    (OpType.LABEL, 0, 1, 0, None),
    (OpType.XOR, 50, 98314, 4096, 2101386),
    (OpType.CLUSTER, 0, 8192, 0, None),
    *[(OpType.ZERO, b, 0, 0, None) for b in (5, 6, 7, 8)],
    (OpType.CLUSTER, 0, 0, 0, None),
    *[(OpType.ZERO, b, 0, 0, None) for b in (9, 10, 11, 12)],
    (OpType.CLUSTER, 0, 0, 0, None),
    (OpType.ZERO, 13, 0, 0, None),
    (OpType.ZERO, 14, 0, 0, None),
    (OpType.LABEL, 0, 2, 0, None),
]


def test_vector_is_the_documented_file():
    with open(AOSP_COW, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == AOSP_SHA256


def test_header_and_footer():
    with CowReader(AOSP_COW) as r:
        h = r.header
        assert (h.major, h.minor, h.header_size, h.footer_size, h.op_size) == (2, 0, 38, 84, 20)
        assert (h.block_size, h.cluster_ops, h.num_merge_ops, h.buffer_size) == (4096, 5, 1, 2097152)
        assert r.footer == {"offset": 2105742, "ops_size": 360, "num_ops": 18}
        assert r.compression.name == "NONE"


def test_ops_match_the_readme():
    with CowReader(AOSP_COW) as r:
        got = [(op.type, op.new_block, op.source, op.data_length, op.data_offset) for op in r.ops]
        assert got == EXPECTED_RAW
        assert r.labels == [1, 2]
        assert r.counts() == {"copy": 1, "replace": 1, "zero": 10, "label": 2, "cluster": 3, "xor": 1, "sequence": 0}
        assert len(r.data_ops) == 13
        assert r.read_data(r.ops[1]) == AOSP_DATA
        assert r.read_data(r.ops[3]) == AOSP_DATA


def test_merge_order_is_snapuserds():
    with CowReader(AOSP_COW) as r:
        order = [(op.type, op.new_block) for op in r.merge_order()]
        assert order == [(OpType.COPY, 0), (OpType.XOR, 50), (OpType.REPLACE, 2)] + [
            (OpType.ZERO, b) for b in range(5, 15)
        ]
        assert r.num_merge_ops == 1
        # a resumed merge skips the first num_merge_ops ops
        pending = [(op.type, op.new_block) for op in r.iter_merge_ops()]
        assert pending == order[1:]


def test_render_against_a_synthetic_base(tmp_path):
    base = b"".join(pattern_block(i) for i in range(64))
    (tmp_path / "base.img").write_bytes(base)
    render_cow(tmp_path / "base.img", AOSP_COW, tmp_path / "out.img")
    out = (tmp_path / "out.img").read_bytes()
    block = lambda data, i: data[i * BS : (i + 1) * BS]  # noqa: E731
    assert len(out) == len(base)
    assert block(out, 0) == block(base, 5)
    assert block(out, 2) == AOSP_DATA
    assert block(out, 50) == xor_bytes(AOSP_DATA, base[98314 : 98314 + BS])
    for i in range(5, 15):
        assert block(out, i) == bytes(BS)
    untouched = set(range(64)) - {0, 2, 50} - set(range(5, 15))
    for i in untouched:
        assert block(out, i) == block(base, i), i
    # the in-place merge in merge order gives the same image
    assert merge_in_place(base, AOSP_COW) == out


def test_view_merged_ops_read_base(tmp_path):
    base = b"".join(pattern_block(i) for i in range(64))
    (tmp_path / "base.img").write_bytes(base)
    with CowReader(AOSP_COW) as r, SnapshotView(r, tmp_path / "base.img", merged_ops=r.num_merge_ops) as v:
        # the copy to block 0 counts as merged: block 0 is read from the base
        assert v.is_merged(0) and not v.is_merged(2)
        assert v.read_block(0) == base[:BS]
        v.mark_merged(2)
        assert v.read_block(2) == base[2 * BS : 3 * BS]


def test_writer_reproduces_the_vector(tmp_path):
    path = tmp_path / "cow_v2"
    w = CowWriter(path, version=2, cluster_ops=5, num_merge_ops=1)
    w.add_copy(0, 5)
    w.add_replace(2, AOSP_DATA)
    w.add_label(1)
    w.add_xor(50, AOSP_DATA, 24 * BS + 10)
    w.add_zero(5, 10)
    w.add_label(2)
    w.finalize()
    assert path.read_bytes() == open(AOSP_COW, "rb").read()
