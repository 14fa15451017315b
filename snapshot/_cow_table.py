"""A COW file's ops as packed columns: about 40 bytes an op, no object each.

:class:`OpTable` is what the reader fills while it scans the op stream and
what the merge works from: a merge of a million-op file must not hold a
million Python objects (a :class:`~dmuserd.snapshot._cow_format.CowOp` and
its ints cost about 300 bytes). :meth:`OpTable.op` builds the
:class:`CowOp` of one row when a caller wants an object (error messages,
``cow inspect``, the served view).

Rows are in file order (row = the op's index in the stream); data ops are
the rows whose type is not metadata.
"""

from __future__ import annotations

from array import array
from itertools import compress
from operator import add

from dmuserd.snapshot._cow_format import METADATA_OPS, CowOp, OpType, type_marks

_OPS = {int(t): t for t in OpType}
_META = frozenset(int(t) for t in METADATA_OPS)
#: op type -> 1 for a data op, 0 for metadata (``bytes.translate`` table)
_IS_DATA = type_marks(METADATA_OPS, mark=0)
try:  # the optional extension (snapshot/_cow_native.c): OpTable.largest and data_rows in one C pass
    from dmuserd.snapshot import _cow_native as _NATIVE
except ImportError:
    _NATIVE = None
if array("I").itemsize != 4 or array("Q").itemsize != 8 or array("q").itemsize != 8:
    _NATIVE = None  # it takes u32 and 8-byte columns


class OpTable:
    """Columns of the ops of one COW file (see the module doc).

    ``data_offset`` is -1 for ops without data; ``factor`` the v3
    compression factor (chunk = ``block_size << factor``).
    """

    __slots__ = ("block_size", "type", "compression", "factor", "new_block", "source", "data_length",
                 "offset", "data_offset")

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.type = array("B")
        self.compression = array("B")
        self.factor = array("B")
        self.new_block = array("Q")
        self.source = array("Q")
        self.data_length = array("I")
        self.offset = array("Q")
        self.data_offset = array("q")

    def append(self, op_type: int, new_block: int, source: int, data_length: int, compression: int, offset: int,
               data_offset: int | None, factor: int = 0) -> None:
        self.type.append(op_type)
        self.compression.append(compression)
        self.factor.append(factor)
        self.new_block.append(new_block)
        self.source.append(source)
        self.data_length.append(data_length)
        self.offset.append(offset)
        self.data_offset.append(-1 if data_offset is None else data_offset)

    def columns(self) -> tuple[array, ...]:
        """The columns in :meth:`extend`'s order: what a bulk reader appends
        a run of decoded ops to, a column at a time (the C reader included:
        ``_cow_native.walk_v2``)."""
        return (self.type, self.new_block, self.source, self.data_length, self.compression, self.offset,
                self.data_offset, self.factor)

    def extend(self, op_type, new_block, source, data_length, compression, offset, data_offset, factor) -> None:
        """Append many rows at once, a column each (any iterables of equal length):
        what a reader that decoded a run of ops in bulk adds."""
        for column, values in zip(self.columns(), (op_type, new_block, source, data_length, compression, offset,
                                                   data_offset, factor)):
            column.extend(values)

    def __len__(self) -> int:
        return len(self.type)

    def op(self, row: int) -> CowOp:
        """The :class:`CowOp` of row ``row``."""
        data_offset = self.data_offset[row]
        bs = self.block_size
        return CowOp(_OPS[self.type[row]], self.new_block[row], self.source[row], self.data_length[row],
                     self.compression[row], row, self.offset[row], None if data_offset < 0 else data_offset,
                     bs << self.factor[row], bs)

    def blocks(self, row: int) -> int:
        """Blocks of the new partition row ``row`` writes (0 for metadata)."""
        return 0 if self.type[row] in _META else 1 << self.factor[row]

    def largest(self, column: array, kinds: bytes | None = None, plus: array | None = None) -> int | None:
        """The largest value of ``column`` (one of the 8-byte columns), each
        plus the row's value in ``plus`` (``data_length``) when given, over
        the rows whose type ``kinds`` marks (a 256-byte ``translate`` table;
        None: every row), or None when there is none. In C where
        ``_cow_native`` is built (Python's ``max`` makes an int of every
        value)."""
        if _NATIVE is not None:
            return _NATIVE.column_max(column, column.typecode == "q", self.type, kinds or b"",
                                      b"" if plus is None else plus)
        values = column if plus is None else map(add, column, plus)
        if kinds is not None:
            values = compress(values, self.type.tobytes().translate(kinds))
        return max(values, default=None)

    def data_rows(self) -> array:
        """The rows of data ops (not metadata), in file order (in C where
        ``_cow_native`` is built: Python makes an int of every row)."""
        if _NATIVE is not None:
            rows = array("I")
            _NATIVE.rows_of(self.type, _IS_DATA, rows)
            return rows
        return array("I", compress(range(len(self.type)), self.type.tobytes().translate(_IS_DATA)))

    @classmethod
    def from_ops(cls, ops, block_size: int) -> "OpTable":
        """A table of ``ops`` (:class:`CowOp`, any order: row ``k`` is ``ops[k]``)."""
        table = cls(block_size)
        for op in ops:
            factor = (op.chunk_size // op.block_size).bit_length() - 1 if op.chunk_size > op.block_size else 0
            table.append(op.type, op.new_block, op.source, op.data_length, op.compression, op.offset,
                         op.data_offset, factor)
        return table
