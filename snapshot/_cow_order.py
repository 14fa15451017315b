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

Where the optional ``_cow_native`` extension is built, the order is built
and checked in C (``rank_rows``, ``order_rows``: the same rules, about 1 us
an op less); where it finds a rule broken, the Python functions here walk
the file again and name the fault, so there is one set of messages. Without
the extension they do all of it.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from itertools import compress

from dmuserd.snapshot._cow_format import METADATA_OPS, ORDERED_OPS, CowFormatError, CowOp, OpType, type_marks
from dmuserd.snapshot._cow_table import OpTable

_META = frozenset(int(t) for t in METADATA_OPS)
_ORDERED = frozenset(int(t) for t in ORDERED_OPS)
_COPY = int(OpType.COPY)
#: op type -> 1 for an ordered op (copy, xor) (a ``bytes.translate`` table)
_IS_ORDERED = type_marks(ORDERED_OPS)
#: op type -> 1 for a metadata op (writes no block)
_IS_META = type_marks(METADATA_OPS)
try:  # the optional extension: the order built and checked in C (see the module doc)
    from dmuserd.snapshot import _cow_native as _NATIVE
except ImportError:
    _NATIVE = None
if array("I").itemsize != 4 or array("Q").itemsize != 8:
    _NATIVE = None  # it takes u32 rows and u64 columns


def _u32(rows) -> array:
    """``rows`` as a packed u32 array (what the C functions take)."""
    return rows if isinstance(rows, array) and rows.typecode == "I" else array("I", rows)


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
    table = OpTable.from_ops(data_ops, data_ops[0].block_size if data_ops else 4096)
    check_unique_rows(table, range(len(data_ops)), op_of=data_ops.__getitem__)


def check_unique_rows(table: OpTable, rows, *, op_of=None) -> array:
    """:func:`check_unique_blocks` over ``rows`` of ``table``; returns those
    rows sorted by new block (then row), packed.

    The sort goes through one packed int per row (``new_block << 32 | row``),
    not a tuple or an object per op.
    """
    op_of = op_of or table.op
    nb, ty, fac = table.new_block, table.type, table.factor
    if _NATIVE is not None:
        ranked = array("I")
        if _NATIVE.rank_rows(ty, nb, fac, _u32(rows), _IS_META, ranked):
            return ranked
    keys = [(nb[r] << 32) | r for r in rows]
    keys.sort()  # in place: no second list
    ranked = array("I", [k & 0xFFFFFFFF for k in keys])
    del keys
    prev_end, prev = -1, -1
    for r in ranked:
        start = nb[r]
        if start < prev_end:
            first, second = sorted((op_of(prev), op_of(r)), key=lambda op: op.index)
            raise CowFormatError(
                second.offset,
                "duplicate-block",
                f"op #{second.index} ({second.type.name.lower()}) writes new block {start}, "
                f"already written by op #{first.index} ({first.type.name.lower()}) at offset {first.offset}",
            )
        prev_end, prev = start + (0 if ty[r] in _META else 1 << fac[r]), r
    return ranked


def merge_order(data_ops: Sequence[CowOp], sequence: SequenceData | None = None, *, version: int = 2) -> list[CowOp]:
    """The data ops in the order they merge, checked (see the module doc).

    ``data_ops`` are the non-metadata ops in file order, already free of
    duplicate blocks; ``sequence`` the file's sequence data.
    """
    table = OpTable.from_ops(data_ops, data_ops[0].block_size if data_ops else 4096)
    rows = range(len(data_ops))
    ranked = check_unique_rows(table, rows, op_of=data_ops.__getitem__)
    order = merge_order_rows(table, rows, ranked, sequence, version=version, op_of=data_ops.__getitem__)
    return [data_ops[r] for r in order]


def merge_order_rows(table: OpTable, rows, ranked: array, sequence: SequenceData | None = None, *,
                     version: int = 2, op_of=None) -> array:
    """:func:`merge_order` over ``rows`` (data ops, file order) of ``table``:
    the rows in merge order, packed. ``ranked`` is ``rows`` sorted by new
    block (:func:`check_unique_rows`).

    Linear: sequence entries are looked up in a dict of new blocks (not
    bisected one by one; the dict lives only while the order is built) and
    :func:`_check_order` makes one pass with a set. A file that breaks a
    rule is walked again the slow way (:func:`_sequence_rows`,
    :func:`_raise_order`), which names the first entry or op at fault, as
    the checks always did.
    """
    op_of = op_of or table.op
    nb, ty = table.new_block, table.type
    if _NATIVE is not None:
        native = array("I", [0]) * len(ranked)  # C writes the order in place: no copy of it to make
        if _NATIVE.order_rows(ty, nb, table.source, _u32(rows), ranked, sequence.blocks if sequence else b"",
                              version >= 3, table.block_size, _IS_ORDERED, _COPY, native):
            return native
        del native
    if sequence:
        # new block -> its index in ``ranked`` (a file's new blocks are unique: check_unique_rows)
        where = dict(zip(map(nb.__getitem__, ranked), range(len(ranked))))  # ~1/5 less than a dict comprehension
        named = bytearray(len(ranked))
        try:
            ks = list(map(where.__getitem__, sequence.blocks))
        except KeyError:
            ks = None
        del where
        if ks is not None:
            for k in ks:
                named[k] = 1
        if ks is None or named.count(1) != len(ks):  # an entry no op writes, or one named twice
            _sequence_rows(nb, ranked, sequence)
            raise AssertionError("merge_order_rows found a bad sequence entry that its walk did not")
        first = array("I", [ranked[k] for k in ks])
        del ks
        rest = array("I", compress(ranked, named.translate(_NOT)))
        del named
    else:
        first = array("I", compress(rows, bytes([ty[r] for r in rows]).translate(_IS_ORDERED)))
        # v3 without sequence data keeps file order; the rest by ascending new block
        others = ranked if version < 3 else rows
        rest = array("I", compress(others, bytes([ty[r] for r in others]).translate(_IS_UNORDERED)))
    order = first
    order.extend(rest)
    del rest
    _check_order(table, order, ranked, op_of)
    return order


