"""The in-place merge itself: snapuserd's crash-safe protocol, step by step.

:class:`MergeEngine` writes the ops of a COW file into its base in merge
order. What makes it safe to interrupt at any instant
(``../shared/specs/android-cow.md``, "Merge order"):

* **Ordered ops (Copy/Xor)** merge in windows of at most
  ``ScratchLayout.capacity`` blocks (510 with the default 2 MiB scratch
  space, snapuserd's read-ahead window). The window's new contents are
  computed from the base before any of it is overwritten. When an op of the
  window reads a block the window writes (a Copy chain inside the window,
  an Xor of its own block), the window first goes to the COW file's scratch
  area (entries, our CRC, data: one write), is synced, then the state byte
  becomes 2 and is synced: from then on a crash is recovered by writing the
  window again. A window without such overlap needs no scratch copy: its
  sources stay intact until it is committed, so it can be recomputed.
* **Commit**: after the base is synced, one write of the header (with
  ``num_merge_ops`` advanced) and the state byte (back to 1), then a sync of
  the COW file. Both live in its first sector.
* **Replace/Zero ops** do not read the base: they are written in batches of
  256 ops, the base synced, then committed. Replaying a batch is harmless.

Where the time goes, and why it is cheap: a window (or batch) is one
buffer. Copy sources are read straight into it (one ``preadv`` per run of
consecutive source blocks), Xor and Replace data straight from the COW file
(one ``preadv`` per stretch of stored data, the op records between the
chunks read into a throw-away buffer), compressed chunks decompressed into
it; Xor is applied once per run of Xor ops (in C: ``xor_into``); zeros are
written into the reused buffer. The base gets one ``pwritev`` per run of
consecutive new blocks, is read back into a second buffer the same way and
compared (``memcmp``, in the same call as the writes; the CRCs of scratch
windows go through the data mover, offloaded on DSA). Ops are read from the
reader's packed :class:`OpTable` by row: no object per op. Syncs are
``fdatasync`` (sizes never change).

Blocking file I/O runs in worker threads, and only one thread writes, in
the protocol's order:

* the preparing task reads and computes the next step (in worker threads,
  into one of two reused buffers) while the step before it is written: a
  step reads nothing an earlier step writes;
* the main task hands each prepared step to the commit thread and waits
  until it is written and read back equal (a byte on a pipe says so);
* the commit thread (one worker call for the whole run) takes the steps in
  order and runs each one's I/O, made when it was prepared, in one call
  (:meth:`MergeIO.run_program`, one GIL release with the extension):
  writes the scratch window, if any, and syncs it, then the base, starts
  its writeback and meanwhile reads it back and compares it, syncs the
  base, writes and syncs the progress, then goes straight on to the next
  step. A step that reads back differently stops there: its progress is
  never written (:class:`MergeVerifyError`).

The disk's writeback of one step hides the reading back of it and the
reading and computing of the next, and the chain of writes and syncs does
not go back to the event loop between steps (an online merge does: the
hooks hear of each commit before the next window is published). Nothing of
step N+1 is written before step N's commit is durable, so a crash finds
exactly the states it found before. A pause waits for the commits (the
``settle`` of :meth:`MergeHooks.checkpoint`), and so does the end of the
run. All file access goes through :class:`MergeIO`, so a test can stand in a
storage that loses unsynced writes at a crash.

Online merges hand in :class:`MergeHooks` to publish each window before the
base is written and to mark blocks merged after each commit.
"""

from __future__ import annotations

import os
import queue
import time
from array import array
from dataclasses import dataclass, field
from itertools import accumulate

import structlog
import trio

from dmuserd.snapshot import _compression
from dmuserd.snapshot._cow_format import CowFormatError, CowHeader, CowOp, OpType
from dmuserd.snapshot._cow_reader import CowReader
from dmuserd.snapshot._cow_table import OpTable
from dmuserd.snapshot._merge_errors import MergeResumeError, MergeVerifyError
from dmuserd.snapshot._merge_scratch import STATE_DONE, STATE_IN_PROGRESS, STATE_NONE, ScratchLayout

log = structlog.get_logger("dmuserd.snapshot.merge")

#: Replace/Zero ops between two commits (snapuserd's figure)
COMMIT_EVERY = 256
#: Replace/Zero data gathered before it is written out (bounds memory)
WRITE_CHUNK = 8 << 20
#: stored chunks this close together in the COW file are read with one call
#: (the bytes between them, op records, go to a throw-away buffer)
READ_GAP = 4096
#: at most this many bytes per coalesced read of COW data
READ_SPAN = 8 << 20
#: Xor deltas are read and applied this many ops at a time (a small buffer
#: next to the window's: the process's peak RSS stays that of the window)
XOR_PIECE = 32
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
try:  # the optional extension: a step's scattered writes and reads in one GIL release (MergeIO.*_runs)
    from dmuserd.snapshot import _merge_io as _NATIVE
