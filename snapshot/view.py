"""The snapshot view: the new partition's bytes, as ``base + COW``.

snapuserd's read rules, per new block B: no op → base block B; Copy → base
block ``source``; Replace → the decompressed data; Zero → zeros; Xor → the
base bytes at byte offset ``source`` XOR the decompressed data. A block
marked *merged* reads the base directly (its new contents are already
there), which is how a merge engine hands blocks over as it goes; the same
view serves both the snapshot backend and, later, the merge.

The block → op lookup is a sorted array of op start blocks and a bisect,
not a dict per block, so a multi-gigabyte partition costs a few bytes per
op. Decompressed chunks go through a small LRU cache (bounded in bytes):
reads of neighbouring blocks of one v3 chunk decompress it once.

Reads are planned by ranges, not per block: the requested blocks are walked
op by op (a bisect finds the first), runs of base blocks that read
consecutive base blocks (unchanged, merged, or Copy ops with consecutive
sources) become one ``preadv`` straight into the reply buffer, and what is
in memory (decompressed Replace data, Xor results, window blocks) and zero
runs become data-mover requests (``("copy", dst, src)``, ``("fill", dst,
b"\0")``). :meth:`gather` does the I/O part (synchronous, thread-safe:
``os.preadv``, a locked cache; async callers run it in a worker thread) and
returns the requests; :meth:`aread` runs them through a
:class:`~dmuserd.dsa_offload.Mover` as one batch (small ones stay on the
CPU, big or many go to DSA), :meth:`read` on the CPU directly. Base data
goes from the page cache into the reply by the kernel's copy; the mover
does the copies in memory.

During an online merge the base changes under the view. Blocks of an
ordered window (Copy/Xor ops, whose sources the window itself may
overwrite) are served from memory while the base is written:
:meth:`publish_window` installs them and returns only once every read that
started before can no longer look at the base for them (each read
registers in an epoch; a publish waits for the older epochs to drain, like
an RCU grace period). :meth:`retire_window` marks the window merged and
drops it. Replace/Zero blocks need none of this: their data never comes
from the base, and no unmerged op reads the blocks they overwrite.

A separate merge device (``merge_base``, snapuserd's ``base_path_merge``):
Android maps the old partition twice, ``<p>-src`` (what the snapshot reads)
and ``<p>-base`` (what the merge writes), two dm devices over the same
blocks, each with its own page cache. A block the merge wrote is read from
the merge device (a copy of it cached by the source device would be the
old data), as is everything once the merge is done (:meth:`read_base`);
blocks not merged yet come from the source device, which the merge never
writes.
"""

from __future__ import annotations

import os
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict

from dmuserd.dsa_offload import _cpu as _cpu_moves

from dmuserd.snapshot._compression import decompress
from dmuserd.snapshot._cow_format import CowError, CowFormatError, CowOp, OpType
from dmuserd.snapshot._cow_reader import CowReader
from dmuserd.snapshot._cow_writer import xor_bytes

DEFAULT_CACHE_BYTES = 32 << 20

# Stored chunks at most this far apart, within this span, are read with one pread.
_PREFETCH_GAP, _PREFETCH_SPAN = 16 << 10, 1 << 20

# Kinds of the pieces a read is planned in (see SnapshotView._segments).
_BASE, _ZERO, _MEMORY, _DATA, _MERGED = range(5)


class MergeBaseError(CowError):
    """A separate merge device that cannot stand for the base (another size, a non-raw base)."""


def run_on_cpu(requests) -> None:
    """Carry out :meth:`SnapshotView.gather`'s requests on the CPU, here and now."""
    for name, dst, src in requests:
        if name == "copy":
            _cpu_moves.copy(dst, memoryview(src))
        else:
            _cpu_moves.fill(dst, _cpu_moves.expand_pattern(src))


