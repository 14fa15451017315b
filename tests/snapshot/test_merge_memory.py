"""The merge's op index is packed: memory per op stays far below what an
object per op costs, whatever the number of ops.

A :class:`CowOp` with its ints and the lists holding it costs about 300
bytes an op (the merge used to hold several such lists: ~360 B an op
measured); the packed columns, the merge order and the progress sums cost
about 60 bytes, and the transient peak of building and checking the order
stays under :data:`PER_OP_LIMIT`. The bound is checked with tracemalloc
(Python allocations only, so no noise from other processes), for two op
counts, so that a fixed overhead cannot hide a per-op cost.
"""

from __future__ import annotations

import tracemalloc

import pytest

from cow_helpers import BS
from dmuserd.snapshot.cow import CowReader, CowWriter
from dmuserd.snapshot.merge import plan_merge

#: bytes an op may cost at the peak of reading a COW file and planning its merge
PER_OP_LIMIT = 160


def _many_ops_cow(path, n: int) -> int:
    """A COW file of ``n`` data-less ops (a third Copy in sequence order, the
    rest Zero), over a base of ``2 * n`` blocks; returns the base size."""
    copies = n // 3
    with CowWriter(path, version=2, buffer_size=2 << 20) as w:
        # new block 2i copies base block n + i: sources nobody overwrites
        w.add_sequence_data(2 * i for i in range(copies))
        for i in range(copies):
            w.add_copy(2 * i, n + i)
        for b in range(2 * copies, 2 * copies + n - copies):
            w.add_zero(b)
        w.finalize()
    return 2 * n * BS


def _plan_peak(path, base_size: int) -> tuple[int, int]:
    """(tracemalloc peak of reading ``path`` and planning its merge, ops)."""
    tracemalloc.start()
    try:
        with CowReader(path, check_merge=False) as reader:
            plan = plan_merge(reader, base_size)
            ops = plan.total_ops
            assert plan.ordered == ops // 3
            assert plan.op(0).new_block == 0 and plan.op(ops - 1).new_block == 2 * (ops // 3) + ops - ops // 3 - 1
        return tracemalloc.get_traced_memory()[1], ops
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("n", [20_000, 60_000])
def test_merge_plan_memory_is_packed(tmp_path, n):
    path = tmp_path / "many.cow"
    base_size = _many_ops_cow(path, n)
    peak, ops = _plan_peak(path, base_size)
    assert ops == n
    assert peak / n < PER_OP_LIMIT, f"reading and planning {n} ops peaked at {peak} bytes, {peak / n:.0f} B an op"


def test_op_objects_are_not_built_for_a_merge(tmp_path):
    """The merge plan works from table rows: the reader's op objects are only
    made when asked for (and then they cost what the bound above forbids)."""
    path = tmp_path / "many.cow"
    n = 20_000
    base_size = _many_ops_cow(path, n)
    with CowReader(path, check_merge=False) as reader:
        plan_merge(reader, base_size)
        tracemalloc.start()
        try:
            ops = reader.merge_order()
            objects = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    assert len(ops) == n
    # the measure can fail: objects cost more than the packed bound
    assert objects / n > PER_OP_LIMIT
