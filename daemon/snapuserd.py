"""snapuserd's control protocol, so Android tooling can drive dmuserd.

The daemon's control socket speaks it next to its JSON lines: a connection
whose first byte is not ``{`` is a snapuserd client. As with snapuserd, each
``recv()`` of at most 512 bytes is one message: ASCII words separated by
commas, no terminator; each reply is one such message (a trailing newline on
a request is tolerated, for people typing at ``socat``).

==============================================  =========================================
request                                         reply
==============================================  =========================================
``query``                                       ``active`` (``passive`` after ``detach``)
``init,<misc>,<cow>,<backing>,<base_merge>``    ``success,<num_sectors>`` / ``fail``
``start,<misc>``                                ``success`` / ``fail``
``delete,<misc>``                               ``success`` (once the device is gone) / ``fail``
``supports,<feature>``                          ``fail`` (no feature: see :data:`FEATURES`)
``getstatus,<misc>``                            ``snapshot``, ``snapshot-merge``,
                                                ``snapshot-merge-complete``, ``snapshot-merge-failed``
``initiate_merge,<misc>``                       ``success`` / ``fail``
``merge_percent``                               e.g. ``42.000000``
``pause_merge``, ``resume_merge``               ``success``
``update-verify``                               ``success`` / ``fail``
``detach``, ``stop``                            no reply
==============================================  =========================================

``init`` opens ``<cow>`` over ``<backing>`` as a ``snapshot`` backend (the
snapshot device's size is the answer, in 512-byte sectors) without serving
it; the caller then creates the dm-user table of that size with the misc
name ``<misc>``, and ``start`` attaches a target named ``<misc>`` to
``/dev/dm-user/<misc>``. Blocks not merged yet are read from ``<backing>``;
the merge reads and writes ``<base_merge>``, and merged blocks are served
from it (libsnapshot names ``<p>-src`` and ``<p>-base``: two dm devices over
the same blocks, which must be of the same size; the reply's sector count is
``<base_merge>``'s, as snapuserd's). When both name the same file or device,
one path serves both.
``delete`` answers once the device is gone (libsnapshot removes the
dm-user table first, then asks), serving it until then, and ``stop`` ends
the daemon once every started device is gone: when a table is removed the
handler goes with it (:func:`_watch_device`). ``initiate_merge`` queues the
merge; at most ``merge_threads`` merges run (or are paused) at once, as
snapuserd's ``num_merge_threads``. An unknown request gets ``fail`` and the
connection is closed, as snapuserd does.

``update-verify`` is snapuserd's post-OTA check (update_verifier asks it at
boot, before the merge): when a handler starts on a COW whose merge has not
begun, every block of its snapshot device is read through the snapshot (2
readers interleaving 1 MiB pieces, as snapuserd's ``UpdateVerify``), which
decompresses and checks every op the device needs; a read that fails makes
the verification fail, named in the log. Where the partition carries an
AVB hashtree (dm-verity), the data read through the snapshot is checked
against it too (:func:`_check_hashtree`). ``update-verify`` waits up to
:data:`VERIFY_WAIT` seconds for the handlers' verifications (without
blocking other clients) and answers ``success`` only when every handler is
started and verified; with no handler at all it answers ``success``, and a
handler that resumed a merge was not verified (snapuserd does not scan
then): ``fail``. Progress is in ``dmuserd status`` (``snapuserd``).
"""

from __future__ import annotations

import os
import stat
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
import trio

from dmuserd.snapshot.merge_control import MergeState

if TYPE_CHECKING:
    from dmuserd.snapshot.backend import SnapshotBackend

log = structlog.get_logger("dmuserd.snapuserd")

