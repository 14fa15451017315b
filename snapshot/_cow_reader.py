"""Read and validate a COW file (v1 to v3).

:class:`CowReader` parses the header and the whole op stream up front,
checks every rule it can without the data (layout, counts, ranges, one op
per block, the merge order), and decodes data chunks on demand with
:meth:`CowReader.read_data` (size-checked there). Anything wrong comes out
as :class:`CowFormatError` with the file offset and the rule; sizes read
from the file are checked against the file size before anything is
allocated, and every loop advances through the file, so a hostile file
cannot make it hang or eat memory beyond a small multiple of its size.

v2 follows AOSP's ``CowParserV2``: ops in clusters (or each followed by
its data), Xor data found by position in the data stream, Replace and
Sequence data at ``source``; complete when a footer is found, or, read up
to a label, at that label. v3 follows ``CowParserV3``: the op count is the
header's (or a resume point's, read up to a label).
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Iterator

from dmuserd.snapshot import _compression
from dmuserd.snapshot._cow_format import (
    FOOTER_SIZE_V2,
    FOOTER_UNUSED,
    HEADER_FIELD_OFFSET,
    HEADER_SIZE_V1,
    HEADER_SIZE_V2,
    HEADER_SIZE_V3,
    MAGIC,
    MAX_FACTOR_SHIFT,
    OP_SIZE_V2,
    OP_SIZE_V3,
    OP_V2,
    OP_V3,
    PREFIX_SIZE,
    RESUME_POINT,
    RESUME_POINT_SIZE,
    SOURCE_MASK,
    TYPE_SHIFT,
    FACTOR_MASK,
    FACTOR_SHIFT,
    Compression,
    CowFormatError,
    CowHeader,
    CowOp,
    OpType,
    type_marks,
)
from dmuserd.snapshot._cow_order import SequenceData, check_unique_rows, merge_order_rows
from dmuserd.snapshot._cow_table import OpTable

_HEADER_SIZES = {1: (HEADER_SIZE_V1, HEADER_SIZE_V2), 2: (HEADER_SIZE_V2,), 3: (HEADER_SIZE_V3,)}
_DATA_OPS_V3 = frozenset({OpType.COPY, OpType.REPLACE, OpType.ZERO, OpType.XOR})
_NO_DATA = frozenset({OpType.COPY, OpType.ZERO, OpType.LABEL, OpType.CLUSTER})
_WITH_DATA = frozenset({OpType.REPLACE, OpType.XOR, OpType.SEQUENCE})


_V2_TYPES = frozenset(int(t) for t in OpType if t != OpType.FOOTER)
_META_V2 = frozenset(int(t) for t in (OpType.LABEL, OpType.CLUSTER, OpType.SEQUENCE))
_NO_DATA_INT = frozenset(int(t) for t in _NO_DATA)
_WITH_DATA_INT = frozenset(int(t) for t in _WITH_DATA)
_COMPRESSIONS = frozenset(int(c) for c in Compression)
_FOOTER, _LABEL, _CLUSTER, _SEQUENCE = int(OpType.FOOTER), int(OpType.LABEL), int(OpType.CLUSTER), int(OpType.SEQUENCE)
_XOR, _REPLACE = int(OpType.XOR), int(OpType.REPLACE)
#: the first op of a run whose type is not copy, replace, zero or xor (v2: see ``_plain_v2``)
_IS_COPY = type_marks((OpType.COPY,))  # op type -> 1 for copy (bytes.translate)
_IS_XOR = type_marks((OpType.XOR,))
#: compression value -> 1 when known (for the C bulk path)
_VALID_COMPRESSION = type_marks(_COMPRESSIONS)
try:  # the optional extension: a v2 file's clusters to columns in C (CowReader._walk_v2)
    from dmuserd.snapshot import _cow_native as _NATIVE
except ImportError:
    _NATIVE = None
if array("I").itemsize != 4 or array("Q").itemsize != 8 or array("q").itemsize != 8:
    _NATIVE = None  # it returns u32/u64/i64 columns
#: the types of plain data ops: a run of them is what ``bytes.lstrip`` takes off a run of op types
_PLAIN = bytes([int(OpType.COPY), int(OpType.REPLACE), int(OpType.ZERO), _XOR])


def _field(name: str) -> int:
    return HEADER_FIELD_OFFSET[name]


class CowReader:
    """A parsed, validated COW file.

    ``CowReader(path)`` reads a complete file; ``label=N`` reads it only up
    to label N (an unfinished file, or to resume writing). ``base_size`` and
    ``target_size`` (bytes), when known, add the range checks of Copy/Xor
    sources and of new blocks. ``check_merge=False`` skips building and
    checking the merge order (resuming a write does, like AOSP).

    Attributes: ``header`` (:class:`CowHeader`), ``version`` (major),
    ``block_size``, ``compression`` (:class:`Compression`), ``table`` (every
    op in file order, metadata included, footer excluded, as packed columns:
    :class:`OpTable`; row = op index), ``ops`` and ``data_ops`` (the same as
    :class:`CowOp` objects, all of them / those that write blocks: built on
    first use, since an object per op costs several times the table;
    a merge works from :meth:`merge_order_rows` instead), ``labels`` (v2: label ops in order; v3: resume
    point labels), ``sequence`` (sequence data, new blocks), ``footer``
    (v2: ``{"ops_size", "num_ops", "offset"}`` or None), ``data_end`` (end of
    the last op's data, where a writer would continue); v2 also has
    ``next_op_pos`` and ``next_data_pos``, the next op slot and data byte
    after the point reading stopped (AOSP's writer positions).
    """

    def __init__(
        self,
        path,
        *,
        label: int | None = None,
        base_size: int | None = None,
        target_size: int | None = None,
        check_merge: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.file_size = os.fstat(self._fd).st_size
            self.label = label
            self.footer: dict | None = None
            self.labels: list[int] = []
            self._sequence = SequenceData()
            self.resume_points: list[tuple[int, int]] = []
            self._read_header()
            if self.version >= 3:
                self._read_v3(label)
            else:
                self._read_v2(label)
            self._data_rows = self.table.data_rows()
            self._ranked = check_unique_rows(self.table, self._data_rows)
            if base_size is not None:
                self.check_base_size(base_size)
            if target_size is not None:
                self.check_target_size(target_size)
            self._ops: list[CowOp] | None = None
            self._data_ops: list[CowOp] | None = None
            self._merge_order: array | None = None
            if check_merge:
                self.merge_order_rows()
        except CowFormatError as exc:
            os.close(self._fd)
            raise exc.with_path(self.path) from None
        except BaseException:
            os.close(self._fd)
            raise

    # --- public --------------------------------------------------------

    @property
    def version(self) -> int:
        return self.header.major

    @property
    def block_size(self) -> int:
        return self.header.block_size

    @property
    def num_merge_ops(self) -> int:
        """Ops of the merge order already merged (header field)."""
        return self.header.num_merge_ops

    @property
    def sequence(self) -> list[int]:
        return self._sequence.blocks.tolist()

    @property
    def ops(self) -> list[CowOp]:
        """Every op in file order, metadata included (built on first use from :attr:`table`)."""
        if self._ops is None:
            self._ops = [self.table.op(i) for i in range(len(self.table))]
        return self._ops

    @property
    def data_ops(self) -> list[CowOp]:
        """The ops that write blocks, in file order."""
        if self._data_ops is None:
            ops = self.ops
            self._data_ops = [ops[r] for r in self._data_rows]
        return self._data_ops

    @property
    def data_op_count(self) -> int:
        return len(self._data_rows)

    def merge_order(self) -> list[CowOp]:
        """Every data op in merge order (the first ``num_merge_ops`` are merged)."""
        ops = self.ops
        return [ops[r] for r in self.merge_order_rows()]

    def merge_order_rows(self) -> array:
        """The rows of :attr:`table` in merge order, packed (what a merge works
        from: no object per op)."""
        if self._merge_order is None:
            self._merge_order = merge_order_rows(self.table, self._data_rows, self._ranked, self._sequence,
                                                 version=self.version)
        return self._merge_order

    def iter_merge_ops(self, *, include_merged: bool = False) -> Iterator[CowOp]:
        """The ops still to merge, in order (all of them with ``include_merged``)."""
        order = self.merge_order()
        start = 0 if include_merged else min(self.num_merge_ops, len(order))
        return iter(order[start:])

    def counts(self) -> dict[str, int]:
        """Ops per type name, e.g. ``{"copy": 1, "replace": 1, ...}``."""
        counter = Counter(self.table.type)
        return {t.name.lower(): counter.get(int(t), 0) for t in OpType if t != OpType.FOOTER}

    def read_raw(self, op: CowOp) -> bytes:
        """The stored (maybe compressed) bytes of a Replace/Xor/Sequence op."""
        if op.data_offset is None:
            raise ValueError(f"op #{op.index} ({op.type.name.lower()}) has no data")
        data = os.pread(self._fd, op.data_length, op.data_offset)
        if len(data) != op.data_length:
            # the file shrank under us
            raise CowFormatError(
                op.data_offset, "data-outside-file", f"op #{op.index}'s data ends past the end of the file", path=self.path
            )
        return data

    def read_data(self, op: CowOp) -> bytes:
        """The decompressed ``op.chunk_size`` bytes of a Replace/Xor op."""
        try:
            return _compression.decompress(
                self.compression, self.version, self.read_raw(op), op.chunk_size, offset=op.data_offset
            )
        except CowFormatError as exc:
            raise exc.with_path(self.path) from None

    def check_base_size(self, base_size: int) -> None:
        """Reject Copy/Xor ops reading past the end of a base of ``base_size`` bytes."""
        bs = self.block_size
        t = self.table
        ty, src = t.type, t.source
        copy, xor = int(OpType.COPY), int(OpType.XOR)
        # the farthest source of each kind first (OpTable.largest); the op is looked for only past the end
        farthest_copy, farthest_xor = t.largest(src, _IS_COPY), t.largest(src, _IS_XOR)
        if (farthest_copy is None or (farthest_copy + 1) * bs <= base_size) and \
                (farthest_xor is None or farthest_xor + bs <= base_size):
            return
        for r in self._data_rows:
            kind = ty[r]
            if kind == copy and (src[r] + 1) * bs > base_size:
                reach = f"base block {src[r]}"
            elif kind == xor and src[r] + bs > base_size:
                reach = f"base bytes {src[r]}..{src[r] + bs - 1}"
            else:
                continue
            op = t.op(r)
            raise CowFormatError(
                op.offset,
                "source-outside-base",
                f"op #{op.index} ({op.type.name.lower()} to new block {op.new_block}) reads {reach}, "
                f"past the end of the {base_size}-byte base",
                path=self.path,
            )

    def check_target_size(self, target_size: int) -> None:
        """Reject ops writing past the end of a target of ``target_size`` bytes."""
        blocks = -(-target_size // self.block_size)
        t = self.table
        nb, fac = t.new_block, t.factor
        for r in self._data_rows:
            if nb[r] + (1 << fac[r]) > blocks:
                op = t.op(r)
                raise CowFormatError(
                    op.offset,
                    "block-outside-target",
                    f"op #{op.index} ({op.type.name.lower()}) writes new block "
                    f"{op.new_block + op.blocks - 1}, past the end of the {target_size}-byte target",
                    path=self.path,
                )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "CowReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- header --------------------------------------------------------

    def _pread(self, length: int, offset: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def _read_header(self) -> None:
        size = self.file_size
        if size < PREFIX_SIZE:
            raise CowFormatError(0, "truncated-header", f"the file is {size} bytes, shorter than a COW header")
        header = CowHeader.unpack(self._pread(HEADER_SIZE_V3, 0))
        if header.magic != MAGIC:
            raise CowFormatError(0, "magic", f"magic is {header.magic:#018x}, a COW file has {MAGIC:#018x}")
        if header.major not in _HEADER_SIZES:
            raise CowFormatError(
                _field("major"), "version", f"version {header.major}.{header.minor} is not supported (1 to 3 are)"
            )
        if header.header_size not in _HEADER_SIZES[header.major]:
            raise CowFormatError(
                _field("header_size"),
                "header-size",
                f"header_size is {header.header_size}, a v{header.major} header has {_HEADER_SIZES[header.major][-1]}",
            )
        if size < header.header_size:
            raise CowFormatError(
                size, "truncated-header", f"the file is {size} bytes, its header {header.header_size}"
            )
        v3 = header.major >= 3
        expect_footer, expect_op = (0, OP_SIZE_V3) if v3 else (FOOTER_SIZE_V2, OP_SIZE_V2)
        if header.footer_size != expect_footer:
            raise CowFormatError(
                _field("footer_size"), "footer-size", f"footer_size is {header.footer_size}, expected {expect_footer}"
            )
        if header.op_size != expect_op:
            raise CowFormatError(_field("op_size"), "op-size", f"op_size is {header.op_size}, expected {expect_op}")
        bs = header.block_size
        if bs < 512 or bs > 32768 or bs & (bs - 1):
            raise CowFormatError(
                _field("block_size"), "block-size", f"block_size is {bs}, not a power of two from 512 to 32768"
            )
        if v3 and header.cluster_ops:
            raise CowFormatError(
                _field("cluster_ops"), "cluster-ops", f"cluster_ops is {header.cluster_ops}, v3 has none"
            )
        self.data_start = header.header_size + header.buffer_size
        if self.data_start > size:
            raise CowFormatError(
                _field("buffer_size"),
                "buffer-size",
                f"the {header.buffer_size}-byte scratch region ends at {self.data_start}, "
                f"past the end of the {size}-byte file",
            )
        self.header = header

    # --- v3 --------------------------------------------------------------

    def _read_v3(self, label: int | None) -> None:
        h, size = self.header, self.file_size
        try:
            self.compression = Compression(h.compression_algorithm)
        except ValueError:
            raise CowFormatError(
                _field("compression_algorithm"),
                "compression",
                f"compression_algorithm {h.compression_algorithm} is unknown (0 to 4 are)",
            ) from None
        seq_off = self.data_start
        resume_off = seq_off + 4 * h.sequence_data_count
        if resume_off > size:
            raise CowFormatError(
                _field("sequence_data_count"),
                "sequence-count",
                f"{h.sequence_data_count} sequence entries end at {resume_off}, past the end of the {size}-byte file",
            )
        if h.resume_point_count > h.resume_point_max:
            raise CowFormatError(
                _field("resume_point_count"),
                "resume-points",
                f"resume_point_count {h.resume_point_count} exceeds resume_point_max {h.resume_point_max}",
            )
        if resume_off + RESUME_POINT_SIZE * h.resume_point_count > size:
            raise CowFormatError(
                _field("resume_point_count"), "resume-points", "the resume points end past the end of the file"
            )
        self.op_start = resume_off + RESUME_POINT_SIZE * h.resume_point_max
        if h.op_count > h.op_count_max:
            raise CowFormatError(
                _field("op_count"), "op-count", f"op_count {h.op_count} exceeds op_count_max {h.op_count_max}"
            )
        data_pos = self.op_start + OP_SIZE_V3 * h.op_count_max
        if h.op_count and self.op_start + OP_SIZE_V3 * h.op_count > size:
            raise CowFormatError(
                _field("op_count"),
                "op-count",
                f"{h.op_count} ops end at {self.op_start + OP_SIZE_V3 * h.op_count}, "
                f"past the end of the {size}-byte file",
            )
        raw = self._pread(RESUME_POINT_SIZE * h.resume_point_count, resume_off)
        self.resume_points = list(RESUME_POINT.iter_unpack(raw))
        self.labels = [lbl for lbl, _ in self.resume_points]
        op_count = h.op_count
        if label is not None:
            found = [index for lbl, index in self.resume_points if lbl == label]
            if not found:
                raise CowFormatError(
                    resume_off,
                    "label-not-found",
                    f"label {label} is not among the resume points {self.labels}",
                )
            op_count = found[0]
            if op_count > h.op_count_max or (op_count and self.op_start + OP_SIZE_V3 * op_count > size):
                raise CowFormatError(
                    resume_off, "resume-points", f"label {label} points at op {op_count}, past the op array or the file"
                )
        seq_raw = self._pread(4 * h.sequence_data_count, seq_off)
        self._sequence.extend(seq_raw, seq_off)
        table = self.table = OpTable(h.block_size)
        raw = self._pread(OP_SIZE_V3 * op_count, self.op_start)
        compression = int(self.compression)
        for index, (data_length, new_block, info) in enumerate(OP_V3.iter_unpack(raw)):
            offset = self.op_start + OP_SIZE_V3 * index
            type_value = info >> TYPE_SHIFT
            factor = (info >> FACTOR_SHIFT) & FACTOR_MASK
            source = info & SOURCE_MASK
            if type_value not in _DATA_OPS_V3:
                raise CowFormatError(
                    offset + 8, "op-type", f"op #{index} has type {type_value}, not copy/replace/zero/xor (v3)"
                )
            op_type = OpType(type_value)
            if factor and (op_type != OpType.REPLACE or factor > MAX_FACTOR_SHIFT):
                raise CowFormatError(
                    offset + 8,
                    "compression-factor",
                    f"op #{index} ({op_type.name.lower()}) has compression factor {factor}; only replace ops "
                    f"have one, at most {MAX_FACTOR_SHIFT}",
                )
            data_offset = None
            self._check_data_length(op_type, data_length, index, offset)
            if op_type in _WITH_DATA:
                if op_type == OpType.REPLACE and source != data_pos:
                    raise CowFormatError(
                        offset + 8,
                        "data-position",
                        f"op #{index} (replace) says its data is at {source}, the data stream is at {data_pos}",
                    )
                self._check_data_range(data_pos, data_length, index, offset, limit=size)
                data_offset = data_pos
                data_pos += data_length
            table.append(op_type, new_block, source, data_length, compression, offset, data_offset, factor)
        self.data_end = data_pos

    # --- v1/v2 -------------------------------------------------------------

    def _read_v2(self, label: int | None) -> None:
        h, size = self.header, self.file_size
        bs = h.block_size
        cluster_ops = h.cluster_ops
        pos = self.data_start
        self.op_start = pos
        data_pos = pos + (cluster_ops * OP_SIZE_V2 if cluster_ops else OP_SIZE_V2)
        per_read = cluster_ops or 1
        ops = self.table = OpTable(bs)
        data_start = self.data_start
        compression = None
        seen_data_op = False
        done = False
        while not done:
            # the clusters' plain runs, a cluster at a time, in C where it is built; the record it stops at (and
            # with it off, every record) goes through the Python below
            walked = self._walk_v2(pos, data_pos, compression) if cluster_ops else None
            if walked is not None:
                pos, data_pos, compression, data_ops = walked
                seen_data_op = seen_data_op or data_ops > 0
            to_add = min(per_read, (size - pos) // OP_SIZE_V2)
            if to_add <= 0:
                break
            buf = self._pread(to_add * OP_SIZE_V2, pos)
            if cluster_ops:
                # the data ops before the cluster's metadata op, in bulk
                types = buf[::OP_SIZE_V2]
                plain = len(types) - len(types.lstrip(_PLAIN))
                done_in_bulk = self._plain_v2(buf, plain, pos, data_pos, compression) if plain else None
                if done_in_bulk is not None:
                    data_pos, compression = done_in_bulk
                    pos += plain * OP_SIZE_V2
                    seen_data_op = True
                    buf = buf[plain * OP_SIZE_V2 :]
            for type_value, comp, data_length, new_block, source in OP_V2.iter_unpack(buf):
                offset = pos
                index = len(ops)
                if type_value == 0:
                    # an unused (zeroed) op slot: the stream of an unfinished
                    # file ends here
                    done = True
                    break
                if type_value == _FOOTER:
                    self._read_footer(offset, comp, data_length, new_block, source, len(ops))
                    done = True
                    break
                if type_value not in _V2_TYPES:
                    self._v2_type(type_value, index, offset)  # raises
                if comp not in _COMPRESSIONS:
                    raise CowFormatError(offset + 1, "compression", f"op #{index} has unknown compression {comp}")
                if comp:
                    if compression is None:
                        compression = comp
                    elif comp != compression:
                        raise CowFormatError(
                            offset + 1,
                            "mixed-compression",
                            f"op #{index} is compressed with {Compression(comp).name.lower()}, earlier ops with "
                            f"{Compression(compression).name.lower()}; a file has one algorithm",
                        )
                if (data_length if type_value in _NO_DATA_INT else not data_length if type_value in _WITH_DATA_INT
                        else False) or (type_value == _SEQUENCE and data_length % 4):
                    self._check_data_length(OpType(type_value), data_length, index, offset)  # raises
                if source > SOURCE_MASK and type_value != _LABEL:
                    raise CowFormatError(
                        offset + 12, "source-range", f"op #{index} has source {source}, more than 48 bits"
                    )
                meta = type_value in _META_V2
                if not meta and new_block > 0xFFFFFFFF:
                    raise CowFormatError(
                        offset + 4, "new-block-range", f"op #{index} writes new block {new_block}, more than 32 bits"
                    )
                data_offset = None
                if type_value == _XOR:
                    data_offset = data_pos
                elif type_value == _REPLACE or type_value == _SEQUENCE:
                    data_offset = source
                if data_offset is not None and (data_offset < data_start or data_offset + data_length > size):
                    self._check_data_range(data_offset, data_length, index, offset, limit=size)  # raises
                if type_value == _SEQUENCE:
                    if seen_data_op:
                        raise CowFormatError(
                            offset, "sequence", f"sequence op #{index} follows data ops; sequence data comes first"
                        )
                    raw = self.read_raw_at(data_offset, data_length)
                    self._sequence.extend(raw, data_offset)
                elif not meta:
                    seen_data_op = True
                ops.append(type_value, new_block, source, data_length, comp, offset, data_offset)
                cluster = type_value == _CLUSTER
                pos += OP_SIZE_V2 + (source if cluster else 0 if cluster_ops else data_length)
                data_pos += data_length + (
                    cluster_ops * OP_SIZE_V2 if cluster else 0 if cluster_ops else OP_SIZE_V2
                )
                if cluster:
                    break
                if type_value == _LABEL:
                    self.labels.append(source)
                    if label is not None and source == label:
                        done = True
                        break
                if walked is not None:
                    break  # the records after this one: the C walk's again
        self.compression = Compression(compression or 0)
        # ops without data have data_offset -1 and data_length 0: they never win
        self.data_end = max(self.data_start, ops.largest(ops.data_offset, plus=ops.data_length) or 0)
        if label is not None:
            if not self.labels or self.labels[-1] != label:
                raise CowFormatError(
                    min(pos, size),
                    "label-not-found",
                    f"label {label} is not in the op stream (labels found: {self.labels or 'none'})",
                )
        elif self.footer is None:
            raise CowFormatError(
                min(pos, size), "no-footer", "the op stream ends without a footer (an unfinished file?)"
            )
        else:
            # With the footer known, data must end before it (AOSP's bound);
            # each op's data starts in the data area (checked as it was read).
            limit = self.footer["offset"]
            if self.data_end > limit:
                for index, (data_offset, data_length) in enumerate(zip(ops.data_offset, ops.data_length)):
                    if data_offset >= 0:
                        self._check_data_range(data_offset, data_length, index, ops.offset[index], limit=limit)
        # Where a writer resumes: the next op slot and the next data byte.
        self.next_op_pos = pos
        self.next_data_pos = data_pos

    def _walk_v2(self, pos: int, data_pos: int,
                 compression: int | None) -> tuple[int, int, int | None, int] | None:
        """Add the clustered op records from ``pos`` on to the table in C
        (``_cow_native.walk_v2``: plain data ops and the cluster op ending
        each cluster, read and checked a cluster at a time, by the rules of
        the per-op path), up to the first record it does not take: any other
        type, or one breaking a rule, which the per-op path then reads (and
        names the fault of). Returns the position, data stream position,
        compression and number of data ops after the records taken; None
        without the extension."""
        if _NATIVE is None:
            return None
        pos, data_pos, compression, data_ops = _NATIVE.walk_v2(
            self._fd, pos, data_pos, self.header.cluster_ops, self.data_start, self.file_size,
            -1 if compression is None else compression, self.table.columns(), _VALID_COMPRESSION,
            int(OpType.COPY), _REPLACE, int(OpType.ZERO), _XOR, _CLUSTER, SOURCE_MASK)
        return pos, data_pos, None if compression < 0 else compression, data_ops

    def _plain_v2(self, buf: bytes, count: int, pos: int, data_pos: int,
                  compression: int | None) -> tuple[int, int | None] | None:
        """Add the first ``count`` ops of ``buf`` (v2, clustered, read at ``pos``;
        all copy/replace/zero/xor) to the table in bulk: columns, not an op at
        a time. Returns the data stream position after them and the file's
        compression, or None, adding nothing, when one of them breaks a rule
        (the per-op path then reads them and names it). Without the
        ``_cow_native`` extension (with it, :meth:`_walk_v2` has taken every
        such run before this is reached)."""
        types, comps, lengths, new_blocks, sources = zip(*OP_V2.iter_unpack(buf[: count * OP_SIZE_V2]))
        used = set(comps)
        used.discard(0)
        if used:
            if len(used) > 1 or not used <= _COMPRESSIONS or (compression is not None and used != {compression}):
                return None
            compression = used.pop()
        if max(new_blocks) > 0xFFFFFFFF or max(sources) > SOURCE_MASK:
            return None
        data_offsets = array("q")
        start, size = self.data_start, self.file_size
        no_data, xor = -1, _XOR
        for op_type, length, source in zip(types, lengths, sources):
            if op_type == xor or op_type == _REPLACE:
                where = data_pos if op_type == xor else source
                if not length or where < start or where + length > size:
                    return None
                data_offsets.append(where)
                data_pos += length
            elif length:
                return None
            else:
                data_offsets.append(no_data)
        self.table.extend(types, new_blocks, sources, lengths, comps, range(pos, pos + count * OP_SIZE_V2, OP_SIZE_V2),
                          data_offsets, bytes(count))
        return data_pos, compression

    def read_raw_at(self, offset: int, length: int) -> bytes:
        return self._pread(length, offset)

    def _read_footer(self, offset, comp, data_length, ops_size, num_ops, found_ops) -> None:
        if offset + FOOTER_SIZE_V2 > self.file_size:
            raise CowFormatError(offset, "footer", "the footer is cut short by the end of the file")
        if data_length != FOOTER_UNUSED:
            raise CowFormatError(offset + 2, "footer", f"the footer op's data_length is {data_length}, expected 64")
        if num_ops != found_ops:
            raise CowFormatError(
                offset + 12, "footer", f"the footer counts {num_ops} ops, the op stream has {found_ops}"
            )
        if ops_size != num_ops * OP_SIZE_V2:
            raise CowFormatError(
                offset + 4, "footer", f"the footer's ops_size is {ops_size}, {num_ops} ops take {num_ops * OP_SIZE_V2}"
            )
        self.footer = {"offset": offset, "ops_size": ops_size, "num_ops": num_ops}

    @staticmethod
    def _v2_type(type_value: int, index: int, offset: int) -> OpType:
        try:
            return OpType(type_value)
        except ValueError:
            raise CowFormatError(offset, "op-type", f"op #{index} has unknown type {type_value}") from None

    @staticmethod
    def _check_data_length(op_type, data_length, index, offset) -> None:
        if op_type in _NO_DATA and data_length:
            raise CowFormatError(
                offset, "data-length", f"op #{index} ({op_type.name.lower()}) has data_length {data_length}, expected 0"
            )
        if op_type in _WITH_DATA and not data_length:
            raise CowFormatError(offset, "data-length", f"op #{index} ({op_type.name.lower()}) has no data")
        if op_type == OpType.SEQUENCE and data_length % 4:
            raise CowFormatError(
                offset, "sequence", f"sequence op #{index} has {data_length} bytes, not a whole number of u32"
            )

    def _check_data_range(self, data_offset, data_length, index, offset, *, limit) -> None:
        if data_offset < self.data_start or data_offset + data_length > limit:
            raise CowFormatError(
                offset,
                "data-outside-file",
                f"op #{index}'s {data_length} bytes of data at {data_offset} lie outside the data area "
                f"({self.data_start}..{limit})",
            )