except ImportError:
    _NATIVE = None
#: MergeIO.run_program's op names as the extension numbers them
_PROGRAM_CODES = {"write": 0, "sync": 1, "notify": 2, "verify": 3, "wait": 4}
_PIPE_OPS = frozenset(("notify", "wait"))
_COPY, _XOR, _REPLACE, _ZERO = int(OpType.COPY), int(OpType.XOR), int(OpType.REPLACE), int(OpType.ZERO)
_ORDERED = frozenset((_COPY, _XOR))
_XOR_BYTE = bytes([_XOR])
_JUNK = memoryview(bytearray(READ_GAP))  # where skipped bytes are read to (never looked at)
_NONZERO_MARKS = bytes([0]) + bytes([1]) * 255  # byte -> 1 when non-zero (a ``translate`` table)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes (after a short transfer)."""
    while n:
        if n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        else:
            views = [views[0][n:], *views[1:]]
            n = 0
    return views


def _xor_blocks(span: memoryview, delta: bytearray, bs: int) -> None:
    """XOR ``delta`` into ``span``: in C without the GIL where the
    ``_merge_io`` extension is built (the commit thread does not wait for
    it), else block by block, only over the bytes from each block's first
    to its last non-zero delta byte: an Xor op's delta is mostly zeros
    (that is why it was stored as one). One ``translate`` marks the
    non-zero bytes of the whole delta, ``find``/``rfind`` (memchr) bound
    each block's, and only those bytes become ints: about half the cost of
    turning each whole block into an int."""
    if _NATIVE is not None:
        _NATIVE.xor_into(span, delta)
        return
    marks = delta.translate(_NONZERO_MARKS)
    for p in range(0, len(delta), bs):
        lo = marks.find(1, p, p + bs)
        if lo < 0:
            continue
        hi = marks.rfind(1, p, p + bs) + 1
        seg = span[lo:hi]
        seg[:] = (int.from_bytes(seg, "little") ^ int.from_bytes(delta[lo:hi], "little")).to_bytes(hi - lo, "little")


