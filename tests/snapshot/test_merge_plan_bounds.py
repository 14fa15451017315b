"""plan_merge refuses an op writing past the end of the base, whatever its
size: a v3 Replace of several blocks (a compression factor) that starts
inside the base and ends past it, as a one-block op that lies past it."""

from __future__ import annotations

import pytest

from dmuserd.snapshot.cow import CowReader, CowWriter
from dmuserd.snapshot.merge import MergeUnsafeError, plan_merge

BS = 4096


def _cow(path, ops):
    with CowWriter(path, version=3, compression="none", compression_factor=4 * BS, op_count_max=16,
                   buffer_size=0) as w:
        for new_block, blocks in ops:
            w.add_replace(new_block, bytes([new_block + 1]) * (blocks * BS))
        w.finalize()


@pytest.mark.parametrize("ops, base_blocks, past", [
    ([(0, 1), (8, 4)], 12, None),  # the 4-block chunk ends at the base's last block
    ([(0, 1), (8, 4)], 11, 11),  # ... one block past it
    ([(0, 1), (12, 1)], 12, 12),  # a one-block op past it
    ([(0, 4), (4, 1)], 5, None),
])
def test_ops_past_the_base_are_refused(tmp_path, ops, base_blocks, past):
    path = tmp_path / "t.cow"
    _cow(path, ops)
    with CowReader(path) as reader:
        assert max(reader.table.factor) == (2 if any(n == 4 for _, n in ops) else 0)
        if past is None:
            plan = plan_merge(reader, base_blocks * BS)
            assert plan.total_blocks == sum(n for _, n in ops)
        else:
            with pytest.raises(MergeUnsafeError, match=f"writes new block {past}, past the end"):
                plan_merge(reader, base_blocks * BS)
