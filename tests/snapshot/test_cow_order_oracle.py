"""The merge order and its checks (``merge_order``) against a definitional
oracle written straight from the rules in ``_cow_order``'s module doc.

``merge_order_rows`` finds sequence entries through a dict and checks reads
against a set in one pass, and walks the order the slow way only to name
the op at fault; this proves, on random files (valid ones and ones breaking
each rule), that it gives the same order, or fails with the same rule at
the same offset, as the plain quadratic reading of the rules.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dmuserd.snapshot._cow_format import CowFormatError, CowOp, OpType
from dmuserd.snapshot._cow_order import SequenceData, merge_order

BS = 4096
ORDERED = (OpType.COPY, OpType.XOR)
SEQ_OFFSET = 1000


def _reads(op: CowOp) -> list[int]:
    if op.type == OpType.COPY:
        return [op.source]
    first, rem = divmod(op.source, BS)
    return [first, first + 1] if rem else [first]


def oracle(ops: list[CowOp], sequence: list[int] | None, version: int):
    """(ops in merge order) or (rule, offset) of the first rule broken."""
    if sequence:
        first = []
        for i, block in enumerate(sequence):
            hits = [op for op in ops if op.new_block == block]
            if not hits or hits[0] in first:
                return ("sequence", SEQ_OFFSET + 4 * i)
            first.append(hits[0])
        rest = sorted((op for op in ops if op not in first), key=lambda op: op.new_block)
    else:
        first = [op for op in ops if op.type in ORDERED]
        rest = [op for op in ops if op.type not in ORDERED]
        if version < 3:
            rest.sort(key=lambda op: op.new_block)
    order = first + rest
    prefix = 0
    while prefix < len(order) and order[prefix].type in ORDERED:
        prefix += 1
    for k in range(prefix):
        for block in _reads(order[k]):
            if any(order[j].new_block == block for j in range(k)):
                return ("source-overwritten", order[k].offset)
    for k in range(prefix, len(order)):
        if order[k].type in ORDERED:
            return ("ordered-after-unordered", order[k].offset)
    return order


@st.composite
def files(draw):
    n = draw(st.integers(0, 24))
    blocks = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n, unique=True))
    ops = []
    for index, new_block in enumerate(blocks):
        kind = draw(st.sampled_from([OpType.COPY, OpType.XOR, OpType.REPLACE, OpType.ZERO]))
        if kind == OpType.COPY:
            source = draw(st.integers(0, 40))
        elif kind == OpType.XOR:
            source = draw(st.integers(0, 40)) * BS + draw(st.sampled_from([0, 0, 1, BS - 1]))
        else:
            source = 0
        ops.append(CowOp(kind, new_block, source, 0, 0, index, 100 + 16 * index))
    version = draw(st.sampled_from([2, 3]))
    sequence = None
    if draw(st.booleans()):
        named = draw(st.permutations(blocks))
        named = named[: draw(st.integers(0, len(named)))]
        if draw(st.booleans()):  # prefer copies/xors first, as writers do
            named = [b for b in named if ops[blocks.index(b)].type in ORDERED] + \
                    [b for b in named if ops[blocks.index(b)].type not in ORDERED]
        damage = draw(st.sampled_from(["none", "none", "missing", "twice"]))
        if damage == "missing":
            named.insert(draw(st.integers(0, len(named))), draw(st.integers(41, 60)))
        elif damage == "twice" and named:
            named.insert(draw(st.integers(0, len(named))), draw(st.sampled_from(named)))
        sequence = named
    return ops, sequence, version


@settings(max_examples=400, deadline=None)
@given(files())
def test_merge_order_matches_the_rules(case):
    ops, sequence, version = case
    expected = oracle(ops, sequence, version)
    seq = None if sequence is None else SequenceData(sequence, SEQ_OFFSET)
    try:
        got = merge_order(ops, seq, version=version)
    except CowFormatError as exc:
        assert (exc.rule, exc.offset) == expected, str(exc)
    else:
        assert isinstance(expected, list), f"expected {expected}, got an order"
        assert [op.index for op in got] == [op.index for op in expected]


def test_oracle_sees_every_rule():
    """The generator reaches each rule (so the comparison above means something)."""
    copy = lambda i, new, src: CowOp(OpType.COPY, new, src, 0, 0, i, 100 + 16 * i)  # noqa: E731
    zero = CowOp(OpType.ZERO, 9, 0, 0, 0, 2, 132)
    ops = [copy(0, 1, 2), copy(1, 2, 3), zero]
    assert [op.index for op in merge_order(ops, version=2)] == [0, 1, 2]
    for seq, rule in (([2, 1], "source-overwritten"), ([1, 1], "sequence"), ([5], "sequence"),
                      ([9, 1], "ordered-after-unordered")):
        assert oracle(ops, seq, 2)[0] == rule
        try:
            merge_order(ops, SequenceData(seq, SEQ_OFFSET), version=2)
        except CowFormatError as exc:
            assert exc.rule == rule
        else:
            raise AssertionError(f"{seq}: no {rule} error")
