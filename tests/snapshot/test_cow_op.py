"""CowOp is a value: equal and hashed by its fields, immutable, with a repr naming them
(written out by hand for start-up time, it must keep what the frozen dataclass gave)."""

from __future__ import annotations

import pytest

from dmuserd.snapshot._cow_format import CowOp, OpType


def test_cow_op_is_a_value():
    op = CowOp(OpType.XOR, 7, 4096 * 3 + 5, 4096, 0, 2, 120, 9000)
    same = CowOp(OpType.XOR, 7, 4096 * 3 + 5, 4096, 0, 2, 120, data_offset=9000, chunk_size=4096, block_size=4096)
    assert op == same and hash(op) == hash(same) and len({op, same}) == 1
    for changed in (CowOp(OpType.COPY, 7, 3, 0, 0, 2, 120), CowOp(OpType.XOR, 7, 4096 * 3 + 5, 4096, 0, 2, 120, 9001),
                    CowOp(OpType.XOR, 7, 4096 * 3 + 5, 4096, 0, 2, 120, 9000, 8192)):
        assert op != changed
    assert op != (OpType.XOR, 7) and op.__eq__(object()) is NotImplemented
    assert repr(op) == ("CowOp(type=<OpType.XOR: 6>, new_block=7, source=12293, data_length=4096, compression=0, "
                        "index=2, offset=120, data_offset=9000, chunk_size=4096, block_size=4096)")
    assert (op.blocks, op.is_ordered) == (1, True)
    assert CowOp(OpType.REPLACE, 0, 0, 10, 0, 0, 0, 50, chunk_size=4 * 4096).blocks == 4
    assert CowOp(OpType.LABEL, 0, 3, 0, 0, 0, 0).blocks == 0


def test_cow_op_is_immutable():
    op = CowOp(OpType.COPY, 1, 2, 0, 0, 0, 38)
    with pytest.raises(AttributeError):
        op.new_block = 5
    with pytest.raises(AttributeError):
        del op.source
    with pytest.raises(AttributeError):
        op.extra = 1
    assert (op.new_block, op.source) == (1, 2)
