"""Online merge of a served snapshot.

:class:`MergeControl` is ``SnapshotBackend.merge``: it runs the in-place
merge (:mod:`dmuserd.snapshot.merge`) as a background trio task while the
target keeps serving. Every read returns target data throughout: merged
blocks come from the base, the ordered window being written from memory
(:meth:`SnapshotView.publish_window`), the rest through the COW. When the
merge is done the backend reads the base directly.

Interface (the snapuserd-style control commands are built on it)::

    control.state      # a MergeState: NOT_STARTED, MERGING, PAUSED, MERGED, FAILED
    control.error      # why it failed, or None
    control.percent()  # 0.0 .. 100.0, by blocks
    control.start(nursery); control.pause(); control.resume()

The state moves only along :data:`TRANSITIONS` (one table: state, event →
next state); an event the table does not list for the current state is
refused with a :class:`MergeStateError`. Its words (``"merging"``...) are
for the edges only: the status JSON and snapuserd's replies.

A pause takes effect at the next step boundary (a window of at most 510
blocks, or 256 Replace/Zero ops): what is under way completes and commits.

Refusals are :class:`~dmuserd.snapshot.merge.MergeError`s; the daemon's
control command (``{"cmd": "merge", ...}``, :mod:`dmuserd.daemon.control`)
turns them into error answers and answers with :meth:`MergeControl.describe`'s
fields.
"""

from __future__ import annotations

import enum
import os

import structlog
import trio

from dmuserd.errors import DmuserdError
from dmuserd.snapshot._merge_engine import MergeEngine, MergeHooks, MergeIO, MergePlan, read_state
from dmuserd.snapshot._merge_errors import MergeError, MergeStateError, MergeUnsafeError
from dmuserd.snapshot._merge_journal import open_journal_readonly, probe_journal, remove_journal
from dmuserd.snapshot.base_backend import BackendMergeIO, merge_refusal
from dmuserd.snapshot.merge import lock_cow, open_plan_journal, plan_merge

log = structlog.get_logger("dmuserd.snapshot.merge")


class MergeState(enum.Enum):
    """Where an online merge is; the value is its word in the status JSON."""

    NOT_STARTED = "not-started"
    MERGING = "merging"
    PAUSED = "paused"
    MERGED = "merged"
    FAILED = "failed"


class MergeEvent(enum.Enum):
    """What moves a merge from one state to the next: the three requests, and how its task ends."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    FINISH = "finish"
    FAIL = "fail"


_S, _E = MergeState, MergeEvent

#: The merge's state machine: state -> {event: next state}. A pause asked of a paused merge
#: and a resume of a running one change nothing; a failed merge may start again (it
#: resumes from what the COW file records); a paused merge's task may still end (its
#: last step was under way, or a write failed while it settled).
TRANSITIONS: dict[MergeState, dict[MergeEvent, MergeState]] = {
    _S.NOT_STARTED: {_E.START: _S.MERGING},
    _S.MERGING: {_E.PAUSE: _S.PAUSED, _E.RESUME: _S.MERGING, _E.FINISH: _S.MERGED, _E.FAIL: _S.FAILED},
    _S.PAUSED: {_E.PAUSE: _S.PAUSED, _E.RESUME: _S.MERGING, _E.FINISH: _S.MERGED, _E.FAIL: _S.FAILED},
    _S.MERGED: {},
    _S.FAILED: {_E.START: _S.MERGING},
}

#: What to tell someone whose request the state refuses.
_REFUSAL_HINTS = {
    _E.START: "pause, resume or wait for it",
    _E.PAUSE: "only a running merge can pause",
    _E.RESUME: "only a paused merge can resume (start one with `dmuserd merge start`)",
}


def next_state(state: MergeState, event: MergeEvent) -> MergeState:
    """The state ``event`` leads to from ``state``; :class:`MergeStateError` if the table has no such move."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        hint = _REFUSAL_HINTS.get(event, "this is a bug in the merge's task")
        raise MergeStateError(f"the merge is {state.value}: it cannot {event.value}; {hint}") from None