#: The input surface of snapuserd's clients (:mod:`dmuserd.daemon.guard`).
SURFACE = "control-snapuserd"
#: snapuserd's kMaxPacketSize: a message is one recv() of at most this many bytes.
MAX_MESSAGE = 512
#: ``supports,<feature>`` features we have. Not ``second_stage_socket_handoff``:
#: libsnapshot then hands the first-stage daemon's devices to a second one over
#: the socket, which dmuserd does not do, so it must hear ``fail`` and keep this one.
FEATURES: frozenset[str] = frozenset()
#: how long ``delete`` waits for the device to go before answering ``fail``
DELETE_WAIT = 10.0
#: how long a merge is given to reach a step boundary when its device goes
SETTLE_WAIT = 30.0
#: how often a started device is checked for its table's removal
WATCH_INTERVAL = 0.05
#: how long ``update-verify`` waits for verifications under way (snapuserd's 10 s)
VERIFY_WAIT = 10.0
#: a verification reads the device in pieces of this size, with this many readers
VERIFY_PIECE = 1 << 20
VERIFY_READERS = 2

# Replies of getstatus, by MergeControl.state (snapuserd's words for the merge states).
_STATUS = {
    MergeState.NOT_STARTED: "snapshot",
    MergeState.MERGING: "snapshot-merge",
    MergeState.PAUSED: "snapshot-merge",
    MergeState.MERGED: "snapshot-merge-complete",
    MergeState.FAILED: "snapshot-merge-failed",
}


@dataclass
class Handler:
    """One ``init``-ed snapshot device, attached by ``start``."""

    misc: str
    cow: str
    backing: str
    base_merge: str
    backend: SnapshotBackend
    #: the snapshot backend's options (``base_merge`` among them when it is a device of its own)
    options: dict = field(default_factory=dict)
    started: bool = False
    #: update verification: "not-run", "running", "success", "failed", "skipped" (a resumed merge)
    verify: str = "not-run"
    verify_error: str | None = None
    verified_bytes: int = 0
    #: the dm-verity check of the AVB hashtree: None (not reached), "matched", "none" (no hashtree),
    #: or "not checked: why"
    hashtree: str | None = None
    #: tells the hash tree check's worker thread to stop (the handler goes)
    verify_stop: threading.Event = field(default_factory=threading.Event)
    verify_done: trio.Event = field(default_factory=trio.Event)
    verify_scope: trio.CancelScope | None = None
    #: set once the started device is gone and the handler dropped
    gone: trio.Event = field(default_factory=trio.Event)
    #: initiate_merge accepted, waiting for a merge slot (num_merge_threads)
    merge_queued: bool = False
    #: the scope of the running merge's task (cancelled, after a pause took effect, when the device goes)
    merge_scope: trio.CancelScope | None = None

    @property
    def merge(self):
        """The backend's MergeControl, or None when it has none."""
        return getattr(self.backend, "merge", None)


@dataclass
class SnapuserdState:
    """What snapuserd keeps between connections, per daemon."""

    handlers: dict[str, Handler] = field(default_factory=dict)
    #: set by ``detach``: ``query`` answers ``passive``
    terminating: bool = False
    #: deleted handlers whose merge had completed (they count as 100% in merge_percent)
    merges_completed: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)
    #: snapuserd's ro.virtual_ab.num_merge_threads: merges running (or paused) at once
    merge_threads: int = 2
    merge_limiter: trio.CapacityLimiter | None = None


_STATES: "weakref.WeakKeyDictionary[object, SnapuserdState]" = weakref.WeakKeyDictionary()


def state_of(daemon) -> SnapuserdState:
    """The snapuserd state of ``daemon`` (created on first use)."""
    state = _STATES.get(daemon)
    if state is None:
        state = _STATES[daemon] = SnapuserdState()
    return state


def parse_message(data: bytes) -> list[str]:
    """One request → its comma-separated words (a trailing newline dropped)."""
    text = data.decode("ascii", errors="replace")
    if text.endswith("\n"):
        text = text[:-1].removesuffix("\r")
    return text.split(",")