class SnapshotView:
    """Target bytes of a COW file applied to a base image.

    ``reader`` is an open :class:`CowReader`; ``base`` a path or a readable
    file descriptor (a descriptor stays the caller's), or any image of
    :mod:`dmuserd.images`: a locator (``super.img::system_a``), or an open
    :class:`~dmuserd.images.Image` (which stays the caller's). A path to an
    Android sparse image reads as the raw image it stands for. ``size`` is the
    target size in bytes (the COW header does not record it), by default
    the base's. ``merged_ops`` marks the first ``merged_ops`` ops of the
    merge order as merged (pass ``reader.num_merge_ops`` when the base
    really holds the merge's progress). Ops are checked against the base
    and target sizes (:class:`CowFormatError` ``source-outside-base`` /
    ``block-outside-target``). ``merge_base``: the path of a separate
    device the merge writes (see the module doc), the base's size; merged
    blocks are read from it.
    """

    def __init__(self, reader: CowReader, base, *, size: int | None = None, merged_ops: int = 0,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, merge_base=None) -> None:
        self.reader = reader
        self.block_size = reader.block_size
        #: the base when it is not a plain file (a sparse image, a super partition, a zip entry): reads go
        #: through :meth:`dmuserd.images.Image.readinto` instead of ``preadv``
        self.base_image = None
        self._opened = None  # the image this view opened (and closes)
        if isinstance(base, int):
            self._base_fd = base
        else:
            from dmuserd.images import Image, RawImage, open_image

            image = base if isinstance(base, Image) else open_image(base)
            self._opened = None if image is base else image
            if isinstance(image, RawImage) and image.start == 0:
                self._base_fd = image.fd
            else:
                self._base_fd, self.base_image = -1, image
        try:
            self.base_size = (self.base_image.size if self.base_image is not None
                              else os.lseek(self._base_fd, 0, os.SEEK_END))  # block devices too
            self.size = self.base_size if size is None else size
            reader.check_base_size(self.base_size)
            reader.check_target_size(self.size)
            self._merge_fd = self._base_fd
            if merge_base is not None:
                self._open_merge_base(merge_base)
        except BaseException:
            self.close()
            raise
        self.num_blocks = -(-self.size // self.block_size)
        ops = sorted(reader.data_ops, key=lambda op: op.new_block)
        self._ops = ops
        self._starts = array("Q", (op.new_block for op in ops))
        self._ends = array("Q", (op.new_block + op.blocks for op in ops))
        self._merged = bytearray((self.num_blocks + 7) // 8)
        self._any_merged = False
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes
        self._lock = threading.Lock()
        self._zero = bytes(self.block_size)
        # online merge: the window served from memory, and the readers per epoch
        self._window: dict[int, bytes] | None = None
        self._epoch = 0
        self._readers: dict[int, int] = {}
        self._grace = threading.Condition(threading.Lock())
        if merged_ops:
            for op in reader.merge_order()[:merged_ops]:
                self.mark_merged(op)

    def _open_merge_base(self, path) -> None:
        """Open the separate merge device (read-only here: the merge opens it to write)."""
        if self.base_image is not None:
            raise MergeBaseError(f"the base is read as a {self.base_image.kind} image: "
                                 "a separate merge device needs a plain base file or device")
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        size = os.lseek(fd, 0, os.SEEK_END)
        if size != self.base_size:
            os.close(fd)
            raise MergeBaseError(f"the merge device {os.fspath(path)} has {size} bytes, the base "
                                 f"{self.base_size}: they must be two views of the same blocks")
        self._merge_fd = fd

    # --- lookup ------------------------------------------------------------

    def op_for_block(self, block: int) -> tuple[CowOp, int] | None:
        """The op that writes new block ``block`` and the block's index in its chunk."""
        i = bisect_right(self._starts, block) - 1
        if i < 0:
            return None
        op = self._ops[i]
        within = block - op.new_block
        return (op, within) if within < op.blocks else None

    def mark_merged(self, what) -> None:
        """From now on, read block(s) from the base: a block number or an op."""
        blocks = range(what.new_block, what.new_block + what.blocks) if isinstance(what, CowOp) else (what,)
        for block in blocks:
            if 0 <= block < self.num_blocks:
                self._merged[block >> 3] |= 1 << (block & 7)
                self._any_merged = True

    def is_merged(self, block: int) -> bool:
        return bool(self._merged[block >> 3] & (1 << (block & 7)))

    # --- online merge ----------------------------------------------------------

    def publish_window(self, blocks: dict[int, bytes]) -> None:
        """Serve ``blocks`` (new block -> its whole new contents) from memory.

        Blocks until every read that started before the call has finished,
        so the caller may then overwrite those blocks' sources in the base.
        Call it from a worker thread.
        """
        with self._grace:
            self._window = blocks
            self._epoch += 1
            current = self._epoch
            while any(epoch < current for epoch in self._readers):
                self._grace.wait()

    def retire_window(self, ops) -> None:
        """The window's ops are merged and durable: read them from the base again."""
        for op in ops:
            self.mark_merged(op)
        with self._grace:
            self._window = None

    def _enter(self) -> tuple[int, dict[int, bytes] | None]:
        with self._grace:
            epoch = self._epoch
            self._readers[epoch] = self._readers.get(epoch, 0) + 1
            return epoch, self._window

    def _leave(self, epoch: int) -> None:
        with self._grace:
            left = self._readers[epoch] - 1
            if left:
                self._readers[epoch] = left
            else:
                del self._readers[epoch]
                self._grace.notify_all()

    # --- reads ---------------------------------------------------------------

    def read_block(self, block: int) -> bytes:
        """The target bytes of new block ``block`` (a whole block)."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} is outside the {self.num_blocks}-block target")
        bs = self.block_size
        return self.read(block * bs, min(bs, self.size - block * bs)).ljust(bs, b"\0")

    def read(self, offset: int, length: int, mover=None) -> bytes:
        """``length`` target bytes at ``offset`` (any alignment, within ``size``).

        ``mover``: a :class:`~dmuserd.dsa_offload.BlockingMover` to place the
        data (a blocking tool's); without one, the CPU does, here.
        """
        data, requests = self.gather(offset, length)
        if mover is not None and requests:
            mover.batch(requests)
        else:
            run_on_cpu(requests)
        return bytes(data)

    async def aread(self, offset: int, length: int, mover, *, in_thread: bool = True) -> memoryview:
        """:meth:`read`, with the in-memory copies and zero fills done by ``mover``.

        The I/O (base preads, decompression) runs in a worker thread unless
        ``in_thread`` is False (the caller knows it is cheap); the mover
        then places the data as one batch.
        """
        if in_thread:
            import trio

            data, requests = await trio.to_thread.run_sync(self.gather, offset, length)
        else:
            data, requests = self.gather(offset, length)
        if requests:
            await mover.batch(requests)
        return data

    def gather(self, offset: int, length: int) -> tuple[memoryview, list[tuple]]:
        """Start a read: a new buffer with the base parts read into it, and the
        mover requests that complete it (see the module docstring).

        Returns ``(data, requests)``; ``data`` (``length`` bytes at
        ``offset``) holds the target bytes once every request has run.
        """
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"read of {length} bytes at {offset} is outside the {self.size}-byte target")
        if not length:
            return memoryview(b""), []
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        out = memoryview(bytearray((last - first + 1) * bs))
        requests: list[tuple] = []
        epoch, window = self._enter()
        try:
            segments = self._segments(first, last + 1, window)
            # Unchanged blocks are most of a typical read: when they are at
            # least half of the span they cover, one preadv reads the span
            # (what lies between is overwritten below) instead of one per run.
            same = [seg for seg in segments if seg[0] == _BASE and seg[1] == seg[3]]
            span = None
            if len(same) > 1:
                lo, hi = same[0][1], same[-1][1] + same[-1][2]
                if 2 * sum(seg[2] for seg in same) >= hi - lo:
                    span = (lo, hi)
                    self._pread_into(out[(lo - first) * bs : (hi - first) * bs], lo * bs)
            self._prefetch([seg[3][0] for seg in segments if seg[0] == _DATA])
            for kind, at, count, arg in segments:
                dst = out[(at - first) * bs : (at - first + count) * bs]
                if kind == _BASE:
                    if span is None or at != arg or not span[0] <= at < span[1]:
                        self._pread_into(dst, arg * bs)
                elif kind == _MERGED:
                    self._pread_into(dst, arg * bs, self._merge_fd)
                elif kind == _ZERO:
                    requests.append(("fill", dst, b"\0"))
                elif kind == _MEMORY:
                    requests.append(("copy", dst, arg))
                else:  # _DATA: blocks of one op's decompressed chunk
                    op, within = arg
                    data = memoryview(self._chunk(op))[within * bs : (within + count) * bs]
                    if op.type == OpType.XOR:
                        src = op.source + within * bs
                        if span is not None and src == at * bs and span[0] <= at and at + count <= span[1]:
                            base = bytes(dst)  # its own block, read with the span and not written since
                        else:
                            base = self._read_base(src, count * bs)
                        data = xor_bytes(data, base)
                    requests.append(("copy", dst, data))
        finally:
            self._leave(epoch)
        skip = offset - first * bs
        return out[skip : skip + length], requests

    def _segments(self, start: int, stop: int, window: dict[int, bytes] | None):
        """New blocks ``start..stop-1`` as coalesced pieces ``(kind, block, count, arg)``:
        ``_BASE`` (arg: first base block), ``_ZERO``, ``_MEMORY`` (arg: the
        bytes), ``_DATA`` (arg: ``(op, index of the first block in its chunk)``)."""
        out: list[list] = []

        def put(kind, block, count, arg):
            if out:
                prev = out[-1]
                if prev[0] == kind and prev[1] + prev[2] == block and (
                    kind == _ZERO or (kind in (_BASE, _MERGED) and prev[3] + prev[2] == arg)
                ):
                    prev[2] += count
                    return
            out.append([kind, block, count, arg])

        ops, starts, ends = self._ops, self._starts, self._ends
        i = bisect_right(starts, start) - 1
        if i < 0 or ends[i] <= start:
            i += 1
        n = len(ops)
        block = start
        merged = self._any_merged
        merged_kind = _MERGED if self._merge_fd != self._base_fd else _BASE
        while block < stop:
            if i >= n or starts[i] > block:  # no op here: the base block as is
                end = stop if i >= n else min(starts[i], stop)
                put(_BASE, block, end - block, block)
                block = end
                continue
            op = ops[i]
            end = min(ends[i], stop)
            i += 1
            b = block
            while b < end:
                if merged and self.is_merged(b):
                    put(merged_kind, b, 1, b)
                    b += 1
                    continue
                kind = op.type
                if window is not None and b in window:
                    put(_MEMORY, b, 1, window[b])
                    b += 1
                elif kind == OpType.COPY:
                    put(_BASE, b, 1, op.source + (b - op.new_block))
                    b += 1
                elif kind == OpType.ZERO:
                    run = end - b if not merged else 1
                    put(_ZERO, b, run, None)
                    b += run
                else:  # Replace, Xor: the op's blocks from b on, in one piece
                    run = end - b if not merged and (window is None or kind == OpType.REPLACE) else 1
                    put(_DATA, b, run, (op, b - op.new_block))
                    b += run
            block = end
        return out

    def _pread_into(self, dst: memoryview, offset: int, fd: int | None = None) -> None:
        """Base bytes (or ``fd``'s) into ``dst``; past the base's end stays zero (a grown target)."""
        if self.base_image is not None:
            self.base_image.readinto(dst, offset)
            return
        fd = self._base_fd if fd is None else fd
        done, n = 0, len(dst)
        while done < n and offset + done < self.base_size:
            got = os.preadv(fd, [dst[done:]], offset + done)
            if not got:
                break
            done += got

    def _chunk(self, op: CowOp) -> bytes:
        with self._lock:
            data = self._cache.get(op.index)
            if data is not None:
                self._cache.move_to_end(op.index)
                return data
        data = self.reader.read_data(op)
        self._cache_put(op.index, data)
        return data

    def _cache_put(self, index: int, data: bytes) -> None:
        with self._lock:
            if index not in self._cache and len(data) <= self._cache_limit:
                self._cache[index] = data
                self._cache_bytes += len(data)
                while self._cache_bytes > self._cache_limit:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= len(old)

    def _prefetch(self, ops: list[CowOp]) -> None:
        """Cache the chunks of ``ops`` reading neighbouring stored data with one
        pread (a read's Replace ops are usually stored one after another)."""
        if len(ops) < 2:
            return
        with self._lock:
            todo = sorted({op.index: op for op in ops if op.index not in self._cache}.values(),
                          key=lambda op: op.data_offset)
        i = 0
        while i < len(todo):
            start = todo[i].data_offset
            end = start + todo[i].data_length
            j = i + 1
            while (j < len(todo) and todo[j].data_offset - end <= _PREFETCH_GAP
                   and todo[j].data_offset + todo[j].data_length - start <= _PREFETCH_SPAN):
                end = max(end, todo[j].data_offset + todo[j].data_length)
                j += 1
            if j - i > 1:
                raw = self.reader.read_raw_at(start, end - start)
                if len(raw) == end - start:  # else the file shrank: _chunk reports it
                    reader = self.reader
                    for op in todo[i:j]:
                        at = op.data_offset - start
                        try:
                            data = decompress(reader.compression, reader.version, raw[at : at + op.data_length],
                                              op.chunk_size, offset=op.data_offset)
                        except CowFormatError as exc:
                            raise exc.with_path(reader.path) from None
                        self._cache_put(op.index, data)
            i = j

    def read_base(self, offset: int, length: int) -> bytes:
        """The base's bytes as they are (once merged, the target's); zeros past its end.

        Read from the merge device when there is a separate one: it is what the merge wrote.
        """
        return self._read_base(offset, length, self._merge_fd)

    def _read_base(self, offset: int, length: int, fd: int | None = None) -> bytes:
        """Base bytes (or ``fd``'s); past the base's end (a grown target) reads zeros."""
        if self.base_image is not None:
            return self.base_image.pread(length, offset)
        fd = self._base_fd if fd is None else fd
        data = os.pread(fd, length, offset) if offset < self.base_size else b""
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def close(self) -> None:
        merge_fd = getattr(self, "_merge_fd", -1)
        if merge_fd not in (-1, self._base_fd):
            os.close(merge_fd)
        self._merge_fd = -1
        if self._opened is not None:
            self._opened.close()
        self._opened = self.base_image = None
        self._base_fd = -1

    def __enter__(self) -> "SnapshotView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