#: byte 0 -> 1, anything else -> 0; op type -> 1 for an op that is not ordered
_NOT = bytes([1]) + bytes(255)
_IS_UNORDERED = type_marks(ORDERED_OPS, mark=0)


def _sequence_rows(nb, ranked: array, sequence: SequenceData) -> array:
    """The rows the sequence data names, in its order, found by bisection;
    raises ``sequence`` for the first entry naming a block no op writes or
    a block named before. (The slow walk: :func:`merge_order_rows` runs it
    only to name the entry at fault.)"""
    starts = array("Q", map(nb.__getitem__, ranked))
    named = bytearray(len(ranked))
    first = array("I")
    for i, block in enumerate(sequence.blocks):
        k = bisect_left(starts, block)
        if k == len(starts) or starts[k] != block:
            raise CowFormatError(
                sequence.offset_of(i), "sequence", f"sequence data names new block {block}, which no op writes"
            )
        if named[k]:
            raise CowFormatError(sequence.offset_of(i), "sequence", f"sequence data names new block {block} twice")
        named[k] = 1
        first.append(ranked[k])
    return first


def _check_order(table: OpTable, order: array, ranked: array, op_of) -> None:
    """Check that ordered ops all come first and that none reads a block an
    earlier one writes: one pass over the ordered ops with a set of the
    blocks written so far (not a bisection per read). On a failure,
    :func:`_raise_order` walks the order again to name the first op at fault."""
    ty, src, bs, nb = table.type, table.source, table.block_size, table.new_block
    flags = bytes([ty[r] for r in order]).translate(_IS_ORDERED)
    ordered = flags.find(0)
    if ordered < 0:
        ordered = len(flags)
    elif flags.find(1, ordered) >= 0:  # an ordered op after a non-ordered one
        _raise_order(table, order, ranked, op_of)
    del flags
    written: set[int] = set()  # new blocks of the ordered ops so far (they write one block each)
    write = written.add
    for r in order[:ordered]:
        s = src[r]
        if ty[r] == _COPY:
            if s in written:
                break
        else:
            block, rem = divmod(s, bs)
            if block in written or (rem and block + 1 in written):
                break
        write(nb[r])
    else:
        return
    _raise_order(table, order, ranked, op_of)


def _raise_order(table: OpTable, order: array, ranked: array, op_of) -> None:
    """Walk ``order`` op by op and raise the error :func:`_check_order` found
    (``source-overwritten`` or ``ordered-after-unordered``) for the first op at
    fault, the checks' order."""
    ty, src, bs = table.type, table.source, table.block_size
    starts = array("Q", map(table.new_block.__getitem__, ranked))
    # merge position of each ordered op (row -> position + 1), for "written earlier?"
    position = array("I", bytes(4 * len(table)))
    for k, r in enumerate(order):
        if ty[r] not in _ORDERED:
            break
        position[r] = k + 1
    for k, r in enumerate(order):
        t = ty[r]
        if t not in _ORDERED:
            # ordered ops all come first, so nothing after this can read
            # a block: only the mixing check remains.
            break
        if t == _COPY:
            reads = (src[r],)
        else:
            first, rem = divmod(src[r], bs)
            reads = (first, first + 1) if rem else (first,)
        for block in reads:
            i = bisect_left(starts, block)
            if i == len(starts) or starts[i] != block:
                continue  # ordered ops write one block each: only one starting at ``block`` can
            w = ranked[i]
            if 0 < position[w] <= k:  # an ordered op earlier in the order (not this one)
                op, earlier = op_of(r), op_of(w)
                raise CowFormatError(
                    op.offset,
                    "source-overwritten",
                    f"op #{op.index} ({op.type.name.lower()} to new block {op.new_block}) reads base block "
                    f"{block}, which op #{earlier.index} (new block {earlier.new_block}) overwrites earlier "
                    "in merge order",
                )
    seen_unordered = None
    for r in order:
        if ty[r] not in _ORDERED:
            if seen_unordered is None:
                seen_unordered = r
        elif seen_unordered is not None:
            op, other = op_of(r), op_of(seen_unordered)
            raise CowFormatError(
                op.offset,
                "ordered-after-unordered",
                f"op #{op.index} ({op.type.name.lower()} to new block {op.new_block}) merges after "
                f"op #{other.index} ({other.type.name.lower()}); ordered ops (copy, xor) "
                "must all merge first",
            )
    raise AssertionError("_check_order found a fault that its walk did not")