async def serve_client(daemon, stream, first: bytes, peer=None) -> None:
    """Serve one snapuserd client; ``first`` is its first message.

    A request that fails in an unexpected way (a bug) is answered ``fail``
    and ends this connection, counted by the daemon's guard; the client sees
    what snapuserd's clients see for any failed request.
    """
    import trio

    message = first
    while message:
        try:
            reply, keep_open = await handle_message(daemon, message, peer)
        except Exception as exc:  # noqa: BLE001 - one client's request fails alone
            daemon.guard.failed(SURFACE, exc, peer, request=_printable(message))
            reply, keep_open = "fail", False
        try:
            if reply is not None:
                await stream.send_all(reply.encode())
            if not keep_open:
                return
            message = await stream.receive_some(MAX_MESSAGE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def _printable(data: bytes, limit: int = 80) -> str:
    """A request as a log field: ASCII, at most ``limit`` characters."""
    return data[:limit].decode("ascii", errors="backslashreplace")


async def handle_message(daemon, data: bytes, peer=None) -> tuple[str | None, bool]:
    """Answer one message: ``(reply or None, keep the connection open)``."""
    words = parse_message(data)
    op, args = words[0], words[1:]
    state = state_of(daemon)
    log.debug("snapuserd request", request=",".join(words))
    if op == "query":
        return ("passive" if state.terminating or daemon.stopping else "active"), True
    if op == "stop":
        log.info("snapuserd stop: the daemon stops once its devices are gone",
                 devices=sorted(h.misc for h in state.handlers.values() if h.started))
        state.terminating = True
        daemon.nursery.start_soon(_stop_when_devices_gone, daemon, state)
        return None, False
    if op == "detach":
        log.info("snapuserd detach: pausing merges, answering passive")
        state.terminating = True
        for handler in state.handlers.values():
            if handler.merge is not None and handler.merge.state is MergeState.MERGING:
                handler.merge.pause()
        return None, True
    if op == "merge_percent":
        return f"{_merge_percent(state):f}", True
    if op in ("pause_merge", "resume_merge"):
        _pause_or_resume(state, op == "pause_merge")
        return "success", True
    if op == "update-verify":
        return await _update_verify(state), True
    handler_ops = {
        "init": (4, _init),
        "start": (1, _start),
        "delete": (1, _delete),
        "supports": (1, _supports),
        "getstatus": (1, _getstatus),
        "initiate_merge": (1, _initiate_merge),
    }
    if op not in handler_ops:
        daemon.guard.reject(SURFACE, "unknown-request", "not a snapuserd request: answered fail, closed",
                            peer, request=_printable(data))
        return "fail", False
    count, function = handler_ops[op]
    if op == "delete" and len(args) == count:
        return await _delete(daemon, state, *args), True  # waits for the device: takes the lock itself
    if len(args) != count:
        daemon.guard.reject(SURFACE, "malformed-request", f"{op} takes {count} argument(s), got {len(args)}",
                            peer, request=_printable(data))
        return ("snapshot-merge-failed" if op == "getstatus" else "fail"), True
    async with state.lock:
        return await function(daemon, state, *args), True


async def _init(daemon, state: SnapuserdState, misc: str, cow: str, backing: str, base_merge: str) -> str:
    from dmuserd.backends import create
    from dmuserd.daemon.dmsetup import check_name
    from dmuserd.errors import DmuserdError

    if misc in state.handlers:
        log.error("snapuserd init: a handler exists already", misc=misc)
        return "fail"
    try:
        check_name(misc)
        for path in (cow, backing, base_merge) if base_merge else (cow, backing):
            _check_storage(path)
        options = {"base": backing, "cow": cow}
        if base_merge and not _same_storage(backing, base_merge):
            options["base_merge"] = base_merge  # Android's <p>-base next to <p>-src: checked to be as big
        backend: SnapshotBackend = await trio.to_thread.run_sync(create, "snapshot", options)
    except (DmuserdError, OSError) as exc:
        log.error("snapuserd init failed", misc=misc, cow=cow, backing=backing, base_merge=base_merge,
                  error=str(exc))
        return "fail"
    state.handlers[misc] = Handler(misc, cow, backing, base_merge, backend, options)
    # snapuserd's GetNumSectors: the merge device's size (the backing's is checked to be the same)
    sectors = backend.view.base_size // 512
    log.info("snapuserd init", misc=misc, cow=cow, backing=backing, base_merge=base_merge, sectors=sectors)
    return f"success,{sectors}"


def _check_storage(path: str) -> None:
    """``path`` must name a regular file or a block device (not a FIFO, a directory, a socket ...).

    A client names these paths: opening a FIFO would block the opener for
    good, and snapuserd's requests are served one at a time.
    """
    from dmuserd.errors import DmuserdError

    if "\0" in path or not path:
        raise DmuserdError(f"{path!r} is not a path")
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise DmuserdError(f"cannot stat {path}: {exc.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise DmuserdError(f"{path} is neither a regular file nor a block device")


def _same_storage(a: str, b: str) -> bool:
    """Whether two paths name one file or one block device (then no separate merge device is opened)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError as exc:
        from dmuserd.errors import DmuserdError

        raise DmuserdError(f"cannot stat {exc.filename}: {exc.strerror}") from None
    if sa.st_rdev or sb.st_rdev:
        return sa.st_rdev == sb.st_rdev
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


async def _start(daemon, state: SnapuserdState, misc: str) -> str:
    from dmuserd.daemon.config import ExportSpec, TargetSpec
    from dmuserd.errors import DmuserdError

    handler = state.handlers.get(misc)
    if handler is None or handler.started:
        log.error("snapuserd start: no handler, or attached already", misc=misc)
        return "fail"
    if misc in daemon.targets:
        log.error("snapuserd start: the daemon serves a target of that name already", misc=misc)
        return "fail"
    spec = TargetSpec(misc, "snapshot", dict(handler.options), [ExportSpec("dm-user", misc, {})])
    try:
        await daemon.add_target(spec, backend=handler.backend)
    except (DmuserdError, OSError) as exc:
        # add_target closed the backend: the handler is gone, `init` again
        del state.handlers[misc]
        log.error("snapuserd start failed", misc=misc, error=str(exc))
        return "fail"
    handler.started = True
    daemon.nursery.start_soon(_watch_device, daemon, state, handler)
    _start_verification(daemon, handler)
    return "success"


async def _delete(daemon, state: SnapuserdState, misc: str) -> str:
    """snapuserd's ``delete`` (libsnapshot's WaitForDeviceDelete): answer once the device is gone.

    libsnapshot removes the dm-user table first; the export ends when the
    kernel tells its channels so, and the handler goes with it
    (:func:`_watch_device`). Until then the device is served as before:
    this waits (up to :data:`DELETE_WAIT`, without the request lock, so
    other clients are served) and answers ``fail`` if the table is still
    there, leaving the device served. A handler never started is dropped
    at once; an unknown one is ``success`` (gone already, as snapuserd).
    """
    handler = state.handlers.get(misc)
    if handler is None:
        return "success"  # snapuserd: after a merge the handler may be gone already
    if not handler.started:
        async with state.lock:
            if state.handlers.get(misc) is handler and not handler.started:
                del state.handlers[misc]
                await _close_handler(handler)
        log.info("snapuserd delete", misc=misc)
        return "success"
    with trio.move_on_after(DELETE_WAIT):
        await handler.gone.wait()
    if not handler.gone.is_set():
        log.error("snapuserd delete: the dm-user table is still there; the device stays served "
                  "(remove the table first, as libsnapshot does)", misc=misc, waited_s=DELETE_WAIT)
        return "fail"
    log.info("snapuserd delete", misc=misc)
    return "success"


async def _close_handler(handler: Handler) -> None:
    """Close a handler's backend (its verification stopped first: its reads would fail)."""
    await _stop_verification(handler)
    try:
        await handler.backend.close()
    except Exception as exc:  # noqa: BLE001 - a close that fails is logged, the handler goes anyway
        log.error("snapuserd: closing the backend failed", misc=handler.misc, error=str(exc))


async def _watch_device(daemon, state: SnapuserdState, handler: Handler) -> None:
    """Wait until ``handler``'s dm-user export ends (its table was removed), then drop the handler.

    snapuserd's RunThread: when the device goes, its merge stops (paused
    at a step boundary, durable), the target is removed and the handler
    forgotten; a merge that had completed counts in ``merge_percent``.
    """
    target = daemon.targets.get(handler.misc)
    while target is not None and "dm-user" in target.endpoints and daemon.targets.get(handler.misc) is target:
        await trio.sleep(WATCH_INTERVAL)
    await _settle_merge(handler)
    async with state.lock:
        if state.handlers.get(handler.misc) is handler:
            del state.handlers[handler.misc]
        if handler.merge is not None and handler.merge.state is MergeState.MERGED:
            state.merges_completed += 1
        await _stop_verification(handler)
        if daemon.targets.get(handler.misc) is target and target is not None:
            try:
                await daemon.remove_target(handler.misc)  # flushes and closes the backend
            except Exception as exc:  # noqa: BLE001 - the handler goes anyway
                log.error("snapuserd: removing the target failed", misc=handler.misc, error=str(exc))
    log.info("snapuserd: device gone, handler dropped", misc=handler.misc,
             merge=handler.merge.state.value if handler.merge is not None else None)
    handler.gone.set()


async def _settle_merge(handler: Handler) -> None:
    """Stop a running merge at its next step boundary (everything written committed), or a queued one."""
    handler.merge_queued = False
    merge = handler.merge
    if merge is None or merge.state not in (MergeState.MERGING, MergeState.PAUSED):
        return
    if merge.state is MergeState.MERGING:
        merge.pause()
    with trio.move_on_after(SETTLE_WAIT):
        while not merge.parked and merge.state is MergeState.PAUSED:
            await trio.sleep(WATCH_INTERVAL)
    if handler.merge_scope is not None:
        handler.merge_scope.cancel()  # its task ends (the COW says how far it got) and frees its slot


async def _stop_when_devices_gone(daemon, state: SnapuserdState) -> None:
    """snapuserd's ``stop``: the daemon ends once every started device is gone (their I/O served till then)."""
    while any(h.started for h in state.handlers.values()):
        await trio.sleep(WATCH_INTERVAL)
    async with state.lock:
        for misc, handler in list(state.handlers.items()):  # init-ed, never started: nothing serves them
            del state.handlers[misc]
            await _close_handler(handler)
    await daemon.stop()


async def _supports(daemon, state: SnapuserdState, feature: str) -> str:
    return "success" if feature in FEATURES else "fail"


async def _getstatus(daemon, state: SnapuserdState, misc: str) -> str:
    handler = state.handlers.get(misc)
    if handler is None:
        return "snapshot-merge-failed"
    if handler.merge is None:
        return "snapshot"
    if handler.merge_queued:
        return "snapshot-merge"  # accepted, waiting for a merge slot
    return _STATUS[handler.merge.state]


async def _initiate_merge(daemon, state: SnapuserdState, misc: str) -> str:
    """Queue the merge: at most ``state.merge_threads`` run (or are paused) at once, as snapuserd's MonitorMerge."""
    from dmuserd.errors import DmuserdError

    handler = state.handlers.get(misc)
    if handler is None or not handler.started:
        log.error("snapuserd initiate_merge: no attached handler", misc=misc)
        return "fail"
    merge = handler.merge
    if merge is None:
        log.error("snapuserd initiate_merge: this backend cannot merge", misc=misc)
        return "fail"
    if handler.merge_queued or merge.state in (MergeState.MERGING, MergeState.PAUSED, MergeState.MERGED):
        return "success"  # snapuserd accepts a repeated request for a merge under way
    try:
        merge.check_startable()
    except DmuserdError as exc:
        log.error("snapuserd initiate_merge failed", misc=misc, error=str(exc))
        return "fail"
    if state.merge_limiter is None:
        state.merge_limiter = trio.CapacityLimiter(max(1, state.merge_threads))
    handler.merge_queued = True
    daemon.nursery.start_soon(_run_merge, state, handler)
    log.info("snapuserd merge queued", misc=misc, merge_threads=state.merge_limiter.total_tokens)
    return "success"


async def _run_merge(state: SnapuserdState, handler: Handler) -> None:
    """One merge, in a slot of ``state.merge_limiter`` from start to its end (merged or failed)."""
    from dmuserd.errors import DmuserdError

    async with state.merge_limiter:
        if not handler.merge_queued or handler.gone.is_set():
            return  # its device went while it waited
        handler.merge_queued = False
        try:
            async with trio.open_nursery() as nursery:
                handler.merge_scope = nursery.cancel_scope
                handler.merge.start(nursery)
                log.info("snapuserd merge started", misc=handler.misc)
        except DmuserdError as exc:
            log.error("snapuserd merge could not start", misc=handler.misc, error=str(exc))


def _merge_percent(state: SnapuserdState) -> float:
    """snapuserd's GetMergePercentage: the mean over attached devices, merged-and-deleted ones at 100."""
    total = state.merges_completed * 100.0
    count = state.merges_completed
    for handler in state.handlers.values():
        if handler.started:
            total += handler.merge.percent() if handler.merge is not None else 0.0
            count += 1
    return total / count if count else 0.0


def _pause_or_resume(state: SnapuserdState, pause: bool) -> None:
    for handler in state.handlers.values():
        merge = handler.merge
        if merge is None:
            continue
        if pause and merge.state is MergeState.MERGING:
            merge.pause()
        elif not pause and merge.state is MergeState.PAUSED:
            merge.resume()


# --- update-verify ---------------------------------------------------------------


def _start_verification(daemon, handler: Handler) -> None:
    """Verify ``handler``'s device in the background, unless it resumes a merge (as snapuserd)."""
    merge = handler.merge
    if merge is not None and (merge.state is not MergeState.NOT_STARTED or merge.merged_ops):
        handler.verify = "skipped"
        handler.verify_done.set()
        log.info("snapuserd: merge resumed, update verification not run", misc=handler.misc)
        return
    handler.verify = "running"
    handler.verify_scope = trio.CancelScope()
    daemon.nursery.start_soon(_verify, handler)


async def _verify(handler: Handler) -> None:
    """Read every block of the snapshot device (see the module doc); the outcome is ``handler.verify``."""
    backend = handler.backend
    size = backend.size
    started = trio.current_time()

    async def reader(first: int) -> None:
        for offset in range(first * VERIFY_PIECE, size, VERIFY_READERS * VERIFY_PIECE):
            length = min(VERIFY_PIECE, size - offset)
            try:
                await backend.read(offset, length)
            except Exception as exc:  # noqa: BLE001 - any failed read fails the verification, and says why
                raise _VerifyFailed(f"read of {length} bytes at {offset} failed: {exc}") from None
            handler.verified_bytes += length

    try:
        with handler.verify_scope:
            async with trio.open_nursery() as nursery:
                for first in range(VERIFY_READERS):
                    nursery.start_soon(reader, first)
            await _check_hashtree(handler)
            handler.verify = "success"
            log.info("snapuserd: update verification passed", misc=handler.misc, bytes=size,
                     seconds=round(trio.current_time() - started, 3))
        if handler.verify == "running":  # cancelled: the handler was deleted
            handler.verify, handler.verify_error = "failed", "the handler was deleted during the verification"
    except* _VerifyFailed as group:
        handler.verify, handler.verify_error = "failed", str(group.exceptions[0])
        log.error("snapuserd: update verification failed", misc=handler.misc, error=handler.verify_error)
    finally:
        handler.verify_done.set()


class _VerifyFailed(Exception):
    """A read of the verification failed, or the data is not what its hash tree says (the message says which)."""


class _VerifyStopped(Exception):
    """The hash tree check was told to stop (its handler goes)."""


async def _stop_verification(handler: Handler) -> None:
    """Stop a verification under way and wait for its reads to end (before the backend is closed)."""
    if handler.verify_scope is None:
        return
    handler.verify_scope.cancel()
    handler.verify_stop.set()
    with trio.move_on_after(SETTLE_WAIT):
        await handler.verify_done.wait()


async def _check_hashtree(handler: Handler) -> None:
    """Where the partition carries an AVB hashtree, check the data read through the snapshot against it.

    On a device dm-verity sits above the snapshot and checks every read; the
    verification reads the snapshot directly, so it checks the tree here
    (:mod:`dmuserd.snapshot._avb_hashtree`). A descriptor of a kind not
    checked is logged and passes; damage or a mismatch fails.
    """
    from dmuserd.snapshot._avb_hashtree import AvbError, HashtreeUnsupported, check_hashtree, find_hashtree

    view = getattr(handler.backend, "view", None)
    if view is None:
        return
    size = handler.backend.size

    def read(offset: int, length: int) -> bytes:
        if handler.verify_stop.is_set():
            raise _VerifyStopped()
        return view.read(offset, length)

    def check() -> str:
        tree = find_hashtree(read, size)
        if tree is None:
            return "none"
        check_hashtree(tree, read, size)
        return "matched"

    try:
        handler.hashtree = await trio.to_thread.run_sync(check)
    except _VerifyStopped:
        raise _VerifyFailed("the handler was deleted during the verification") from None
    except HashtreeUnsupported as exc:
        handler.hashtree = f"not checked: {exc}"
        log.warning("snapuserd: hashtree not checked", misc=handler.misc, why=str(exc))
    except (AvbError, OSError) as exc:
        raise _VerifyFailed(f"dm-verity: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a broken COW read while hashing fails the verification
        raise _VerifyFailed(f"dm-verity: reading the data failed: {exc}") from None


async def _update_verify(state: SnapuserdState) -> str:
    """snapuserd's GetVerificationStatus: every handler started and verified (see the module doc)."""
    handlers = list(state.handlers.values())
    for handler in handlers:
        if not handler.started:
            log.error("snapuserd update-verify: a handler is not started", misc=handler.misc)
            return "fail"
    with trio.move_on_after(VERIFY_WAIT):
        for handler in handlers:
            await handler.verify_done.wait()
    for handler in handlers:
        if handler.verify != "success":
            why = {"running": f"not done in {VERIFY_WAIT:g} s",
                   "skipped": "not verified: its merge was resumed"}.get(handler.verify, handler.verify_error)
            log.error("snapuserd update-verify: fail", misc=handler.misc, verify=handler.verify, why=why)
            return "fail"
    return "success"


def status_of(daemon) -> dict | None:
    """The snapuserd handlers of ``daemon`` for ``dmuserd status`` (None when no client ever came)."""
    state = _STATES.get(daemon)
    if state is None:
        return None
    return {
        "terminating": state.terminating,
        "merges_completed": state.merges_completed,
        "merge_threads": state.merge_threads,
        "handlers": {
            name: {
                "cow": h.cow, "backing": h.backing, "base_merge": h.base_merge, "started": h.started,
                "merge": ("queued" if h.merge_queued else h.merge.state.value) if h.merge is not None else None,
                "verify": {"state": h.verify, "bytes": h.verified_bytes, "of": h.backend.size,
                           "hashtree": h.hashtree, "error": h.verify_error},
            }
            for name, h in state.handlers.items()
        },
    }
