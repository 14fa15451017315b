"""Write a COW file (v2 or v3), byte-compatible with AOSP's writers.

:class:`CowWriter` lays a file out the way AOSP's ``CowWriterV2`` /
``CowWriterV3`` do (same positions, same header values, same cluster
arithmetic), so a file written with the same ops and options is the same
bytes: the AOSP test vector ``cow_v2`` is reproduced exactly.

Crash safety is the format's own: a label is a point an interrupted write
can resume from. ``add_label`` makes everything before it durable (fsync)
and, in v3, publishes it in the header (op count and resume point); after a
crash, :meth:`CowWriter.resume` reopens the file at that label, drops what
came after, and continues. Nothing written after the last label is
trusted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from dmuserd.snapshot._compression import Compressor
from dmuserd.snapshot._cow_format import (
    DEFAULT_BUFFER_SIZE,
    FOOTER_OP,
    FOOTER_SIZE_V2,
    FOOTER_UNUSED,
    HEADER_SIZE_V2,
    HEADER_SIZE_V3,
    MAX_FACTOR_SHIFT,
    OP_SIZE_V2,
    OP_SIZE_V3,
    RESUME_POINT,
    RESUME_POINT_MAX,
    RESUME_POINT_SIZE,
    SOURCE_MASK,
    Compression,
    CowHeader,
    CowWriterError,
    OpType,
    pack_op_v2,
    pack_op_v3,
)

#: AOSP's CowOptions default for v2 cluster_ops
DEFAULT_CLUSTER_OPS = 200
#: v3: flush cached ops once this many are queued or this much data
_V3_BATCH_OPS = 1024
_V3_BATCH_BYTES = 1 << 20


def xor_bytes(a: bytes, b: bytes) -> bytes:
    """``a XOR b`` for equal-length byte strings (what an Xor op stores)."""
    if len(a) != len(b):
        raise ValueError(f"xor of {len(a)} and {len(b)} bytes")
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


class CowWriter:
    """Write a COW file.

    ::

        with CowWriter("new.cow", version=3, compression="lz4", op_count_max=n) as w:
            w.add_sequence_data([0])          # before any op
            w.add_copy(0, 5)                  # new block 0 = base block 5
            w.add_replace(2, data)            # len(data) = k * block_size
            w.add_label(1)                    # durable; resumable from here
            w.add_xor(50, xored, 98314)       # stored data = new XOR base[98314:]
            w.add_zero(5, 10)                 # new blocks 5..14 are zeros
            w.finalize()

    Parameters: ``version`` 2 or 3; ``compression`` a name (``none``,
    ``gz``, ``brotli``, ``lz4``, ``zstd``) or :class:`Compression`, with
    ``compression_level`` (AOSP's defaults otherwise); ``block_size``;
    ``cluster_ops`` (v2: ops per cluster, 0 for none; default 200 as AOSP);
    ``compression_factor`` (v3: the largest Replace chunk in bytes,
    ``block_size << k`` with k <= 6; default one block); ``op_count_max``
    (v3: size of the op array, required; an upper bound on ops, e.g. the
    partition's block count); ``buffer_size`` (scratch space for the merge,
    2 MiB by default); ``num_merge_ops`` (header field, normally 0);
    ``sync`` (fsync at labels and finalize).

    Rules the writer enforces, so it never writes a file the reader would
    refuse: one op per new block, sequence data before any op, one
    algorithm per file, v3 op count within ``op_count_max``.

    ``finalize()`` completes the file (v2 footer; v3 header) and closes it;
    ``close()`` without it leaves the file as an interrupted write would,
    resumable from its last label.
    """

    def __init__(
        self,
        path,
        *,
        version: int = 2,
        compression="none",
        compression_level: int | None = None,
        block_size: int = 4096,
        cluster_ops: int | None = None,
        compression_factor: int | None = None,
        op_count_max: int | None = None,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        num_merge_ops: int = 0,
        sync: bool = True,
    ) -> None:
        if version not in (2, 3):
            raise CowWriterError(f"COW version {version} cannot be written (2 and 3 can)")
        if block_size < 512 or block_size > 32768 or block_size & (block_size - 1):
            raise CowWriterError(f"block size {block_size} is not a power of two from 512 to 32768")
        algorithm = Compression.parse(compression)
        if version == 2:
            cluster_ops = DEFAULT_CLUSTER_OPS if cluster_ops is None else cluster_ops
            if cluster_ops == 1 or cluster_ops < 0:
                raise CowWriterError(f"cluster_ops {cluster_ops}: use 0 (no clusters) or at least 2")
            header = CowHeader(
                major=2, header_size=HEADER_SIZE_V2, block_size=block_size, cluster_ops=cluster_ops,
                num_merge_ops=num_merge_ops, buffer_size=buffer_size,
            )
        else:
            factor = block_size if compression_factor is None else compression_factor
            if factor % block_size or (factor // block_size) & (factor // block_size - 1) or (
                factor > block_size << MAX_FACTOR_SHIFT
            ):
                raise CowWriterError(
                    f"compression factor {factor} is not block_size << k with k from 0 to {MAX_FACTOR_SHIFT}"
                )
            if op_count_max is None:
                raise CowWriterError(
                    "a v3 COW file needs op_count_max (its op array is sized up front): pass an upper bound "
                    "such as the partition's block count"
                )
            header = CowHeader(
                major=3, header_size=HEADER_SIZE_V3, footer_size=0, op_size=OP_SIZE_V3, block_size=block_size,
                num_merge_ops=num_merge_ops, buffer_size=buffer_size, resume_point_max=RESUME_POINT_MAX,
                op_count_max=op_count_max, compression_algorithm=int(algorithm), max_compression_size=factor,
            )
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        self._setup(header, algorithm, compression_level, sync)
        try:
            os.pwrite(self._fd, header.pack(), 0)
            # the scratch region is zeros: a sparse extension writes the same bytes
            os.ftruncate(self._fd, header.header_size + header.buffer_size)
            self._sync()
        except BaseException:
            self.close()
            raise

    def _setup(self, header: CowHeader, algorithm: Compression, level: int | None, sync: bool) -> None:
        self.header = header
        self.version = header.major
        self.block_size = header.block_size
        self.compression = algorithm
        self._compressor = Compressor(algorithm, level, version=header.major)
        self._do_sync = sync
        self._blocks: set[int] = set()
        self._seen_data_op = False
        self._finalized = False
        if self.version == 2:
            self._num_ops = 0
            self._cluster_size = header.cluster_ops * OP_SIZE_V2
            self._next_op_pos = header.header_size + header.buffer_size
            self._next_data_pos = self._next_op_pos + (self._cluster_size or OP_SIZE_V2)
            self._current_cluster_size = 0
            self._current_data_size = 0
        else:
            self._resume_points: list[tuple[int, int]] = []
            self._pending_ops: list[bytes] = []
            self._pending_data: list[bytes] = []
            self._pending_bytes = 0
            self._next_data_pos = self._v3_data_offset()

    # --- resume ----------------------------------------------------------

    @classmethod
    def resume(
        cls, path, label: int, *, compression=None, compression_level: int | None = None, sync: bool = True
    ) -> "CowWriter":
        """Reopen an interrupted (or finished) file at ``label`` and continue.

        Everything after the label is dropped, on disk too, before this
        returns. ``compression`` is needed only if no compressed op was
        written before the label (v2 records it per op); if given, it must
        match the file's.
        """
        from dmuserd.snapshot._cow_reader import CowReader

        reader = CowReader(path, label=label, check_merge=False)
        with reader:
            header = reader.header
            if header.major not in (2, 3):
                raise CowWriterError(f"{path}: version {header.major} files cannot be resumed (2 and 3 can)")
            algorithm = reader.compression
            if compression is not None:
                wanted = Compression.parse(compression)
                if algorithm not in (Compression.NONE, wanted) or (header.major >= 3 and algorithm != wanted):
                    raise CowWriterError(
                        f"{path} is compressed with {algorithm.name.lower()}, not {wanted.name.lower()}"
                    )
                algorithm = wanted
            self = cls.__new__(cls)
            self.path = os.fspath(path)
            self._fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            try:
                self._setup(header, algorithm, compression_level, sync)
                self._replay(reader)
            except BaseException:
                self.close()
                raise
        return self

    def _replay(self, reader) -> None:
        for op in reader.data_ops:
            self._blocks.update(range(op.new_block, op.new_block + op.blocks))
        self._seen_data_op = bool(reader.data_ops)
        if self.version == 2:
            # AOSP's OpenForAppend: re-add every op to recompute positions.
            self._num_ops = len(reader.ops)
            self._next_op_pos = reader.next_op_pos
            self._next_data_pos = reader.next_data_pos
            self._current_cluster_size = self._current_data_size = 0
            if self._cluster_size:
                for op in reader.ops:
                    if op.type == OpType.CLUSTER:
                        self._current_cluster_size = self._current_data_size = 0
                    else:
                        self._current_cluster_size += OP_SIZE_V2
                        self._current_data_size += op.data_length
                # stale op records after the label in this cluster: clear them
                unused = self._cluster_size - self._current_cluster_size
                if unused > 0:
                    os.pwrite(self._fd, bytes(unused), self._next_op_pos)
                end = self._next_data_pos
            else:
                end = self._next_op_pos
            os.ftruncate(self._fd, end)
        else:
            count = len(reader.ops)
            self.header.op_count = count
            self._resume_points = [(lbl, idx) for lbl, idx in reader.resume_points if idx <= count]
            self.header.resume_point_count = len(self._resume_points)
            self._next_data_pos = reader.data_end
            if os.fstat(self._fd).st_size > self._next_data_pos:
                os.ftruncate(self._fd, self._next_data_pos)
            self._write_v3_header()
        self._sync()

    # --- the op API --------------------------------------------------------

    def add_copy(self, new_block: int, old_block: int, count: int = 1) -> None:
        """New blocks ``new_block..+count-1`` are base blocks ``old_block..``."""
        self._check_blocks(new_block, count)
        for i in range(count):
            self._emit(OpType.COPY, new_block + i, old_block + i)

    def add_replace(self, new_block: int, data) -> None:
        """New blocks from ``new_block`` are ``data`` (whole blocks)."""
        view = self._whole_blocks(data)
        count = len(view) // self.block_size
        self._check_blocks(new_block, count)
        bs = self.block_size
        if self.version == 2:
            for i in range(count):
                self._emit(OpType.REPLACE, new_block + i, 0, view[i * bs : (i + 1) * bs])
            return
        # v3: chunks as large as the compression factor allows (AOSP's
        # GetCompressionFactor: the largest power-of-two run that fits).
        done = 0
        while done < count:
            chunk = self.header.max_compression_size
            while chunk > bs and chunk // bs > count - done:
                chunk >>= 1
            self._emit(OpType.REPLACE, new_block + done, 0, view[done * bs : done * bs + chunk],
                       factor=(chunk // bs).bit_length() - 1)
            done += chunk // bs

    def add_zero(self, new_block: int, count: int = 1) -> None:
        """New blocks ``new_block..+count-1`` are zeros."""
        self._check_blocks(new_block, count)
        for i in range(count):
            self._emit(OpType.ZERO, new_block + i, 0)

    def add_xor(self, new_block: int, data, old_offset: int) -> None:
        """New blocks from ``new_block`` are ``data XOR base[old_offset + i*block_size ...]``.

        ``data`` is what is stored: the new blocks XOR the base bytes at
        ``old_offset`` (a byte offset; use :func:`xor_bytes`).
        """
        view = self._whole_blocks(data)
        count = len(view) // self.block_size
        self._check_blocks(new_block, count)
        bs = self.block_size
        for i in range(count):
            self._emit(OpType.XOR, new_block + i, old_offset + i * bs, view[i * bs : (i + 1) * bs])

    def add_label(self, label: int) -> None:
        """Mark a resume point; everything written so far becomes durable."""
        self._check_open()
        if not 0 <= label <= 0xFFFFFFFFFFFFFFFF:
            raise CowWriterError(f"label {label} is not a u64")
        if self.version == 2:
            self._emit_v2(OpType.LABEL, 0, label)
        else:
            self._flush_v3()
            # AOSP: drop points at or after this label, keep the newest 4
            points = [p for p in self._resume_points if p[0] < label]
            points.append((label, self.header.op_count))
            self._resume_points = points[-self.header.resume_point_max :]
            self.header.resume_point_count = len(self._resume_points)
            data = b"".join(RESUME_POINT.pack(*p) for p in self._resume_points)
            os.pwrite(self._fd, data, self._v3_resume_offset())
            self._write_v3_header()
        self._sync()

    def add_sequence_data(self, blocks: Iterable[int]) -> None:
        """The merge order of the ordered ops (their new blocks), before any op."""
        self._check_open()
        blocks = list(blocks)
        if self._seen_data_op or (self.version >= 3 and (self.header.sequence_data_count or self._resume_points)):
            raise CowWriterError("sequence data must come before every op and label (and only once in v3)")
        raw = b"".join(b.to_bytes(4, "little") for b in blocks)
        if self.version == 2:
            per_op = self.block_size * 2  # AOSP: (block_size * 2) / sizeof(u32) entries
            for start in range(0, len(raw), per_op):
                self._emit_v2(OpType.SEQUENCE, 0, 0, raw[start : start + per_op])
        else:
            self.header.sequence_data_count = len(blocks)
            os.pwrite(self._fd, raw, self.header.header_size + self.header.buffer_size)
            self._next_data_pos = self._v3_data_offset()

    def finalize(self) -> None:
        """Complete the file (v2: the footer; v3: the header) and close it."""
        self._check_open()
        if self.version == 2:
            self._finalize_v2()
        else:
            self._flush_v3()
            self._write_v3_header()
        self._sync()
        self._finalized = True
        self.close()

    def close(self) -> None:
        """Close the file; without :meth:`finalize`, it stays resumable from its last label."""
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "CowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- helpers -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._fd < 0:
            raise CowWriterError(f"{self.path}: the writer is closed")

    def _whole_blocks(self, data) -> memoryview:
        view = memoryview(data).cast("B")
        if not len(view) or len(view) % self.block_size:
            raise CowWriterError(f"{len(view)} bytes of data is not a whole number of {self.block_size}-byte blocks")
        return view

    def _check_blocks(self, new_block: int, count: int) -> None:
        self._check_open()
        if count < 1:
            raise CowWriterError(f"block count {count} must be at least 1")
        if new_block < 0 or new_block + count - 1 > 0xFFFFFFFF:
            raise CowWriterError(f"new blocks {new_block}..{new_block + count - 1} do not fit in 32 bits")
        blocks = range(new_block, new_block + count)
        if not self._blocks.isdisjoint(blocks):
            dup = next(b for b in blocks if b in self._blocks)
            raise CowWriterError(
                f"new block {dup} already has an op; two ops for one block make the file ambiguous"
            )
        self._blocks.update(blocks)

    def _emit(self, op_type: OpType, new_block: int, source: int, data=None, *, factor: int = 0) -> None:
        if source > SOURCE_MASK or source < 0:
            raise CowWriterError(f"source {source} does not fit in 48 bits")
        self._seen_data_op = True
        stored = None if data is None else self._compressor.compress(data)
        if self.version == 2:
            self._emit_v2(op_type, new_block, source, stored, int(self.compression) if stored is not None else 0)
        else:
            self._queue_v3(op_type, new_block, source, stored, factor)

    def _sync(self) -> None:
        if self._do_sync:
            os.fsync(self._fd)

    # --- v2 ----------------------------------------------------------------

    def _emit_v2(self, op_type: OpType, new_block: int, source: int, data=None, compression: int = 0) -> None:
        self._emit_cluster_if_needed()
        data = data or b""
        if len(data) > 0xFFFF:
            raise CowWriterError(f"{len(data)} bytes of op data do not fit a v2 op (at most 65535)")
        if op_type in (OpType.REPLACE, OpType.SEQUENCE):
            source = self._next_data_pos
        self._write_op_v2(op_type, compression, len(data), new_block, source, data)

    def _write_op_v2(self, op_type, compression, data_length, new_block, source, data=b"") -> None:
        os.pwrite(self._fd, pack_op_v2(op_type, compression, data_length, new_block, source), self._next_op_pos)
        if data:
            os.pwrite(self._fd, data, self._next_data_pos)
        # AOSP's AddOperation: advance the op and data positions
        self._num_ops += 1
        if op_type == OpType.CLUSTER:
            self._current_cluster_size = self._current_data_size = 0
        elif self._cluster_size:
            self._current_cluster_size += OP_SIZE_V2
            self._current_data_size += data_length
        clustered = bool(self._cluster_size)
        if op_type == OpType.CLUSTER:
            self._next_op_pos += OP_SIZE_V2 + source
            self._next_data_pos += data_length + self._cluster_size
        else:
            self._next_op_pos += OP_SIZE_V2 + (0 if clustered else data_length)
            self._next_data_pos += data_length + (0 if clustered else OP_SIZE_V2)

    def _emit_cluster(self) -> None:
        # the next cluster starts after this one's free slots and its data
        skip = self._current_data_size + self._cluster_size - self._current_cluster_size - OP_SIZE_V2
        self._write_op_v2(OpType.CLUSTER, 0, 0, 0, skip)

    def _emit_cluster_if_needed(self) -> None:
        # room for this op and the cluster op that ends the cluster?
        if self._cluster_size and self._cluster_size < self._current_cluster_size + 2 * OP_SIZE_V2:
            self._emit_cluster()

    def _finalize_v2(self) -> None:
        if self._cluster_size:
            unused = self._cluster_size - self._current_cluster_size
            if unused > 0:
                os.pwrite(self._fd, bytes(unused), self._next_op_pos)
            if self._current_data_size > 0:
                # the footer must end the file: close the cluster first
                self._emit_cluster()
        footer = FOOTER_OP.pack(OpType.FOOTER, 0, FOOTER_UNUSED, self._num_ops * OP_SIZE_V2, self._num_ops)
        os.pwrite(self._fd, footer + bytes(FOOTER_UNUSED), self._next_op_pos)
        os.ftruncate(self._fd, self._next_op_pos + FOOTER_SIZE_V2)

    # --- v3 ----------------------------------------------------------------

    def _v3_resume_offset(self) -> int:
        h = self.header
        return h.header_size + h.buffer_size + 4 * h.sequence_data_count

    def _v3_op_offset(self, index: int) -> int:
        return self._v3_resume_offset() + RESUME_POINT_SIZE * self.header.resume_point_max + OP_SIZE_V3 * index

    def _v3_data_offset(self) -> int:
        return self._v3_op_offset(self.header.op_count_max)

    def _queue_v3(self, op_type, new_block, source, data, factor) -> None:
        h = self.header
        if h.op_count + len(self._pending_ops) + 1 > h.op_count_max:
            raise CowWriterError(
                f"op_count_max {h.op_count_max} reached; create the file with a larger op_count_max"
            )
        data = data or b""
        if op_type == OpType.REPLACE:
            source = self._next_data_pos + self._pending_bytes
        self._pending_ops.append(pack_op_v3(op_type, len(data), new_block, source, factor))
        if data:
            self._pending_data.append(data)
            self._pending_bytes += len(data)
        if len(self._pending_ops) >= _V3_BATCH_OPS or self._pending_bytes >= _V3_BATCH_BYTES:
            self._flush_v3()

    def _flush_v3(self) -> None:
        if not self._pending_ops:
            return
        os.pwrite(self._fd, b"".join(self._pending_ops), self._v3_op_offset(self.header.op_count))
        if self._pending_data:
            os.pwrite(self._fd, b"".join(self._pending_data), self._next_data_pos)
        self.header.op_count += len(self._pending_ops)
        self._next_data_pos += self._pending_bytes
        self._pending_ops, self._pending_data, self._pending_bytes = [], [], 0

    def _write_v3_header(self) -> None:
        os.pwrite(self._fd, self.header.pack(), 0)
