"""Merge a COW file into its base image, in place, the way snapuserd does.

    result = await merge_cow("old.img", "new.cow", offload="auto")

Afterwards the base *is* the target and the COW header's ``num_merge_ops``
counts every op. The merge can be stopped at any instant (SIGKILL, power
cut): running it again resumes from the COW header and its scratch window
and ends with the same image (the protocol: :mod:`._merge_engine`).

Before the base is touched, :func:`plan_merge` refuses a COW file that
cannot be merged in place safely (:class:`MergeUnsafeError`): an ordered op
(Copy/Xor) reading a block an earlier op overwrites, ordered ops after
Replace/Zero ops, or ops writing past the end of the base. Copy/Xor ops in
a file without scratch space (``buffer_size`` 0) are made crash-safe by a
journal file beside it, ``<cow>.merge-journal`` (:mod:`._merge_journal`),
removed when the merge completes; refused only when it cannot be written. A damaged header or scratch window
at resume is a :class:`MergeResumeError`.

Two merges of one COW file at once are refused (:class:`MergeBusyError`,
an exclusive ``flock`` on the COW file). The online merge of a served
snapshot is :class:`dmuserd.snapshot.merge_control.MergeControl`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import sys
from dataclasses import dataclass

import structlog
import trio

from dmuserd.snapshot._cow_format import ORDERED_OPS, CowFormatError, type_marks
from dmuserd.snapshot._cow_reader import CowReader
from dmuserd.snapshot._merge_engine import MergeEngine, MergeHooks, MergeIO, MergePlan, read_state
from dmuserd.snapshot._merge_errors import (
    MergeBusyError,
    MergeError,
    MergeResumeError,
    MergeStateError,
    MergeUnsafeError,
    MergeVerifyError,
)
from dmuserd.snapshot._merge_scratch import ScratchLayout

__all__ = [
    "MergeBusyError", "MergeError", "MergeHooks", "MergeIO", "MergePlan", "MergeResult", "MergeResumeError",
    "MergeStateError", "MergeUnsafeError", "MergeVerifyError", "lock_cow", "merge_cow", "merge_cow_offline",
    "open_plan_journal", "plan_merge", "read_state",
]

log = structlog.get_logger("dmuserd.snapshot.merge")

_UNSAFE_ORDER = {"source-overwritten", "ordered-after-unordered"}
#: op type -> 1 for Copy/Xor (a ``bytes.translate`` table)
_IS_ORDERED = type_marks(ORDERED_OPS)


def plan_merge(reader: CowReader, base_size: int, *, journal: bool = True) -> MergePlan:
    """The checked merge plan of ``reader``'s file over a base of ``base_size`` bytes.

    A file with Copy/Xor ops but no scratch space gets a plan whose windows
    go to its merge journal (:mod:`._merge_journal`; the caller opens it
    with :func:`open_plan_journal`), or is refused when ``journal`` is False.

    Raises :class:`MergeUnsafeError` (see the module doc) or
    :class:`CowFormatError` for a file that is broken in itself.
    """
    path = reader.path
    refused = "; the base is untouched"
    try:
        order = reader.merge_order_rows()
    except CowFormatError as exc:
        if exc.rule not in _UNSAFE_ORDER:
            raise exc.with_path(path) from None
        raise MergeUnsafeError(
            f"{path} cannot be merged in place: {exc.detail}{refused}. Regenerate the COW file "
            "(`dmuserd cow create` orders copies safely) or write the target with `dmuserd cow render`"
        ) from None
    bs = reader.block_size
    table = reader.table
    nb, fac, ty = table.new_block, table.factor, table.type
    limit = base_size // bs
    # a bound first: no op starts past the table's largest new block nor covers more than its largest
    # factor allows (OpTable.largest; the factors' distinct values, zeros dropped first: every v2 op's is 0);
    # the op is looked for only when the bound passes the end
    bound = (table.largest(nb) or 0) + (1 << max(set(fac.tobytes().translate(None, b"\0")), default=0))
    for r in order if bound > limit else ():
        if nb[r] + (1 << fac[r]) > limit:
            op = table.op(r)
            raise MergeUnsafeError(
                f"{path} cannot be merged in place: op #{op.index} ({op.type.name.lower()}) writes new block "
                f"{op.new_block + op.blocks - 1}, past the end of the {base_size}-byte base{refused}; "
                "an in-place merge does not grow the base: use a base of the target's size"
            )
    reader.check_base_size(base_size)
    header = dataclasses.replace(reader.header)
    layout = ScratchLayout(header.header_size, header.buffer_size, bs)
    # the Copy/Xor ops, all at the front of the order (merge_order_rows checked that no other op comes between,
    # and the order holds every data op): counted over the type column, not looked up row by row
    ordered = ty.tobytes().translate(_IS_ORDERED).count(1)
    if ordered and not layout.capacity and journal:
        from dmuserd.snapshot._merge_journal import journal_layout

        # no scratch space: the windows go to a journal file beside the COW file (opened by the caller)
        return MergePlan(table, order, ordered, journal_layout(bs), bs, header, journal=True)
    if ordered and not layout.capacity:
        raise MergeUnsafeError(
            f"{path} cannot be merged in place: it has {ordered} copy/xor ops but only {header.buffer_size} "
            f"bytes of scratch space (buffer_size, offset 34), too little for one {bs}-byte block, so an "
            f"interrupted merge could not be recovered{refused}. Regenerate the COW file with scratch space "
            "(the default 2 MiB) or write the target with `dmuserd cow render`"
        )
    return MergePlan(table, order, ordered, layout, bs, header)


def open_plan_journal(plan: MergePlan, cow, cow_fd: int) -> int:
    """Open the merge journal a journal plan needs (:class:`MergeUnsafeError` naming where, if it cannot)."""
    from dmuserd.snapshot._merge_journal import open_journal

    return open_journal(cow, cow_fd, plan.header.header_size, plan.block_size)


def lock_cow(fd: int, path) -> None:
    """Take the exclusive merge lock on an open COW file (or refuse)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise MergeBusyError(f"{path} is being merged by another process or target; "
                             "wait for it (or stop it) and try again") from None


