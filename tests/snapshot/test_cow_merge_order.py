"""The merge order per the spec: sequence data first; without it Copy/Xor
in file order; the rest ascending (v3 without sequence data: file order)."""

from cow_helpers import BS, build_v2, build_v3, pattern_block

from dmuserd.snapshot.cow import CowReader, CowWriter, OpType

C, R, Z, S, X = OpType.COPY, OpType.REPLACE, OpType.ZERO, OpType.SEQUENCE, OpType.XOR
OPS = [(R, 5, None, pattern_block(5)), (C, 9, 20), (Z, 2, 0), (X, 7, 7 * BS, pattern_block(7)), (Z, 1, 0)]


def order(path):
    with CowReader(path) as r:
        return [(op.type, op.new_block) for op in r.merge_order()]


def test_v2_without_sequence(tmp_path):
    build_v2(tmp_path / "c", OPS)
    assert order(tmp_path / "c") == [(C, 9), (X, 7), (Z, 1), (Z, 2), (R, 5)]


def test_v3_without_sequence_keeps_file_order_for_the_rest(tmp_path):
    build_v3(tmp_path / "c", OPS)
    assert order(tmp_path / "c") == [(C, 9), (X, 7), (R, 5), (Z, 2), (Z, 1)]


def test_sequence_data_goes_first_in_its_order(tmp_path):
    seq = b"".join(b.to_bytes(4, "little") for b in (7, 9))
    build_v2(tmp_path / "a", [(S, 0, None, seq)] + OPS)
    assert order(tmp_path / "a") == [(X, 7), (C, 9), (Z, 1), (Z, 2), (R, 5)]
    build_v3(tmp_path / "b", OPS, sequence=[7, 9])
    assert order(tmp_path / "b") == [(X, 7), (C, 9), (Z, 1), (Z, 2), (R, 5)]


def test_long_v2_sequence_spans_several_ops(tmp_path):
    n = 5000  # AOSP puts at most 2048 entries in one sequence op
    w = CowWriter(tmp_path / "c", version=2, buffer_size=0)
    w.add_sequence_data(range(n))
    for b in range(n):
        w.add_copy(b, b + 1)  # a shift down: block b+1 is read before it is overwritten
    w.finalize()
    with CowReader(tmp_path / "c") as r:
        assert r.counts()["sequence"] == 3
        assert r.sequence == list(range(n))
        assert [op.new_block for op in r.merge_order()] == r.sequence
