"""Merge order of a COW file's ops, and the rules that make it safe.

snapuserd merges a COW file into its base in place, so the order matters:
a Copy or Xor ("ordered" op) reads base blocks that a later op may
overwrite. The order (spec, "Merge order"):

1. the ops named by the sequence data, in that order; with no sequence
   data, the Copy/Xor ops in file order;
2. then every other op by ascending ``new_block`` (snapuserd's user-space
   merge), except v3 files without sequence data, which keep file order.

``num_merge_ops`` in the header counts how many ops of this order are
already merged. The order is checked as it is built, so a merge engine can
trust it: one op per new block, sequence data naming existing ops once,
no ordered op after a non-ordered one, and no ordered op reading a block an
earlier op of the order already overwrote.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Sequence

from dmuserd.snapshot._cow_format import CowFormatError, CowOp


class SequenceData:
    """Sequence entries (new block numbers, u32) and where each lies in the
    file, for error messages. Kept as a packed array: a hostile file's
    sequence costs 4 bytes an entry, not a Python object each."""

    def __init__(self, blocks: Iterable[int] = (), file_offset: int = 0) -> None:
        self.blocks = array("I")
        assert self.blocks.itemsize == 4
        self._starts: list[int] = []
        self._offsets: list[int] = []
        if blocks:
            self._add(array("I", blocks), file_offset)

    def extend(self, raw: bytes, file_offset: int) -> None:
        """Append the little-endian u32 entries ``raw`` found at ``file_offset``."""
        entries = array("I")
        entries.frombytes(raw[: len(raw) - len(raw) % 4])
        if sys.byteorder == "big":
            entries.byteswap()
        self._add(entries, file_offset)

    def _add(self, entries: array, file_offset: int) -> None:
        self._starts.append(len(self.blocks))
        self._offsets.append(file_offset)
        self.blocks.extend(entries)

    def offset_of(self, index: int) -> int:
        k = bisect_right(self._starts, index) - 1
        return self._offsets[k] + 4 * (index - self._starts[k])

    def __len__(self) -> int:
        return len(self.blocks)


def check_unique_blocks(data_ops: Sequence[CowOp]) -> None:
    """Reject two ops writing one new block (AOSP's reader and snapuserd
    disagree on which wins, so such a file has no single meaning)."""
    ranked = sorted(data_ops, key=lambda op: (op.new_block, op.index))
    for prev, cur in zip(ranked, ranked[1:]):
        if prev.new_block + prev.blocks > cur.new_block:
            first, second = sorted((prev, cur), key=lambda op: op.index)
            raise CowFormatError(
                second.offset,
                "duplicate-block",
                f"op #{second.index} ({second.type.name.lower()}) writes new block {cur.new_block}, "
                f"already written by op #{first.index} ({first.type.name.lower()}) at offset {first.offset}",
            )


def merge_order(data_ops: Sequence[CowOp], sequence: SequenceData | None = None, *, version: int = 2) -> list[CowOp]:
    """The data ops in the order they merge, checked (see the module doc).

    ``data_ops`` are the non-metadata ops in file order, already free of
    duplicate blocks; ``sequence`` the file's sequence data.
    """
    if sequence:
        by_block = {op.new_block: op for op in data_ops}
        named: set[int] = set()
        first = []
        for i, block in enumerate(sequence.blocks):
            if block in named:
                raise CowFormatError(sequence.offset_of(i), "sequence", f"sequence data names new block {block} twice")
            op = by_block.get(block)
            if op is None:
                raise CowFormatError(
                    sequence.offset_of(i), "sequence", f"sequence data names new block {block}, which no op writes"
                )
            named.add(block)
            first.append(op)
        rest = [op for op in data_ops if op.new_block not in named]
    else:
        first = [op for op in data_ops if op.is_ordered]
        rest = [op for op in data_ops if not op.is_ordered]
    if sequence or version < 3:
        rest.sort(key=lambda op: op.new_block)
    order = first + rest
    _check_order(order)
    return order


def _check_order(order: Sequence[CowOp]) -> None:
    writer_of: dict[int, CowOp] = {}  # block -> op that overwrote it, ordered ops only
    for op in order:
        if not op.is_ordered:
            # ordered ops all come first, so nothing after this can read
            # a block: only the mixing check remains.
            break
        for block in op.source_blocks():
            earlier = writer_of.get(block)
            if earlier is not None and earlier is not op:
                raise CowFormatError(
                    op.offset,
                    "source-overwritten",
                    f"op #{op.index} ({op.type.name.lower()} to new block {op.new_block}) reads base block "
                    f"{block}, which op #{earlier.index} (new block {earlier.new_block}) overwrites earlier "
                    "in merge order",
                )
        for block in range(op.new_block, op.new_block + op.blocks):
            writer_of[block] = op
    seen_unordered = None
    for op in order:
        if not op.is_ordered:
            seen_unordered = seen_unordered or op
        elif seen_unordered is not None:
            raise CowFormatError(
                op.offset,
                "ordered-after-unordered",
                f"op #{op.index} ({op.type.name.lower()} to new block {op.new_block}) merges after "
                f"op #{seen_unordered.index} ({seen_unordered.type.name.lower()}); ordered ops (copy, xor) "
                "must all merge first",
            )
