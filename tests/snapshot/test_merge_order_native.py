"""The merge order built in C (``snapshot/_cow_native.c``: ``rank_rows``,
``order_rows``) is the order the Python rules of ``_cow_order`` build, and
its ``column_max`` gives what ``OpTable.largest`` gives in Python.

test_cow_order_oracle checks the order against the rules as written, with
whichever path the build has (C where it is built). Here the same random
files, and files writing one block twice, big ones and a real COW file, go
through both paths: the same order, or the same error (rule and offset: on
a broken rule the C path hands back to Python, which names it).
"""

from __future__ import annotations

import random
from array import array
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cow_order_oracle import SEQ_OFFSET, files

from dmuserd.snapshot import _cow_order, _cow_table
from dmuserd.snapshot._cow_format import CowFormatError, CowOp, OpType
from dmuserd.snapshot._cow_order import SequenceData, check_unique_blocks, merge_order
from dmuserd.snapshot._cow_reader import CowReader
from dmuserd.snapshot._cow_table import OpTable
from dmuserd.snapshot.cow import CowWriter

pytestmark = pytest.mark.skipif(_cow_order._NATIVE is None,
                                reason="the optional _cow_native extension is not built (no C compiler at install)")

BS = 4096


def _outcome(fn, *args, **kwargs):
    try:
        result = fn(*args, **kwargs)
    except CowFormatError as exc:
        return ("error", exc.rule, exc.offset, str(exc))
    return ("ok", None if result is None else [op.index for op in result])


def _both_ways(fn, *args, **kwargs):
    """``fn``'s outcome with the C path and with Python alone: the same (returned)."""
    native = _outcome(fn, *args, **kwargs)
    with mock.patch.object(_cow_order, "_NATIVE", None):
        python = _outcome(fn, *args, **kwargs)
    assert native == python
    return native


@settings(max_examples=300, deadline=None)
@given(files())
def test_random_files_order_the_same_in_c(case):
    ops, sequence, version = case
    _both_ways(merge_order, ops, None if sequence is None else SequenceData(sequence, SEQ_OFFSET), version=version)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 2), st.sampled_from(list(OpType))), max_size=20))
def test_blocks_written_twice_are_refused_the_same_in_c(spec):
    """Overlapping ops (a block twice, chunks of several blocks), metadata rows among them."""
    ops = [CowOp(kind, new_block, 0, 0, 0, i, 100 + 16 * i, None, BS << factor, BS)
           for i, (new_block, factor, kind) in enumerate(spec)]
    _both_ways(check_unique_blocks, ops)


def test_big_file_orders_the_same_in_c():
    """62k ops with new blocks up to 2^32 - 1 (every pass of the C sort), a sequence naming
    copies and xors, replaces and zeros after: the same order, then the same errors once broken."""
    rng = random.Random(5)
    n = 62_000
    blocks = rng.sample(range(1 << 21, 1 << 32), n)  # sources lie below 2^20 blocks: nothing writes them
    ops = []
    for i, block in enumerate(blocks):
        if i < n // 2:
            kind = OpType.COPY if i % 2 else OpType.XOR
            source = rng.randrange(1 << 20) if kind == OpType.COPY else rng.randrange(1 << 20) * BS + i % 3
        else:
            kind, source = (OpType.REPLACE if i % 2 else OpType.ZERO), 0
        ops.append(CowOp(kind, block, source, 0, 0, i, 100 + 20 * i))
    ordered = [op.new_block for op in ops if op.type in (OpType.COPY, OpType.XOR)]
    for version, sequence in ((2, None), (3, None), (2, SequenceData(ordered, SEQ_OFFSET))):
        outcome = _both_ways(merge_order, ops, sequence, version=version)
        assert outcome[0] == "ok" and len(outcome[1]) == len(ops)
    # a copy reading the block an earlier copy writes; then a sequence entry named twice
    broken = list(ops)
    first = next(op for op in ops if op.type == OpType.COPY)
    late = [op for op in ops if op.type == OpType.COPY][-1]
    broken[late.index] = CowOp(OpType.COPY, late.new_block, first.new_block, 0, 0, late.index, late.offset)
    assert _both_ways(merge_order, broken, None, version=2)[1] == "source-overwritten"
    twice = SequenceData([*ordered, ordered[0]], SEQ_OFFSET)
    assert _both_ways(merge_order, ops, twice, version=2)[1] == "sequence"