class MergeIO:
    """The merge's file access on ``"base"`` and ``"cow"``: ``pread``,
    ``pwrite``, scatter/gather ``preadv``/``pwritev`` and ``fsync``.

    Blocking calls, made from worker threads, up to three at once: a
    step's commit (its writes, syncs, the progress) beside the read-back of
    the step and the reads of the next one; never two writes. The
    descriptors stay the caller's.
    """

    def __init__(self, base_fd: int, cow_fd: int) -> None:
        self.fds = {"base": base_fd, "cow": cow_fd}

    def pread(self, which: str, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.preadv(which, [memoryview(buf)], offset)
        return bytes(buf)

    def preadv(self, which: str, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` (writable) with the file's bytes from ``offset`` on."""
        fd = self.fds[which]
        want = sum(len(v) for v in views)
        while views:
            n = os.preadv(fd, views[:_IOV_MAX], offset)
            if not n:
                got = want - sum(len(v) for v in views)
                raise MergeResumeError(f"the {which} file ends at {offset}, a read of {want} bytes at "
                                       f"{offset - got} needs more; was it truncated?")
            views, offset = _advance(views, n), offset + n

    def pwrite(self, which: str, data, offset: int) -> None:
        self.pwritev(which, [memoryview(data)], offset)

    def pwritev_runs(self, which: str, runs: list[tuple[int, list[memoryview]]]) -> None:
        """Write each ``(offset, views)`` run: a step's scattered pieces of one file.

        One call of the ``_merge_io`` extension (one GIL release for the
        whole list: the writes are the merge's chain, and a thread taking the
        GIL back after every small write waits for the thread preparing the
        next step) where it is built and ``pwritev`` is this class's own;
        otherwise ``pwritev`` run by run, so a subclass (a test's storage, a
        partition mapped onto extents) sees every run."""
        if _NATIVE is not None and type(self).pwritev is MergeIO.pwritev:
            _NATIVE.pwritev_runs(self.fds[which], runs)
            return
        for offset, views in runs:
            self.pwritev(which, views, offset)

    def run_program(self, program: list[tuple]) -> tuple[int, int, float]:
        """Make a step's I/O, op by op: ``("write", which, runs)`` (as
        :meth:`pwritev_runs`), ``("verify", which, runs, data, back)`` (read
        ``runs``, views of ``back``, as :meth:`preadv_runs`, and compare
        ``back`` with ``data``: a difference stops the program),
        ``("sync", which)``, ``("notify", fd)`` (byte 1 to a pipe: what came
        before is done) and ``("wait", fd)`` (read a byte from a pipe,
        blocking: 0, or the pipe's end, stops the program). Returns (-1 when
        it ran to its end, -2 when a wait stopped it, or the offset in
        ``data`` of the first byte that read back differently; the syncs
        made; the seconds they took).

        One call of the ``_merge_io`` extension (one GIL release for the
        whole step: the commit thread no longer waits to take the GIL back
        after each of its ~ten system calls a step) where ``pwritev``,
        ``preadv`` and ``fsync`` are this class's own; otherwise op by op
        through them."""
        cls = type(self)
        if _NATIVE is not None and cls.pwritev is MergeIO.pwritev and cls.preadv is MergeIO.preadv and \
                cls.fsync is MergeIO.fsync:
            fds = self.fds
            return _NATIVE.run_program([(_PROGRAM_CODES[op[0]], op[1] if op[0] in _PIPE_OPS else fds[op[1]], *op[2:])
                                        for op in program])
        syncs, seconds = 0, 0.0
        for kind, *args in program:
            if kind == "write":
                self.pwritev_runs(*args)
            elif kind == "verify":
                which, runs, data, back = args
                self.preadv_runs(which, runs)
                if data != back:
                    return next(i for i in range(len(data)) if data[i] != back[i]), syncs, seconds
            elif kind == "sync":
                started = time.perf_counter()
                self.fsync(args[0])
                syncs, seconds = syncs + 1, seconds + time.perf_counter() - started
            elif kind == "notify":
                os.write(args[0], b"\1")
            elif os.read(args[0], 1) in (b"", b"\0"):  # "wait"
                return -2, syncs, seconds
        return -1, syncs, seconds

    def preadv_runs(self, which: str, runs: list[tuple[int, list[memoryview]]]) -> None:
        """Fill each ``(offset, views)`` run, as :meth:`pwritev_runs` writes
        them (a run the file ends in is read again by :meth:`preadv`, which
        says where the file is short)."""
        if _NATIVE is not None and type(self).preadv is MergeIO.preadv:
            short = _NATIVE.preadv_runs(self.fds[which], runs)
            if short < 0:
                return
            runs = runs[short:]
        for offset, views in runs:
            self.preadv(which, views, offset)

    def pwritev(self, which: str, views: list[memoryview], offset: int) -> None:
        """Write ``views`` back to back from ``offset`` on."""
        fd = self.fds[which]
        while views:
            n = os.pwritev(fd, views[:_IOV_MAX], offset)
            views, offset = _advance(views, n), offset + n

    def fsync(self, which: str) -> None:
        os.fdatasync(self.fds[which])  # the sizes never change: data is what must be durable


class MergeHooks:
    """What an online merge needs to hear; the defaults (offline) do nothing."""

    async def window_ready(self, new_blocks: list[int], data: bytes) -> None:
        """New contents of blocks about to be overwritten (block ``new_blocks[i]``
        is ``data[i * block_size:][:block_size]``; copy what you keep: the
        buffer is the engine's); await until readers see them."""

    def committed(self, first: int, end: int) -> None:
        """Ops ``first..end-1`` of the merge order are merged and durable."""

    async def checkpoint(self, settle) -> None:
        """Between two steps: where a merge may pause. Before waiting in a
        pause, ``await settle()``: it commits the step just written (the
        engine commits a step in the same worker call as the next step's
        reads, so one may still be due here)."""


@dataclass
class MergePlan:
    """The ops of one COW file in merge order, checked for an in-place merge.

    ``order`` holds rows of ``table`` (packed), not op objects: a plan costs
    about 50 bytes an op (the table's columns, the order, the progress sums).
    """

    table: OpTable
    order: array  # rows of ``table`` in merge order
    ordered: int  # how many ops at the front are Copy/Xor
    layout: ScratchLayout
    block_size: int
    header: CowHeader
    prefix: array = field(default_factory=lambda: array("Q"))  # blocks merged after i ops (packed)
    #: the window goes to the merge journal beside the COW file (:mod:`._merge_journal`: the file has no
    #: scratch space), ``layout`` being the journal's; MergeIO's ``"journal"`` file
    journal: bool = False

    def __post_init__(self) -> None:
        fac = self.table.factor
        if not fac.tobytes().translate(None, b"\0"):
            # every op one block (every v2 file): op k ends at block k, no sums to make
            self.prefix = array("Q", range(len(self.order) + 1))
            return
        prefix = self.prefix = array("Q", [0])
        # blocks of op k: 1 << factor (C-level iterators: no Python loop per op)
        prefix.extend(accumulate(map((1).__lshift__, map(fac.__getitem__, self.order))))

    @property
    def total_ops(self) -> int:
        return len(self.order)

    @property
    def total_blocks(self) -> int:
        return self.prefix[-1]

    def op(self, k: int) -> CowOp:
        """The ``k``-th op of the merge order, as an object."""
        return self.table.op(self.order[k])

    def new_blocks(self, first: int, end: int):
        """The new blocks ops ``first..end-1`` of the order write."""
        nb, fac, order = self.table.new_block, self.table.factor, self.order
        for k in range(first, end):
            r = order[k]
            yield from range(nb[r], nb[r] + (1 << fac[r]))

    def percent(self, merged_ops: int) -> float:
        if not self.total_blocks:
            return 100.0
        return 100.0 * self.prefix[min(merged_ops, len(self.order))] / self.total_blocks


@dataclass
class PendingWindow:
    """A durable scratch window found at resume: it is written again first.

    It holds ops ``first..first+len(blocks)-1`` of the merge order, whose
    new blocks are ``blocks``."""

    first: int
    blocks: list[int]
    data: bytes
    crc: int | None = None  # the CRC-32C recorded with it (None: no record, snapuserd's window)


def check_window(pending: PendingWindow, layout: ScratchLayout, path, crc: int) -> None:
    """Refuse a scratch window whose CRC-32C (``crc``, of its entries then its
    data) is not the one recorded with it (windows without a record pass)."""
    if pending.crc is not None and crc != pending.crc:
        raise MergeResumeError(f"{path}: the scratch window's data (offset {layout.data_offset}, "
                               f"{len(pending.blocks)} blocks) fails its CRC ({crc:#010x}, recorded "
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
    where = "cow"
    if plan.journal:
        where = "journal"
        if io.fds.get("journal", -1) < 0:
            return MergeState(done)  # no journal yet: no window was ever made durable
        from dmuserd.snapshot import _merge_journal as journal

        path = journal.journal_path(path)
        head = journal.read_head(io.pread("journal", journal.HEADER_SIZE + 1, 0),
                                 journal.cow_identity(io.fds["cow"], hs), plan.block_size)
        if not head.mine or head.state != STATE_DONE or head.first < done:
            return MergeState(done)  # fresh, no durable window, or one already committed
        if head.first > done:
            raise MergeResumeError(f"{path}: the journal's window starts at op {head.first}, but the COW file "
                                   f"records {done} merged ops; the journal or num_merge_ops is damaged")
    state = io.pread(where, 1, layout.state_offset)[0]
    if state in (STATE_NONE, STATE_IN_PROGRESS):
        return MergeState(done)
    if state != STATE_DONE:
        raise MergeResumeError(f"{path}: the scratch window's state byte (offset {layout.state_offset}) is "
                               f"{state}, not 0, 1 or 2; the file is damaged")
    blocks = layout.parse_entries(io.pread(where, layout.data_offset - layout.meta_offset, layout.meta_offset))
    if isinstance(blocks, str):
        raise MergeResumeError(f"{path}: the scratch window at offset {layout.meta_offset} is damaged: {blocks}")
    nb, ty, order = plan.table.new_block, plan.table.type, plan.order
    end = done + len(blocks)
    if end > plan.total_ops or any(ty[order[done + i]] not in _ORDERED or nb[order[done + i]] != b
                                   for i, b in enumerate(blocks)):
        raise MergeResumeError(
            f"{path}: the scratch window names new blocks {blocks[:4]}{'...' if len(blocks) > 4 else ''}, "
            f"but the next ops to merge (from op {done}) write "
            f"{[nb[order[k]] for k in range(done, min(done + 4, end, plan.total_ops))]}; "
            "the window or num_merge_ops is damaged")
    data = io.pread(where, len(blocks) * layout.block_size, layout.data_offset)
    pending = PendingWindow(done, blocks, data, layout.parse_tag(io.pread(where, 8, layout.tag_offset)))
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
        #: offline (no hooks): a step is handed to the commit thread as soon as it is prepared, and the thread
        #: writes it right after the previous commit; online, only once the hooks heard of that commit
        self._chain = hooks is None
        self.verify = verify
        self.on_progress = on_progress
        self.bs = plan.block_size
        self._header = CowHeader(**{**plan.header.__dict__, "num_merge_ops": state.merged_ops})
        self._raw_ok = _compression.stores_raw_when_equal(reader.compression, reader.version)
        #: what this run did: windows of ordered ops (and how many went through
        #: the scratch area), Replace/Zero batches, fdatasync calls and the
        #: seconds in them, the seconds of the whole run (set at its end)
        self.stats = {"windows": 0, "scratch_windows": 0, "batches": 0, "syncs": 0, "sync_seconds": 0.0,
                      "seconds": 0.0}
        #: the next op to prepare: ops before it and from ``merged_ops`` on are handed to the commit thread
        self._next = state.merged_ops
        #: steps for the commit thread and, with ``verify``, for the checking thread, in order (``None``: stop)
        self._queue: queue.SimpleQueue[_Step | None] = queue.SimpleQueue()
        self._checks: queue.SimpleQueue[_Step | None] = queue.SimpleQueue()
        #: set when every step handed over is committed (see :meth:`_settle`)
        self._idle: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        #: pipes, a byte a step (0: stop): "written" (commit thread -> checking thread), "verdict" (checking ->
        #: commit thread, for a step committing ops: 1, read back equal) and "checked" (-> the loop: the step is
        #: written and read back, its buffers are free)
        self._pipes: dict[str, tuple[int, int]] = {}
        #: a step's data and its read-back, reused from step to step (see :meth:`_buffer`)
        self._buffers = [bytearray(), bytearray(), bytearray()]
        self._zeros = bytes(self.bs)

    async def run(self) -> int:
        """Merge what is left; returns how many ops this run merged."""
        start = self.merged_ops
        started = time.perf_counter()
        self._token = trio.lowlevel.current_trio_token()
        self._pipes = {"written": os.pipe2(os.O_CLOEXEC), "verdict": os.pipe2(os.O_CLOEXEC),
                       "checked": os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)}  # the first two: waited on in threads
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, self._commit_steps)
                if self.verify:
                    nursery.start_soon(trio.to_thread.run_sync, self._check_steps)
                try:
                    await self._steps()
                finally:
                    self._queue.put(None)
                    self._checks.put(None)
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        finally:
            for fds in self._pipes.values():
                os.close(fds[0])
                os.close(fds[1])
        self.stats["seconds"] = time.perf_counter() - started
        return self.merged_ops - start

    async def _steps(self) -> None:
        """Resume the durable scratch window, if any, then hand each step the
        preparing task makes to the commit thread, in order, and check it."""
        if self._pending is not None:
            window, self._pending = self._pending, None
            layout = self.plan.layout
            entries = layout.entries_bytes(window.blocks)
            crc = await self.mover.crc32c(window.data, await self.mover.crc32c(entries))
            check_window(window, layout, self.reader.path, crc)
            log.info("merge resumes a scratch window", path=self.reader.path, ops=len(window.blocks),
                     merged_ops=self.merged_ops)
            await self._apply(self._prepared(window.blocks, bytearray(window.data),
                                             _runs([(b, 1, i) for i, b in enumerate(window.blocks)]),
                                             self.merged_ops + len(window.blocks), len(window.blocks)))
        self._progress()
        send, receive = trio.open_memory_channel[_Prepared](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._prepare_steps, send)
            # (``receive`` is left open: closed by a failing step, it would fail the preparing task's send with an
            # error of its own, which could come out instead of the step's; the nursery cancels that task instead)
            async for prepared in receive:
                await self.hooks.checkpoint(self._settle)
                await self._apply(prepared)
        await self._settle()

    async def _prepare_steps(self, send: trio.MemorySendChannel[_Prepared]) -> None:
        """The preparing task: each step's data read and computed (in worker
        threads) while the step before it is written, synced and read back.

        A step reads only what no earlier step writes (:func:`plan_merge`
        refuses an ordered op reading a block an earlier op overwrites;
        Replace/Zero data is the COW file's), so it can be read before the
        one before it is written. Its data goes to reused buffer ``slot``,
        alternating 0 and 1: the channel holds nothing, so when a step is
        prepared the one two steps back, which used the same buffer, has
        been written and compared (the main task took the next one)."""
        total, ordered, slot = self.plan.total_ops, self.plan.ordered, 0
        k = self._next
        async with send:
            while k < total:
                if k < ordered:
                    end = min(k + self.plan.layout.capacity, ordered)
                    prepared = await self._prepare_window(k, end, slot)
                    await send.send(prepared)
                    slot ^= 1
                    self.stats["windows"] += 1
                    k = end
                    continue
                start, end = k, min(k + COMMIT_EVERY, total)
                while k < end:
                    k, prepared = await self._prepare_piece(start, k, end, slot)
                    await send.send(prepared)
                    slot ^= 1
                self.stats["batches"] += 1

    def _buffer(self, slot: int, size: int) -> memoryview:
        """``size`` bytes of reused buffer ``slot`` (0 and 1: steps' data,
        see :meth:`_prepare_steps`; 2: the read-back), not cleared: a fresh
        buffer per step cost a memset and page faults of its whole size."""
        buf = self._buffers[slot]
        if len(buf) < size:
            buf = self._buffers[slot] = bytearray(size)
        return memoryview(buf)[:size]

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.merged_ops)

    async def _apply(self, prepared: _Prepared) -> None:
        """Hand a prepared step to the commit thread and check it: online,
        once the previous step's commit has returned, readers see a window
        (``window_ready``); the thread writes the step after the previous
        commit (the scratch window first, when it must go there)."""
        await self._before_write()
        if prepared.blocks is not None:
            await self.hooks.window_ready(prepared.blocks, prepared.data)
        await self._write_pieces(prepared)

    def _prepared(self, blocks: list[int] | None, data, runs: list[tuple[int, list[list[int]]]], end: int,
                  commit: int, scratch: list[tuple] | None = None) -> _Prepared:
        """A step ready to hand over, with its programs
        (:meth:`MergeIO.run_program`). The commit thread's: ``scratch`` (the
        scratch window's ops), the base written (a byte on "written"), and
        when the step commits ``commit`` ops (to ``end`` merged), the base
        synced, the checking thread's verdict awaited, the progress written
        and synced. The checking thread's (with ``verify``): wait for the
        write, read the base back and compare, then the verdict (for a
        committing step) and a byte on "checked"; without ``verify``, the
        commit thread says "checked" once written. Made while the step is
        prepared, in step order (``_header`` is the preparing task's; the
        read-back buffer is the checking thread's, one step at a time)."""
        pipes, verify = self._pipes, self.verify
        program = [*(scratch or ()), ("write", "base", _views(data, runs, self.bs)),
                   ("notify", pipes["written" if verify else "checked"][1])]
        check = []
        if verify:
            back = self._buffer(2, len(data))
            check = [("wait", pipes["written"][0]), ("verify", "base", _views(back, runs, self.bs), data, back),
                     *([("notify", pipes["verdict"][1])] if commit else ()), ("notify", pipes["checked"][1])]
        if commit:
            layout = self.plan.layout
            self._header.num_merge_ops = end
            record = self._header.pack()
            if layout.capacity and not self.plan.journal:
                record += bytes([STATE_IN_PROGRESS])
            program += [("sync", "base"), *([("wait", pipes["verdict"][0])] if verify else ()),
                        ("write", "cow", [(0, [record])]), ("sync", "cow")]
            if self.plan.journal:
                # not synced: a window left at state 2 is told stale by its first op (below num_merge_ops)
                program.append(("write", "journal", [(layout.state_offset, [bytes([STATE_IN_PROGRESS])])]))
        return _Prepared(blocks, data, runs, _Step(program, check, commit, scratch is not None, runs))

    # --- ordered ops -------------------------------------------------------

    async def _prepare_window(self, first: int, end: int, slot: int) -> _Prepared:
        """Ordered ops ``first..end-1`` as one step (a window)."""
        blocks, data, overlap, runs = await trio.to_thread.run_sync(self._read_window, first, end, slot)
        scratch = None
        if overlap:
            entries = self.plan.layout.entries_bytes(blocks)
            crc = await self.mover.crc32c(data, await self.mover.crc32c(entries))
            scratch = self._scratch_ops(entries, data, crc, first)
        return self._prepared(blocks, data, runs, end, end - first, scratch)

    def _read_window(self, first: int, end: int, slot: int) -> tuple[list[int], memoryview, bool, list]:
        """New contents of ordered ops ``first..end-1``, read before any is
        overwritten: (their new blocks, the data in op order, whether an op
        reads a block of the window, where the data goes: :func:`_runs`)."""
        t, bs, io = self.plan.table, self.bs, self.io
        rows = self.plan.order[first:end]
        n = len(rows)
        blocks = list(map(t.new_block.__getitem__, rows))
        kinds = bytes(map(t.type.__getitem__, rows))
        # where each op's base bytes start: a Copy's source is a block number, an Xor's a byte offset
        offsets = [s if k == _XOR else s * bs for k, s in zip(kinds, map(t.source.__getitem__, rows))]
        data = view = self._buffer(slot, n * bs)
        # the base bytes (a Copy's data, what an Xor applies to): one read per run of consecutive sources
        k, reads = 0, []
        while k < n:
            j, at = k + 1, offsets[k] + bs
            while j < n and offsets[j] == at:
                j, at = j + 1, at + bs
            reads.append((offsets[k], [view[k * bs : j * bs]]))
            k = j
        io.preadv_runs("base", reads)
        if _XOR_BYTE in kinds:
            k = kinds.find(_XOR_BYTE)
            while k >= 0:
                j, stop = k + 1, min(n, k + XOR_PIECE)
                while j < stop and kinds[j] == _XOR:
                    j += 1
                delta = bytearray((j - k) * bs)
                dview = memoryview(delta)
                self._read_chunks([(rows[i], dview[(i - k) * bs : (i - k + 1) * bs]) for i in range(k, j)])
                _xor_blocks(view[k * bs : j * bs], delta, bs)
                k = kinds.find(_XOR_BYTE, j)
        # the blocks the window reads: a Copy's source block, the one or two an Xor's bytes lie in
        targets = set(blocks)
        overlap = not targets.isdisjoint(o // bs for o in offsets) or not targets.isdisjoint(
            (o + bs - 1) // bs for o in offsets)
        return blocks, data, overlap, _runs([(b, 1, i) for i, b in enumerate(blocks)])

    def _scratch_ops(self, entries: bytes, data, crc: int, first: int) -> list[tuple]:
        """The ops writing a window to the scratch area (entries, tag and data
        in one write), syncing it, then the state byte 2, synced. In the
        journal, the state byte goes with ``first``, the window's first op
        (one sector)."""
        layout = self.plan.layout
        where = "journal" if self.plan.journal else "cow"
        pad = bytes(layout.tag_offset - layout.meta_offset - len(entries))
        if self.plan.journal:
            from dmuserd.snapshot._merge_journal import FIRST_OFFSET, state_bytes

            state = (FIRST_OFFSET, [state_bytes(first, STATE_DONE)])
        else:
            state = (layout.state_offset, [bytes([STATE_DONE])])
        return [("write", where, [(layout.meta_offset, [entries, pad, layout.tag_bytes(crc), data])]),
                ("sync", where), ("write", where, [state]), ("sync", where)]

    # --- Replace / Zero -------------------------------------------------------

    async def _prepare_piece(self, start: int, k: int, end: int, slot: int) -> tuple[int, _Prepared]:
        """The Replace/Zero ops from ``k`` on of the batch ``start..end-1``
        whose data fits ``WRITE_CHUNK`` (at least one op), as one step:
        (where the next piece starts, the step). The batch's last piece
        commits the batch; the others are written only."""
        t, order, bs = self.plan.table, self.plan.order, self.bs
        nb, fac = t.new_block, t.factor
        j, size = k, 0
        while j < end and (j == k or size + (bs << fac[order[j]]) <= WRITE_CHUNK):
            size += bs << fac[order[j]]
            j += 1
        data = view = self._buffer(slot, size)
        pieces, fill, pos = [], [], 0
        for i in range(k, j):
            r = order[i]
            n = 1 << fac[r]
            pieces.append((nb[r], n, pos))
            if t.type[r] == _REPLACE:
                fill.append((r, view[pos * bs : (pos + n) * bs]))
            else:  # Zero: the reused buffer holds an earlier step's bytes
                for q in range(pos, pos + n):
                    view[q * bs : (q + 1) * bs] = self._zeros
            pos += n
        if fill:
            await trio.to_thread.run_sync(self._read_chunks, fill)
        return j, self._prepared(None, data, _runs(pieces), end, end - start if j == end else 0)


    def _read_chunks(self, items: list[tuple[int, memoryview]]) -> None:
        """Fill each ``(row, view)`` with the decompressed data of Replace/Xor
        row ``row``: stored chunks lying close together are read with one
        ``preadv``, raw ones straight into their views."""
        t, io = self.plan.table, self.io
        doff, dlen, fac = t.data_offset, t.data_length, t.factor
        bs, raw_ok = self.bs, self._raw_ok
        i, n = 0, len(items)
        while i < n:
            iov: list[memoryview] = []
            packed: list[tuple[bytearray, int, memoryview]] = []  # compressed: (buffer, row, where it goes)
            start = pos = doff[items[i][0]]
            while i < n:
                r, dest = items[i]
                off, length = doff[r], dlen[r]
                if iov and (off < pos or off - pos > READ_GAP or off + length - start > READ_SPAN):
                    break
                if off > pos:
                    iov.append(_JUNK[: off - pos])  # op records between the chunks
                if raw_ok and length == bs << fac[r]:
                    iov.append(dest)
                else:
                    buf = bytearray(length)
                    iov.append(memoryview(buf))
                    packed.append((buf, r, dest))
                pos = off + length
                i += 1
            io.preadv("cow", iov, start)
            for buf, r, dest in packed:
                try:
                    dest[:] = _compression.decompress(self.reader.compression, self.reader.version, buf,
                                                      len(dest), offset=doff[r])
                except CowFormatError as exc:
                    raise exc.with_path(self.reader.path) from None

    # --- writing the base ---------------------------------------------------------

    async def _write_pieces(self, prepared: _Prepared) -> None:
        """Hand a step to the commit (and checking) thread and wait until it
        is written and read back equal (its buffers are then free; the
        commit thread goes on with the sync and the commit, and may be
        writing the next step by then)."""
        step, checked = prepared.step, self._pipes["checked"][0]
        self._next += step.count
        self._queue.put(step)
        if step.check:
            self._checks.put(step)
        await trio.lowlevel.wait_readable(checked)
        os.read(checked, 1)

    # --- commit ---------------------------------------------------------------------

    def _commit_steps(self) -> None:
        """The commit thread (one worker call for the whole run): each step
        handed over runs its program (:meth:`_prepared`): written, and if it
        carries ops, the base synced, the checking thread's verdict awaited,
        the progress written and synced; the loop hears of the commit
        afterwards (:meth:`_committed`), without the thread waiting for it.
        Nothing of a step is written before the previous step's commit is
        durable, and a step that reads back differently gets no progress.

        A step chained straight after the previous commit, in this thread,
        costs no return to the loop: that round trip (thread to loop to task
        to thread) was ~0.2-0.3 ms a step on the chain of writes and syncs,
        163 steps for the bench's 1 GiB COW. Stops at ``None``, at a verdict
        0 (the checking thread raises), or raising (the nursery then cancels
        the main task, which waits on the loop, never in a thread); a byte 0
        on "written" then stops a checking thread waiting for a write."""
        token, io, stats = self._token, self.io, self.stats
        assert token is not None
        try:
            while (step := self._queue.get()) is not None:
                stopped, syncs, seconds = io.run_program(step.program)
                stats["syncs"] += syncs
                stats["sync_seconds"] += seconds
                if stopped != -1:
                    return
                stats["scratch_windows"] += step.scratch
                if step.count:
                    token.run_sync_soon(self._committed, step.count)
        finally:
            if self.verify:
                os.write(self._pipes["written"][1], b"\0")

    def _check_steps(self) -> None:
        """The checking thread (with ``verify``; one worker call for the
        whole run): each step is read back once the commit thread wrote it
        and compared with what was written, while the base is synced (the
        step's program, :meth:`_prepared`): the verdict is ready when the
        sync returns. Read back on the loop's side, it often was not yet on
        a loaded machine (50-200 ms of a 1 GiB merge waiting for verdicts).
        A step that reads back differently raises :class:`MergeVerifyError`;
        leaving for any reason, the thread sends verdict 0 (stop) to the
        commit thread, in case it waits for one."""
        try:
            while (step := self._checks.get()) is not None:
                differs = self.io.run_program(step.check)[0]
                if differs == -2:
                    return  # the commit thread stopped before writing this step
                if differs >= 0:
                    bs = self.bs
                    raise MergeVerifyError(
                        f"the base reads back differently from what the merge wrote at block "
                        f"{_block_at(step.runs, differs // bs)} (byte {differs % bs} of it); the base storage is "
                        "failing or something else writes to it: stop and check it")
        finally:
            os.write(self._pipes["verdict"][1], b"\0")

    def _committed(self, count: int) -> None:
        """On the loop: ``count`` more ops are durable (told to the hooks and ``on_progress``)."""
        first = self.merged_ops
        self.merged_ops += count
        self.hooks.committed(first, self.merged_ops)
        self._progress()
        if self._idle is not None and self.merged_ops == self._next:
            self._idle.set()

    async def _settle(self) -> None:
        """Wait until every step handed to the commit thread is committed."""
        while self.merged_ops < self._next:
            self._idle = trio.Event()
            await self._idle.wait()
        self._idle = None

    async def _before_write(self) -> None:
        """Before a step is handed over: online, wait until the previous
        step's commit has returned and the hooks heard of it (a window is
        published only once the one before is retired). Offline nothing
        waits: the commit thread writes the step right after that commit."""
        if not self._chain:
            await self._settle()


@dataclass
class _Prepared:
    """A step ready to be handed over: a window's new ``blocks`` (None for
    Replace/Zero ops), its ``data``, where it goes (``runs``, :func:`_runs`)
    and what the commit thread does with it."""

    blocks: list[int] | None
    data: memoryview | bytearray
    runs: list[tuple[int, list[list[int]]]]
    step: _Step


class _Step:
    """A step for the commit thread: its ``program`` and the checking
    thread's ``check`` (:meth:`MergeIO.run_program`; empty without
    ``verify``), the ops it commits (0: part of a batch, committed with its
    last part), whether it goes through the scratch area, and where its data
    goes (``runs``: to name a block that read back differently)."""

    __slots__ = ("program", "check", "count", "scratch", "runs")

    def __init__(self, program: list[tuple], check: list[tuple], count: int, scratch: bool,
                 runs: list[tuple[int, list[list[int]]]]) -> None:
        self.program = program
        self.check = check
        self.count = count
        self.scratch = scratch
        self.runs = runs


def _views(buf, runs: list[tuple[int, list[list[int]]]], bs: int) -> list[tuple[int, list[memoryview]]]:
    """``runs`` (:func:`_runs`) over ``buf``: ``(offset, views)`` pairs, as :meth:`MergeIO.pwritev_runs` takes them."""
    v = memoryview(buf)
    return [(block * bs, [v[p * bs : (p + m) * bs] for p, m in spans]) for block, spans in runs]


def _runs(pieces: list[tuple[int, int, int]]) -> list[tuple[int, list[list[int]]]]:
    """Where a step's data goes: ``(new_block, blocks, position in data)``
    pieces, sorted and joined into runs of consecutive new blocks,
    ``(first block, [[position, blocks], ...])`` (spans of the data in run
    order, one ``pwritev`` a run). Made while the step is prepared, not on
    the chain of writes and syncs."""
    runs: list[tuple[int, list[list[int]]]] = []
    run_end = -1
    for block, n, pos in sorted(pieces):
        if block == run_end:
            last = runs[-1][1][-1]
            if last[0] + last[1] == pos:
                last[1] += n
            else:
                runs[-1][1].append([pos, n])
        else:
            runs.append((block, [[pos, n]]))
        run_end = block + n
    return runs


def _block_at(runs: list[tuple[int, list[list[int]]]], position: int) -> int:
    """The new block that block ``position`` of a step's data is written to."""
    for block, spans in runs:
        for pos, n in spans:
            if pos <= position < pos + n:
                return block + position - pos
            block += n
    raise ValueError(f"block {position} of the data is written nowhere")


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The first exception in a (nested) group: the engine's nursery holds the
    main task and one commit task, and callers expect the merge's own errors
    (:class:`MergeVerifyError`, an ``OSError``) unwrapped."""
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group
