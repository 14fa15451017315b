"""The in-place merge itself: snapuserd's crash-safe protocol, step by step.

:class:`MergeEngine` writes the ops of a COW file into its base in merge
order. What makes it safe to interrupt at any instant
(``../shared/specs/android-cow.md``, "Merge order"):

* **Ordered ops (Copy/Xor)** merge in windows of at most
  ``ScratchLayout.capacity`` blocks. The window's new contents are computed
  from the base before any of it is overwritten. When an op of the window
  reads a block the window writes (a Copy chain inside the window, an Xor
  of its own block), the window first goes to the COW file's scratch area
  (entries, data, our CRC), is synced, then the state byte becomes 2 and is
  synced: from then on a crash is recovered by writing the window again.
  A window without such overlap needs no scratch copy: its sources stay
  intact until it is committed, so it can be recomputed.
* **Commit**: after the base is synced, one write of the header (with
  ``num_merge_ops`` advanced) and the state byte (back to 1), then a sync of
  the COW file. Both live in its first sector.
* **Replace/Zero ops** do not read the base: they are written in batches of
  256 ops, the base synced, then committed. Replaying a batch is harmless.

Bulk moves (gathering blocks into contiguous runs), zero fills and the
verification CRCs go through the data mover; blocking file I/O runs in
worker threads. All file access goes through :class:`MergeIO`, so a test
can stand in a storage that loses unsynced writes at a crash.

Online merges hand in :class:`MergeHooks` to publish each window before the
base is written and to mark blocks merged after each commit.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field

import structlog
import trio

from dmuserd.snapshot._cow_format import CowHeader, CowOp, OpType
from dmuserd.snapshot._cow_reader import CowReader
from dmuserd.snapshot._cow_writer import xor_bytes
from dmuserd.snapshot._merge_scratch import STATE_DONE, STATE_IN_PROGRESS, STATE_NONE, ScratchLayout
from dmuserd.snapshot._merge_errors import MergeResumeError, MergeVerifyError

log = structlog.get_logger("dmuserd.snapshot.merge")

#: Replace/Zero ops between two commits (snapuserd's figure)
COMMIT_EVERY = 256
#: Replace/Zero data gathered before it is written out (bounds memory)
WRITE_CHUNK = 8 << 20


class MergeIO:
    """The merge's file access: ``pread``/``pwrite``/``fsync`` on ``"base"`` and ``"cow"``.

    Blocking calls, made from worker threads. The descriptors stay the
    caller's.
    """

    def __init__(self, base_fd: int, cow_fd: int) -> None:
        self.fds = {"base": base_fd, "cow": cow_fd}

    def pread(self, which: str, length: int, offset: int) -> bytes:
        data = os.pread(self.fds[which], length, offset)
        while len(data) < length:
            more = os.pread(self.fds[which], length - len(data), offset + len(data))
            if not more:
                raise MergeResumeError(f"the {which} file ends at {offset + len(data)}, "
                                       f"a read of {length} bytes at {offset} needs more; was it truncated?")
            data += more
        return data

    def pwrite(self, which: str, data, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fds[which], view, offset)
            view, offset = view[n:], offset + n

    def fsync(self, which: str) -> None:
        os.fdatasync(self.fds[which])  # the sizes never change: data is what must be durable


class MergeHooks:
    """What an online merge needs to hear; the defaults (offline) do nothing."""

    async def window_ready(self, blocks: dict[int, bytes]) -> None:
        """New contents of blocks about to be overwritten (await until readers see them)."""

    def committed(self, ops: list[CowOp], merged_ops: int) -> None:
        """``ops`` are merged and durable; ``merged_ops`` ops of the order are done."""

    async def checkpoint(self) -> None:
        """Between two steps: where a merge may pause."""


@dataclass
class MergePlan:
    """The ops of one COW file in merge order, checked for an in-place merge."""

    order: list[CowOp]
    ordered: int  # how many ops at the front are Copy/Xor
    layout: ScratchLayout
    block_size: int
    header: CowHeader
    prefix: array = field(default_factory=lambda: array("Q"))  # blocks merged after i ops (packed)

    def __post_init__(self) -> None:
        total = 0
        self.prefix = array("Q", [0])
        for op in self.order:
            total += op.blocks
            self.prefix.append(total)

    @property
    def total_ops(self) -> int:
        return len(self.order)

    @property
    def total_blocks(self) -> int:
        return self.prefix[-1]

    def percent(self, merged_ops: int) -> float:
        if not self.total_blocks:
            return 100.0
        return 100.0 * self.prefix[min(merged_ops, len(self.order))] / self.total_blocks


@dataclass
class PendingWindow:
    """A durable scratch window found at resume: it is written again first."""

    ops: list[CowOp]
    data: bytes
    crc: int | None = None  # the CRC-32C recorded with it (None: no record, snapuserd's window)


def check_window(pending: PendingWindow, layout: ScratchLayout, path, crc: int) -> None:
    """Refuse a scratch window whose CRC-32C (``crc``, of its entries then its
    data) is not the one recorded with it (windows without a record pass)."""
    if pending.crc is not None and crc != pending.crc:
        raise MergeResumeError(f"{path}: the scratch window's data (offset {layout.data_offset}, "
                               f"{len(pending.ops)} blocks) fails its CRC ({crc:#010x}, recorded "
                               f"{pending.crc:#010x}); the scratch area is damaged")


@dataclass
class MergeState:
    """Where a merge stands, from the header and the scratch window."""

    merged_ops: int
    pending: PendingWindow | None = None


def read_state(io: MergeIO, reader: CowReader, plan: MergePlan, *, crc=None) -> MergeState:
    """Read the progress from the COW file itself (header and scratch window).

    Raises :class:`MergeResumeError` when they cannot be trusted: a header
    that no longer matches the file's layout, ``num_merge_ops`` past the
    end, an unknown state byte, a window whose entries are not the next ops
    to merge. ``crc`` (``f(buf, seed) -> int``) checks the window's CRC
    here; without it the caller does, with :func:`check_window`.
    """
    path = reader.path
    hs = plan.header.header_size
    header = CowHeader.unpack(io.pread("cow", hs, 0))
    fixed = {**plan.header.__dict__, "num_merge_ops": header.num_merge_ops}
    if header.__dict__ != fixed:
        changed = [k for k in fixed if fixed[k] != header.__dict__[k]]
        raise MergeResumeError(f"{path}: the COW header changed under the merge ({', '.join(changed)}); "
                               "the file is damaged: restore it and the base from a backup")
    done = header.num_merge_ops
    if done > plan.total_ops:
        raise MergeResumeError(f"{path}: the header says {done} ops are merged, the file has {plan.total_ops}; "
                               "the header is damaged (num_merge_ops at offset 26): restore the file from a backup")
    layout = plan.layout
    if not layout.capacity:
        return MergeState(done)
    state = io.pread("cow", 1, layout.state_offset)[0]
    if state in (STATE_NONE, STATE_IN_PROGRESS):
        return MergeState(done)
    if state != STATE_DONE:
        raise MergeResumeError(f"{path}: the merge state byte at offset {layout.state_offset} is {state} "
                               "(0, 1 or 2 expected); the scratch area is damaged")
    meta = io.pread("cow", layout.tag_offset - layout.meta_offset, layout.meta_offset)
    blocks = layout.parse_entries(meta)
    if isinstance(blocks, str):
        raise MergeResumeError(f"{path}: the scratch window at offset {layout.meta_offset} is damaged: {blocks}")
    ops = plan.order[done : done + len(blocks)]
    if len(ops) != len(blocks) or any(not op.is_ordered or op.new_block != b for op, b in zip(ops, blocks)):
        raise MergeResumeError(
            f"{path}: the scratch window names new blocks {blocks[:4]}{'...' if len(blocks) > 4 else ''}, "
            f"but the next ops to merge (from op {done}) write "
            f"{[op.new_block for op in plan.order[done : done + min(4, len(blocks))]]}; "
            "the window or num_merge_ops is damaged")
    data = io.pread("cow", len(blocks) * layout.block_size, layout.data_offset)
    pending = PendingWindow(ops, data, layout.parse_tag(io.pread("cow", 8, layout.tag_offset)))
    if crc is not None:
        check_window(pending, layout, path, crc(data, crc(layout.entries_bytes(blocks))))
    return MergeState(done, pending)


class MergeEngine:
    """Merge ``plan`` into the base, from ``state``; see the module doc."""

    def __init__(self, reader: CowReader, plan: MergePlan, io: MergeIO, mover, state: MergeState, *,
                 hooks: MergeHooks | None = None, verify: bool = True, on_progress=None) -> None:
        self.reader = reader
        self.plan = plan
        self.io = io
        self.mover = mover
        self.merged_ops = state.merged_ops
        self._pending = state.pending
        self.hooks = hooks or MergeHooks()
        self.verify = verify
        self.on_progress = on_progress
        self.bs = plan.block_size
        self._header = CowHeader(**{**plan.header.__dict__, "num_merge_ops": state.merged_ops})

    async def run(self) -> int:
        """Merge what is left; returns how many ops this run merged."""
        start = self.merged_ops
        if self._pending is not None:
            window, self._pending = self._pending, None
            layout = self.plan.layout
            entries = layout.entries_bytes(op.new_block for op in window.ops)
            crc = await self.mover.crc32c(window.data, await self.mover.crc32c(entries))
            check_window(window, layout, self.reader.path, crc)
            log.info("merge resumes a scratch window", path=self.reader.path, ops=len(window.ops),
                     merged_ops=self.merged_ops)
            await self._apply_window(window.ops, window.data)
        self._progress()
        order = self.plan.order
        while self.merged_ops < len(order):
            await self.hooks.checkpoint()
            if order[self.merged_ops].is_ordered:
                await self._ordered_window()
            else:
                await self._unordered_batch()
        return self.merged_ops - start

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.merged_ops)

    # --- ordered ops -------------------------------------------------------

    async def _ordered_window(self) -> None:
        order, layout = self.plan.order, self.plan.layout
        end = self.merged_ops
        while end < len(order) and end - self.merged_ops < layout.capacity and order[end].is_ordered:
            end += 1
        ops = order[self.merged_ops : end]
        sources = await trio.to_thread.run_sync(self._window_sources, ops)
        bs = self.bs
        data = bytearray(len(ops) * bs)
        view = memoryview(data)
        await self._move([("copy", view[i * bs : (i + 1) * bs], src) for i, src in enumerate(sources)])
        targets = {op.new_block for op in ops}
        if any(block in targets for op in ops for block in op.source_blocks()):
            entries = layout.entries_bytes(op.new_block for op in ops)
            crc = await self.mover.crc32c(data, await self.mover.crc32c(entries))
            await trio.to_thread.run_sync(self._write_scratch, entries, data, crc)
        await self._apply_window(ops, bytes(data))

    def _window_sources(self, ops: list[CowOp]) -> list[bytes]:
        """New contents of a window's blocks, read before any is overwritten."""
        out = []
        for op in ops:
            if op.type == OpType.COPY:
                out.append(self.io.pread("base", self.bs, op.source * self.bs))
            else:
                out.append(xor_bytes(self.reader.read_data(op), self.io.pread("base", self.bs, op.source)))
        return out

    def _write_scratch(self, entries: bytes, data, crc: int) -> None:
        layout, io = self.plan.layout, self.io
        io.pwrite("cow", entries, layout.meta_offset)
        io.pwrite("cow", data, layout.data_offset)
        io.pwrite("cow", layout.tag_bytes(crc), layout.tag_offset)
        io.fsync("cow")
        io.pwrite("cow", bytes([STATE_DONE]), layout.state_offset)
        io.fsync("cow")

    async def _apply_window(self, ops: list[CowOp], data: bytes) -> None:
        bs = self.bs
        view = memoryview(data)
        blocks = {op.new_block: bytes(view[i * bs : (i + 1) * bs]) for i, op in enumerate(ops)}
        await self.hooks.window_ready(blocks)
        await self._write_segments([(op.new_block, 1, view[i * bs : (i + 1) * bs]) for i, op in enumerate(ops)])
        await trio.to_thread.run_sync(self.io.fsync, "base")
        await self._commit(ops)

    # --- Replace / Zero -------------------------------------------------------

    async def _unordered_batch(self) -> None:
        order = self.plan.order
        ops = order[self.merged_ops : self.merged_ops + COMMIT_EVERY]
        segments: list[tuple[int, int, bytes | None]] = []
        size = 0
        for op in ops:
            if op.type == OpType.ZERO:
                segments.append((op.new_block, op.blocks, None))
            elif op.type == OpType.REPLACE:
                segments.append((op.new_block, op.blocks, op))
            else:  # the order put every ordered op first; the plan checked it
                raise AssertionError(f"op #{op.index} ({op.type.name}) after the ordered ops")
            size += op.blocks * self.bs
            if size >= WRITE_CHUNK:
                await self._write_segments(await self._load(segments))
                segments, size = [], 0
        if segments:
            await self._write_segments(await self._load(segments))
        await trio.to_thread.run_sync(self.io.fsync, "base")
        await self._commit(ops)

    async def _load(self, segments):
        """Replace data decompressed (in a worker thread), zeros left as None."""
        def load():
            return [(b, n, None if op is None else self.reader.read_data(op)) for b, n, op in segments]

        return await trio.to_thread.run_sync(load)

    # --- writing the base ---------------------------------------------------------

    async def _write_segments(self, segments) -> None:
        """Write ``(new_block, blocks, data or None for zeros)`` to the base,
        gathered into contiguous runs by the mover, and verify by CRC."""
        bs = self.bs
        segments = sorted(segments, key=lambda s: s[0])
        runs: list[tuple[int, bytearray]] = []
        i = 0
        while i < len(segments):
            j, end = i, segments[i][0] + segments[i][1]
            while j + 1 < len(segments) and segments[j + 1][0] == end:
                j += 1
                end += segments[j][1]
            first = segments[i][0]
            buf = bytearray((end - first) * bs)
            view = memoryview(buf)
            requests = []
            for block, n, data in segments[i : j + 1]:
                piece = view[(block - first) * bs : (block - first + n) * bs]
                requests.append(("fill", piece, 0) if data is None else ("copy", piece, data))
            await self._move(requests)
            runs.append((first, buf))
            i = j + 1

        def write():
            for first, buf in runs:
                self.io.pwrite("base", buf, first * bs)

        await trio.to_thread.run_sync(write)
        if self.verify:
            await self._verify(runs)

    async def _verify(self, runs) -> None:
        bs = self.bs
        back = await trio.to_thread.run_sync(lambda: [self.io.pread("base", len(buf), first * bs) for first, buf in runs])
        crcs = await self._move([("crc32c", buf) for _, buf in runs] + [("crc32c", b) for b in back])
        half = len(runs)
        for k, (first, buf) in enumerate(runs):
            if crcs[k] != crcs[half + k]:
                raise MergeVerifyError(
                    f"the base reads back differently from what the merge wrote at blocks {first}.."
                    f"{first + len(buf) // bs - 1} (CRC-32C {crcs[half + k]:#010x}, wrote {crcs[k]:#010x}); "
                    "the base storage is failing or something else writes to it: stop and check it")

    async def _move(self, requests: list[tuple]) -> list:
        """Run independent mover operations: as one batch on a device (small
        ones travel in BATCH descriptors), one call each on the CPU engine,
        where a batch would only add a task per operation."""
        if self.mover.queue is not None:
            return await self.mover.batch(requests)
        mover = self.mover
        return [await getattr(mover, name)(*args) for name, *args in requests]

    # --- commit ---------------------------------------------------------------------

    async def _commit(self, ops: list[CowOp]) -> None:
        self._header.num_merge_ops = self.merged_ops + len(ops)
        record = self._header.pack()
        if self.plan.layout.capacity:
            record += bytes([STATE_IN_PROGRESS])

        def commit():
            self.io.pwrite("cow", record, 0)
            self.io.fsync("cow")

        await trio.to_thread.run_sync(commit)
        self.merged_ops += len(ops)
        self.hooks.committed(ops, self.merged_ops)
        self._progress()