def test_reader_takes_the_c_path(tmp_path):
    """A real COW file: the reader ranks and orders its ops in C (a reader that never called it
    would pass the comparisons above), to the order Python builds."""
    path = tmp_path / "t.cow"
    with CowWriter(path) as w:
        w.add_sequence_data([5, 3, 4])
        w.add_copy(5, 1)
        w.add_copy(3, 2)
        w.add_xor(4, bytes(BS), 6 * BS + 7)
        w.add_replace(9, b"r" * BS)
        w.add_zero(0, 1)
        w.finalize()
    calls = []
    real = _cow_order._NATIVE

    class Spy:
        def rank_rows(self, *args):
            ranked = real.rank_rows(*args)
            calls.append("rank" if ranked else "rank handed to Python")
            return ranked

        def order_rows(self, *args):
            ordered = real.order_rows(*args)
            calls.append("order" if ordered else "order handed to Python")
            return ordered

    with mock.patch.object(_cow_order, "_NATIVE", Spy()), CowReader(path) as reader:
        native = reader.merge_order_rows()
    with mock.patch.object(_cow_order, "_NATIVE", None), CowReader(path) as reader:
        python = reader.merge_order_rows()
        blocks = [reader.table.new_block[r] for r in python]
    assert calls == ["rank", "order"]
    assert native == python and isinstance(native, array)
    assert blocks == [5, 3, 4, 0, 9]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([int(t) for t in OpType]), st.integers(0, (1 << 64) - 1),
                          st.integers(-1, (1 << 63) - 1), st.integers(0, (1 << 32) - 1)), max_size=40),
       st.sampled_from([None, _cow_table._IS_DATA, bytes(256), bytes([int(OpType.COPY) == t for t in range(256)])]))
def test_largest_is_the_same_in_c(rows, kinds):
    """OpTable.largest (the reader's and the merge's range checks) over unsigned and signed columns,
    with a u32 column added (past 64 bits too) or not, filtered by type or not."""
    table = OpTable(BS)
    for op_type, new_block, data_offset, length in rows:
        table.append(op_type, new_block, 0, length, 0, 0, data_offset)

    def answers():
        return [table.largest(table.new_block, kinds), table.largest(table.data_offset, kinds),
                table.largest(table.new_block, kinds, plus=table.data_length),
                table.largest(table.data_offset, kinds, plus=table.data_length)]

    with mock.patch.object(_cow_table, "_NATIVE", None):
        python = answers()
    assert answers() == python
    if rows and kinds is None:
        assert python == [max(r[1] for r in rows), max(r[2] for r in rows), max(r[1] + r[3] for r in rows),
                          max(r[2] + r[3] for r in rows)]


def test_rank_rows_hands_blocks_past_32_bits_to_python():
    """rank_rows packs a new block and a row into 64 bits: a block of 2^32 or more is Python's to rank
    (OpTable.from_ops takes any), and both ways give the same ranks."""
    ops = [CowOp(OpType.REPLACE, block, 0, 0, 0, i, 100 + 20 * i) for i, block in
           enumerate([1 << 32, 7, (1 << 40) + 3, 0, (1 << 32) - 1])]
    table = OpTable.from_ops(ops, BS)
    assert _cow_order._NATIVE.rank_rows(table.type, table.new_block, table.factor, array("I", range(5)),
                                        _cow_order._IS_META, array("I")) is False
    fits = OpTable.from_ops(ops[1:2] + ops[3:], BS)
    ranked = array("I")
    assert _cow_order._NATIVE.rank_rows(fits.type, fits.new_block, fits.factor, array("I", range(3)),
                                        _cow_order._IS_META, ranked) is True
    assert list(ranked) == [1, 0, 2]
    assert list(_cow_order.check_unique_rows(table, range(5))) == [3, 1, 4, 0, 2]