@dataclass
class MergeResult:
    """What a merge run did."""

    total_ops: int
    merged_before: int  # ops already merged when this run started
    merged_now: int  # ops this run merged
    total_blocks: int
    resumed_window: bool  # a durable scratch window was written again first
    #: windows of ordered ops, those that went through the scratch area,
    #: Replace/Zero batches, fdatasync calls
    stats: dict = dataclasses.field(default_factory=dict)


async def merge_cow(base, cow, *, offload: str = "auto", verify: bool = True, on_progress=None,
                    io_class=MergeIO, mover=None, threshold: int | None = None,
                    base_size: int | None = None) -> MergeResult:
    """Merge ``cow`` into ``base`` in place (resuming an interrupted merge).

    ``offload`` picks the data mover's engine (``auto``, ``dsa``,
    ``emulated``, ``cpu``) unless a ``mover`` is given. ``on_progress(plan,
    merged_ops)`` is called once the state is recovered and after every
    commit. ``io_class(base_fd, cow_fd)`` makes the :class:`MergeIO`.
    ``base_size``: the base's size when it is not the file's (an
    ``io_class`` mapping the base onto part of the file, as a logical
    partition of a super image).
    """
    from dmuserd.dsa_offload import open_mover
    from dmuserd.images import not_raw_reason

    reason = not_raw_reason(base)
    if reason is not None:
        raise MergeUnsafeError(f"{reason}: a merge writes its base in place, which only a raw image can take; "
                               "unsparse it first (`dmuserd image unsparse`) or write the target with "
                               "`dmuserd cow render`")
    reader = CowReader(cow, check_merge=False)
    fds: list[int] = []
    try:
        cloexec = getattr(os, "O_CLOEXEC", 0)
        base_fd = os.open(os.fspath(base), os.O_RDWR | cloexec)
        fds.append(base_fd)
        cow_fd = os.open(os.fspath(cow), os.O_RDWR | cloexec)
        fds.append(cow_fd)
        lock_cow(cow_fd, cow)
        if base_size is None:
            base_size = os.lseek(base_fd, 0, os.SEEK_END)
        plan = plan_merge(reader, base_size)
        io = io_class(base_fd, cow_fd)
        if plan.journal:
            fds.append(open_plan_journal(plan, cow, cow_fd))
            io.fds["journal"] = fds[-1]
        state = await trio.to_thread.run_sync(read_state, io, reader, plan)
        before = state.merged_ops
        log.info("merge", base=str(base), cow=str(cow), ops=plan.total_ops, merged_ops=before,
                 window=state.pending is not None)
        progress = None if on_progress is None else (lambda done: on_progress(plan, done))
        if mover is None:
            kwargs = {} if threshold is None else {"threshold": threshold}
            async with open_mover(offload, **kwargs) as opened:
                engine = MergeEngine(reader, plan, io, opened, state, verify=verify, on_progress=progress)
                now = await engine.run()
        else:
            engine = MergeEngine(reader, plan, io, mover, state, verify=verify, on_progress=progress)
            now = await engine.run()
        if plan.journal:
            from dmuserd.snapshot._merge_journal import remove_journal

            remove_journal(cow)
        log.info("merged", base=str(base), cow=str(cow), ops=plan.total_ops, this_run=now, **engine.stats)
        return MergeResult(plan.total_ops, before, now, plan.total_blocks, state.pending is not None, engine.stats)
    finally:
        for fd in fds:
            os.close(fd)
        reader.close()


def merge_cow_offline(base, cow, *, offload: str = "auto", verify: bool = True,
                      progress: bool | None = None) -> MergeResult:
    """:func:`merge_cow` for the command line: a tqdm bar when stderr is a terminal.

    tqdm is imported only when the bar is shown (it costs ~10 ms of start-up).
    """
    show = sys.stderr.isatty() if progress is None else progress
    bar = None

    def on_progress(plan: MergePlan, done: int) -> None:
        nonlocal bar
        blocks = plan.prefix[done] * plan.block_size
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=plan.total_blocks * plan.block_size, initial=blocks, desc="cow merge", unit="B",
                       unit_scale=True, file=sys.stderr, leave=False)
        else:
            bar.update(blocks - bar.n)

    try:
        return trio.run(lambda: merge_cow(base, cow, offload=offload, verify=verify,
                                          on_progress=on_progress if show else None))
    finally:
        if bar is not None:
            bar.close()