class MergeControl:
    """The online merge of one snapshot backend; see the module doc.

    ``reader``/``view`` are the backend's; ``base``/``cow`` the paths;
    ``offload`` the data mover engine, or ``mover`` an open data mover to
    share (the serving target's: a dedicated DSA queue takes one opener, so
    serving and merging must not each open their own); ``trust_progress`` False when the
    backend was told the base holds no merge progress (``merged=no``),
    which forbids merging, as does ``unfinished`` (read up to a label).
    ``merge_base``: a separate device the merge reads and writes instead of
    ``base`` (snapuserd's ``base_path_merge``: the same blocks as the base,
    through another dm device; the view reads merged blocks from it). ``base_backend``: the backend
    the base is (:mod:`~dmuserd.snapshot.base_backend`, an RBD image...): the merge reads, writes and
    flushes it instead of opening ``base``. Reads the COW's merge state at once: a durable
    scratch window of an interrupted merge is served from memory right
    away, so reads are right before the merge resumes.
    """

    def __init__(self, reader, view, base, cow, *, offload: str = "auto", mover=None, trust_progress: bool = True,
                 unfinished: bool = False, merge_base=None, base_backend=None) -> None:
        self.reader = reader
        self._base_backend = base_backend
        self.view = view
        self.base = str(base if merge_base is None else merge_base)  # what the merge writes
        self.cow = str(cow)
        self.offload = offload
        self._shared_mover = mover
        self._mover = None  # the data mover of the running (or last) merge
        self.state = MergeState.NOT_STARTED  # or MERGED below: where it starts, not a move
        self.error: str | None = None
        #: True while the merge task waits at a pause point (a pause has taken effect)
        self.parked = False
        self._trust = trust_progress
        self._resume = trio.Event()
        self._resume.set()
        self._plan: MergePlan | None = None
        self._unsafe: MergeError | None = None
        self.merged_ops = reader.num_merge_ops if trust_progress else 0
        if unfinished:
            self._unsafe = MergeUnsafeError(f"{self.cow} is read up to a label (an unfinished COW file); "
                                            "only a complete file can be merged")
            return
        if base_backend is not None:
            self._unsafe = merge_refusal(base_backend, self.base)
            if self._unsafe is not None:
                return
        elif getattr(view, "base_image", None) is not None:  # a sparse image, a super partition, a zip entry
            self._unsafe = MergeUnsafeError(
                f"the base {self.base} is read as a {view.base_image.kind} image, not a plain file: a merge writes "
                "the base in place; serve a raw image (`dmuserd image unsparse`) to merge online")
            return
        try:
            self._plan = plan_merge(reader, view.base_size)
        except MergeError as exc:
            self._unsafe = exc
            return
        if not trust_progress:
            return
        from dmuserd.dsa_offload._cpu import crc32c

        fd = os.open(self.cow, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        journal_fd = open_journal_readonly(self.cow) if self._plan.journal else None
        try:
            io = MergeIO(-1, fd)
            if journal_fd is not None:
                io.fds["journal"] = journal_fd
            state = read_state(io, reader, self._plan, crc=crc32c)
        finally:
            os.close(fd)
            if journal_fd is not None:
                os.close(journal_fd)
        self.merged_ops = state.merged_ops
        if state.pending is not None:
            self.view.publish_window(_window(state.pending.blocks, state.pending.data, self._plan.block_size))
        if self.merged_ops >= self._plan.total_ops and state.pending is None:
            self.state = MergeState.MERGED

    # --- the interface ------------------------------------------------------

    def percent(self) -> float:
        """How much is merged, 100.0 only once the merge is complete.

        The last ops are written a moment before the merge is marked done;
        until then this says at most 99.999, so that a client that polls
        ``merge_percent`` for 100 then sees ``getstatus`` complete too."""
        if self.state is MergeState.MERGED:
            return 100.0
        if self._plan is None:
            return 0.0
        return min(round(self._plan.percent(self.merged_ops), 3), 99.999)

    def start(self, nursery) -> None:
        """Start merging in the background (a task in ``nursery``)."""
        self.check_startable()
        self._move(MergeEvent.START)
        self.error = None
        self._resume.set()
        nursery.start_soon(self._run)

    def check_startable(self) -> None:
        """Raise what :meth:`start` would refuse with now (a queued start is checked up front)."""
        if self.state is MergeState.MERGED:
            raise MergeStateError(f"{self.cow} is already merged into {self.base}; nothing to do")
        self._next(MergeEvent.START)
        if self._unsafe is not None:
            raise self._unsafe
        if self._plan is not None and self._plan.journal:
            probe_journal(self.cow)  # no scratch space: the merge needs its journal beside the COW file
        if not self._trust:
            raise MergeStateError(
                f"this target was opened with merged=no (the base is taken to hold no merge progress), "
                f"but {self.cow} records {self.reader.num_merge_ops} merged ops; serve it with merged=yes "
                "(or without the option) to merge it")

    def pause(self) -> None:
        """Pause at the next step boundary (a no-op when already paused)."""
        was = self.state
        self._move(MergeEvent.PAUSE)
        if was is not MergeState.PAUSED:
            self._resume = trio.Event()

    def resume(self) -> None:
        """Continue a paused merge (a no-op when it is running)."""
        self._move(MergeEvent.RESUME)
        self._resume.set()

    def _next(self, event: MergeEvent) -> MergeState:
        """The table's next state for ``event`` now; :class:`MergeStateError` naming this COW file if none."""
        try:
            return next_state(self.state, event)
        except MergeStateError as exc:
            raise MergeStateError(f"{self.cow}: {exc}") from None

    def _move(self, event: MergeEvent) -> None:
        self.state = self._next(event)

    def describe(self) -> dict:
        plan = self._plan
        return {
            "state": self.state.value,
            "percent": self.percent(),
            "merged_ops": self.merged_ops,
            "total_ops": plan.total_ops if plan else self.reader.data_op_count,
            "error": self.error,
            "parked": self.parked,
            # What the data mover did (engine, offloaded ops, CPU fallbacks by reason).
            "mover": self._mover.stats() if self._mover is not None else None,
        }

    # --- the task ----------------------------------------------------------

    async def _run(self) -> None:
        from dmuserd.dsa_offload import open_mover

        fds: list[int] = []
        try:
            cloexec = getattr(os, "O_CLOEXEC", 0)
            if self._base_backend is None:
                fds.append(os.open(self.base, os.O_RDWR | cloexec))
            fds.append(os.open(self.cow, os.O_RDWR | cloexec))
            cow_fd = fds[-1]
            lock_cow(cow_fd, self.cow)
            io = MergeIO(fds[0], cow_fd) if self._base_backend is None else BackendMergeIO(self._base_backend, cow_fd)
            if self._plan.journal:  # no scratch space in the COW file: the windows go to its journal
                fds.append(open_plan_journal(self._plan, self.cow, cow_fd))
                io.fds["journal"] = fds[-1]
            state = await trio.to_thread.run_sync(read_state, io, self.reader, self._plan)
            if state.merged_ops != self.merged_ops:
                raise MergeStateError(f"{self.cow} records {state.merged_ops} merged ops, this target "
                                      f"{self.merged_ops}: something else merged it meanwhile; restart the target")
            log.info("online merge", cow=self.cow, base=self.base, merged_ops=self.merged_ops,
                     ops=self._plan.total_ops)
            if self._shared_mover is not None:
                self._mover = self._shared_mover
                await MergeEngine(self.reader, self._plan, io, self._mover, state, hooks=_Hooks(self)).run()
            else:
                async with open_mover(self.offload) as mover:
                    self._mover = mover
                    await MergeEngine(self.reader, self._plan, io, mover, state, hooks=_Hooks(self)).run()
            if self._plan.journal:
                remove_journal(self.cow)
            log.info("online merge done", cow=self.cow, base=self.base)
            self._move(MergeEvent.FINISH)  # last: until here the task is MERGING or PAUSED, where FAIL is a move
        except (DmuserdError, OSError) as exc:
            self.state, self.error = next_state(self.state, MergeEvent.FAIL), str(exc)
            log.error("online merge failed", cow=self.cow, error=self.error)
        except Exception as exc:  # noqa: BLE001 - a failed merge must not take the daemon down
            self.state, self.error = next_state(self.state, MergeEvent.FAIL), f"internal error: {exc!r}"
            log.exception("online merge failed", cow=self.cow)
        finally:
            for fd in fds:
                os.close(fd)


class _Hooks(MergeHooks):
    def __init__(self, control: MergeControl) -> None:
        self.control = control

    async def window_ready(self, new_blocks: list[int], data) -> None:
        blocks = _window(new_blocks, data, self.control._plan.block_size)
        await trio.to_thread.run_sync(self.control.view.publish_window, blocks)

    def committed(self, first: int, end: int) -> None:
        self.control.view.retire_window(self.control._plan.new_blocks(first, end))
        self.control.merged_ops = end

    async def checkpoint(self, settle) -> None:
        await trio.lowlevel.checkpoint()
        control = self.control
        if control.state is MergeState.PAUSED:
            await settle()  # a pause holds with everything written committed
        while control.state is MergeState.PAUSED:
            control.parked = True
            try:
                await control._resume.wait()
            finally:
                control.parked = False


def _window(new_blocks: list[int], data, bs: int) -> dict[int, bytes]:
    """The view's window: new block -> its contents (copied out of ``data``)."""
    return {block: bytes(data[i * bs : (i + 1) * bs]) for i, block in enumerate(new_blocks)}

