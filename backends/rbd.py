"""``rbd``: an image on a Ceph cluster, through librbd.

``--backend rbd:pool=P,image=I[,conf=/etc/ceph/ceph.conf][,id=admin][,create=SIZE][,readonly=1][,timeout=30][,connect_timeout=15]``

* Every request is one of librbd's asynchronous calls (``rbd_aio_read``,
  ``rbd_aio_write``, ``rbd_aio_flush``, ``rbd_aio_discard``,
  ``rbd_aio_write_zeroes``), made from the event loop in one C call each
  (the ``_rbd_native`` extension, see :mod:`._librbd`). Completions are not callbacks: librbd signals an
  eventfd, and one task of the event loop collects every finished request
  in a batch (``rbd_poll_io_events``) and wakes its waiting task. No thread
  per request, no polling, and no Python on librbd's threads (the
  ``python3-rbd`` binding runs its completion callback there, which takes
  the GIL from the event loop once per request: about half of this
  backend's throughput on a busy machine).
* ``timeout`` (seconds, default 30): a request the cluster has not answered
  by then fails with EIO (:class:`RbdTimeout`) and the daemon goes on. The
  request itself stays queued in librbd, which reconnects by itself when the
  monitors and OSDs come back and then completes it (a write that timed out
  may still land then, as on any block device whose request timed out; the
  buffers stay alive until then). Requests made after the cluster is back
  succeed again.
* A FUA write is a write followed by a flush; ``flush`` is ``aio_flush``
  (librbd's cache, where enabled, is written back to the OSDs).
* ``connect_timeout`` (seconds, default 15; Ceph counts it in whole
  seconds) bounds start-up: reaching the monitors, opening the pool and the
  image; a dead cluster fails start-up.
* ``create=SIZE`` creates the image with that size when it does not exist
  (an existing image is used as it is); ``readonly=1`` opens it read-only.
* ``conf`` is a ceph.conf (default ``/etc/ceph/ceph.conf``), ``id`` the
  client name without ``client.`` (default ``admin``); the keyring is found
  through the conf as by the ``rbd`` command. librbd settings (``rbd cache``
  and the like) are read from the conf's ``[client]`` section.
* ``dmuserd status`` shows the cluster (fsid and monitors), pool, image,
  requests in flight, timeouts and each operation's latency.

The libraries are Debian's ``librados2`` and ``librbd1`` (installed with
``ceph-common``); ``scripts/ceph-dev start`` runs a local cluster to try it on.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import outcome
import structlog
import trio

from dmuserd.backends._api import Backend, BackendError, Op
from dmuserd.backends._librbd import CephError, Cluster, Image, Pool, Queue
from dmuserd.backends.options import Options

if TYPE_CHECKING:
    from typing_extensions import Buffer

DEFAULT_CONF = "/etc/ceph/ceph.conf"
DEFAULT_TIMEOUT = 30.0
CONNECT_TIMEOUT = 15  # seconds: reaching the monitors at start-up
#: librbd settings of this backend's own (a ``[client]`` section of the conf overrides them).
#: ``rbd_non_blocking_aio``: librbd dispatches a request in the submitting thread instead of
#: handing it to its work queue thread: one thread wake-up less per request (about a third of
#: the backend's CPU per 4 KiB read). Dispatching never waits on the cluster (librbd's write
#: cache defers, it does not block); the one place that could wait is the objecter's budget
#: of operations in flight, which :data:`HELD_OPS` and :data:`HELD_BYTES` keep us under.
LIBRBD_DEFAULTS = {"rbd_non_blocking_aio": "false"}
#: At most this many object operations (estimated) and bytes in librbd at once, counting
#: requests that timed out and are still queued there; more wait (up to ``timeout``). Half of
#: the objecter's own limits (objecter_inflight_ops 1024, objecter_inflight_op_bytes 100M),
#: past which a submit would block the event loop.
HELD_OPS = 512
HELD_BYTES = 48 << 20
#: :meth:`RbdBackend.readinto` reads into a buffer of its own, reused for reads of the same size
#: from this size up (a new 1 MiB bytearray is zeroed, and often page-faulted, first: about a
#: fifth of the event loop thread's CPU per 1 MiB read, ~60 us); at most REUSE_BYTES of them are
#: kept, all sizes together (a client's mix of sizes cannot grow it).
REUSE_MIN = 64 << 10
REUSE_BYTES = 32 << 20

log = structlog.get_logger("dmuserd.backends.rbd")


class RbdTimeout(OSError):
    """The cluster did not answer a request in time (EIO to the client)."""

    def __init__(self, what: str, timeout: float, target: str) -> None:
        super().__init__(
            errno.EIO,
            f"rbd {target}: {what} not answered within {timeout:g}s; the cluster is unreachable or "
            f"an OSD is down (check `ceph -s`); the request stays queued in librbd and completes "
            f"when the cluster is back",
        )


def _seconds(opts: Options, key: str, default: float) -> float:
    text = opts.str(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise BackendError(f"backend 'rbd': {key}={text} is not a positive number of seconds")
    return value


class _Latency:
    """Count, mean and maximum of one operation's latency."""

    __slots__ = ("count", "total", "max")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def describe(self) -> dict[str, float]:
        mean = self.total / self.count if self.count else 0.0
        return {"count": self.count, "mean_ms": round(mean * 1e3, 3), "max_ms": round(self.max * 1e3, 3)}


class _Request:
    """A submitted request: the task waiting for it, what librbd still reads or
    writes (kept alive until the completion is collected, even after the task
    gave up), its share of the budget (object operations, bytes), what it is
    and when it was submitted (trio's clock)."""

    __slots__ = ("task", "keep", "ops", "nbytes", "what", "began")

    def __init__(self, task: Any, keep: object, ops: int, nbytes: int, what: str, began: float) -> None:
        self.task = task
        self.keep = keep
        self.ops = ops
        self.nbytes = nbytes
        self.what = what
        self.began = began


class RbdBackend(Backend):
    name = "rbd"

    def __init__(
        self,
        pool: str,
        image: str,
        *,
        conf: str = DEFAULT_CONF,
        client_id: str = "admin",
        create: int | None = None,
        readonly: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.pool, self.image_name, self.conf, self.client_id = pool, image, conf, client_id
        self.readonly, self.timeout, self.connect_timeout = readonly, timeout, connect_timeout
        self.target = f"{pool}/{image}"
        if not os.path.exists(conf):
            raise BackendError(f"backend 'rbd': no Ceph configuration at {conf}; pass conf=PATH (scripts/ceph-dev start prints one)")
        self._cluster: Cluster | None = None
        self._ioctx: Pool | None = None
        self._image: Image | None = None
        try:
            size = self._open(create)
            if size % 512:
                raise BackendError(f"backend 'rbd': image {self.target} is {size} bytes, not a multiple of 512; resize it (rbd resize)")
            disabled: set[Op] = {Op.WRITE, Op.DISCARD, Op.WRITE_ZEROES} if readonly else set()
            super().__init__(size=size, block_size=512, disabled_ops=disabled)
        except BaseException:
            self._close_sync()
            raise
        self._latency = {op: _Latency() for op in ("read", "write", "flush", "discard", "write_zeroes")}
        self._timeouts = 0
        #: completion key -> request, in the order submitted (so the first is the next to time out)
        self._waiting: dict[int, _Request] = {}
        #: requests whose task gave up (timed out, cancelled) that librbd has not completed yet
        self._abandoned: dict[int, _Request] = {}
        self._reaper_wait: trio.CancelScope | None = None  # what the collector waits in (see _reap)
        self._next_key = 1
        self._reaper_token: trio.lowlevel.TrioToken | None = None  # the run whose task collects completions
        self._reaper_scope: trio.CancelScope | None = None
        self._now: Callable[[], float] = trio.current_time  # the reaper's run's clock, read without trio's wrappers
        self._held_ops = self._held_bytes = 0  # what librbd holds of ours (see HELD_OPS)
        self._room: trio.Event | None = None  # set when the held budget shrinks, for requests waiting
        self._spare: dict[int, list[bytearray]] = {}  # readinto's buffers, by size (REUSE_MIN)
        self._spare_bytes = 0  # their sum

    def _open(self, create: int | None) -> int:
        """Connect, open the pool and the image (created first with ``create`` bytes); returns its size."""
        whole = max(1, round(self.connect_timeout))
        try:
            self._cluster = Cluster(self.conf, self.client_id, whole, LIBRBD_DEFAULTS)
        except OSError as exc:
            raise BackendError(
                f"backend 'rbd': cannot connect to the cluster of {self.conf} as client.{self.client_id} "
                f"within {self.connect_timeout:g}s ({exc}); is it running (ceph --conf {self.conf} -s)?"
            ) from None
        try:
            self._ioctx = self._cluster.open_pool(self.pool)
        except CephError as exc:
            if exc.errno != errno.ENOENT:
                raise BackendError(f"backend 'rbd': cannot open pool {self.pool!r}: {exc}") from None
            pools = ", ".join(self._cluster.pools()) or "none"
            raise BackendError(
                f"backend 'rbd': no pool {self.pool!r} in the cluster of {self.conf} (pools: {pools}); "
                f"create it: ceph osd pool create {self.pool} && rbd pool init {self.pool}"
            ) from None
        if create is not None and not self.readonly:
            try:
                self._ioctx.create_image(self.image_name, create)
            except CephError as exc:
                if exc.errno != errno.EEXIST:
                    raise BackendError(f"backend 'rbd': cannot create image {self.target} of {create} bytes: {exc}") from None
        try:
            self._image = self._ioctx.open_image(self.image_name, readonly=self.readonly)
        except CephError as exc:
            if exc.errno == errno.ENOENT:
                raise BackendError(
                    f"backend 'rbd': no image {self.image_name!r} in pool {self.pool!r}; create it "
                    f"(rbd create --size 1G {self.target}) or pass create=SIZE"
                ) from None
            raise BackendError(f"backend 'rbd': cannot open image {self.target}: {exc}") from None
        self.fsid = self._cluster.fsid
        self.mon_host = self._cluster.conf_get("mon_host")
        return self._image.size

    @classmethod
    def from_options(cls, options: dict[str, str]) -> RbdBackend:
        opts = Options(cls.name, options)
        pool = opts.str("pool", required=True)
        image = opts.str("image", required=True)
        conf = opts.str("conf", DEFAULT_CONF)
        client_id = opts.str("id", "admin")
        create = opts.size("create")
        readonly = opts.bool("readonly")
        timeout = _seconds(opts, "timeout", DEFAULT_TIMEOUT)
        connect_timeout = _seconds(opts, "connect_timeout", CONNECT_TIMEOUT)
        opts.finish()
        if client_id.startswith("client."):
            client_id = client_id[len("client."):]
        return cls(pool, image, conf=conf, client_id=client_id, create=create, readonly=readonly, timeout=timeout,
                   connect_timeout=connect_timeout)

    # -- one asynchronous librbd call ------------------------------------------

    async def _aio(self, what: str, submit: Callable[..., int], args: tuple[Any, ...], keep: object = None,
                   offset: int = 0, length: int = 0) -> int:
        """Submit one request (``submit(image.io, key, *args)``, a ``Queue`` method) and wait for it.

        Returns librbd's return value (>= 0); raises :class:`RbdTimeout` when
        the collector (:meth:`_reap`) gives up on it. ``keep`` is what librbd
        reads or writes: held until the completion is collected, even after a
        timeout. ``offset``, ``length``: the range it moves data of (its share
        of the budget of :data:`HELD_BYTES`).
        """
        image = self._image
        if image is None:
            raise OSError(errno.EIO, f"rbd {self.target}: the image is closed")
        if self._reaper_token is not trio.lowlevel.current_trio_token():
            self._start_reaper(image)
        obj = image.object_size
        ops = (offset + length - 1) // obj - offset // obj + 1 if length else 1
        if (self._held_ops + ops > HELD_OPS or self._held_bytes + length > HELD_BYTES) and self._held_ops:
            await self._wait_for_room(what, ops, length)
            image = self._image
            if image is None:
                raise OSError(errno.EIO, f"rbd {self.target}: the image is closed")
        key = self._next_key
        self._next_key = key + 1
        submitted = submit(image.io, key, *args)
        if submitted < 0:
            raise OSError(-submitted, f"rbd {self.target}: {what}: {os.strerror(-submitted)}")
        request = _Request(trio.lowlevel.current_task(), keep, ops, length, what, self._now())
        self._waiting[key] = request
        self._held_ops += ops
        self._held_bytes += length
        wait = self._reaper_wait
        if wait is not None and wait.deadline == math.inf:  # nothing was waiting: this is the first deadline
            wait.deadline = request.began + self.timeout

        def abandon(_: Any) -> trio.lowlevel.Abort:  # cancelled from outside (the daemon stops)
            self._abandon(key, request)
            return trio.lowlevel.Abort.SUCCEEDED

        ret: int = await trio.lowlevel.wait_task_rescheduled(abandon)  # the collector records the latency
        if ret < 0:
            raise OSError(-ret, f"rbd {self.target}: {what}: {os.strerror(-ret)}")
        return ret

    async def _wait_for_room(self, what: str, ops: int, nbytes: int) -> None:
        """Wait (up to ``timeout``) until librbd holds little enough of ours to take this request."""
        with trio.move_on_after(self.timeout) as scope:
            while self._held_ops and (self._held_ops + ops > HELD_OPS or self._held_bytes + nbytes > HELD_BYTES):
                if self._room is None:
                    self._room = trio.Event()
                await self._room.wait()
        if scope.cancelled_caught:
            self._timeouts += 1
            raise RbdTimeout(f"{what} (waiting behind {self._held_ops} queued operations)", self.timeout, self.target)

    def _abandon(self, key: int, request: _Request) -> None:
        """Its task no longer waits: the request stays held until librbd completes it."""
        del self._waiting[key]
        self._abandoned[key] = request
        request.task = None

    def _start_reaper(self, image: Image) -> None:
        """Start the task that collects completions, once per trio run."""
        self._reaper_token = trio.lowlevel.current_trio_token()
        self._now = trio.lowlevel.current_clock().current_time
        self._reaper_scope = trio.CancelScope()
        self._reaper_wait = None  # a previous run's, if any: its own run sets it
        trio.lowlevel.spawn_system_task(self._reap, image, self._reaper_scope, name=f"rbd {self.target} completions")

    async def _reap(self, image: Image, scope: trio.CancelScope) -> None:
        """Collect completions and wake their tasks; fail requests older than ``timeout``.

        Waits for the eventfd in one cancel scope (:attr:`_reaper_wait`)
        whose deadline is the oldest waiting request's as it was when the
        scope was made, or the first request's (set by :meth:`_aio`) when
        nothing was waiting then: requests are kept in the order submitted,
        so that deadline is never later than the oldest one now, and no
        request needs a timer of its own. When it passes, the requests whose
        time is up fail and a new scope takes the oldest remaining one's.
        A scope per wake-up instead cost ~13 us each (trio's move_on_at,
        measured here), a deadline set per wake-up ~5 us.
        """
        waiting, abandoned, latency, now = self._waiting, self._abandoned, self._latency, self._now
        reschedule, Value = trio.lowlevel.reschedule, outcome.Value  # noqa: N806
        with scope:
            try:
                while True:
                    oldest = next(iter(waiting.values()), None)
                    with trio.CancelScope(deadline=math.inf if oldest is None else oldest.began + self.timeout) as wait:
                        self._reaper_wait = wait
                        while True:
                            await trio.lowlevel.wait_readable(image.eventfd)
                            done, finished = image.io.reap(), now()
                            for key, ret in done:
                                request = waiting.pop(key, None)
                                if request is not None:
                                    reschedule(request.task, Value(ret))
                                    latency[request.what].add(finished - request.began)
                                else:
                                    request = abandoned.pop(key, None)
                                    if request is None:
                                        continue
                                self._held_ops -= request.ops
                                self._held_bytes -= request.nbytes
                            if self._room is not None:
                                self._room.set()
                                self._room = None
                    self._reaper_wait = None
                    self._expire()
            except trio.ClosedResourceError:
                return  # close() is closing the image
            except Exception as exc:  # noqa: BLE001 - a system task must not raise: fail what waits instead
                log.exception("rbd completion collector failed", target=self.target)
                self._reaper_token = None  # the next request starts another
                self._fail_waiting(OSError(errno.EIO, f"rbd {self.target}: collecting completions failed: {exc!r}"))
            finally:
                self._reaper_wait = None

    def _expire(self) -> None:
        """Fail the waiting requests submitted ``timeout`` ago or earlier with :class:`RbdTimeout`."""
        late = self._now() - self.timeout
        expired = []
        for key, request in self._waiting.items():
            if request.began > late:
                break
            expired.append((key, request))
        for key, request in expired:
            task = request.task
            self._abandon(key, request)
            self._timeouts += 1
            trio.lowlevel.reschedule(task, outcome.Error(RbdTimeout(request.what, self.timeout, self.target)))

    def _fail_waiting(self, error: OSError) -> None:
        for key, request in list(self._waiting.items()):
            task = request.task
            self._abandon(key, request)
            trio.lowlevel.reschedule(task, outcome.Error(error))

    # -- block operations ----------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytearray:
        data = bytearray(length)
        await self._fill(offset, data)
        return data

    async def readinto(self, offset: int, buffer: memoryview) -> None:
        """Read into a buffer of this backend's (reused, see :data:`REUSE_MIN`), then copy into ``buffer``.

        Never into ``buffer`` itself: a request that timed out stays queued in
        librbd, which would fill ``buffer`` whenever the cluster answers, after
        the caller reused it (the NBD export's slots and reply buffers are).
        """
        length = len(buffer)
        spare = self._spare.get(length) if length >= REUSE_MIN else None
        if spare:
            data = spare.pop()
            self._spare_bytes -= length
        else:
            data = bytearray(length)
        await self._fill(offset, data)  # raised: librbd may still fill data, which is then never reused
        buffer[:] = data
        if length >= REUSE_MIN and self._spare_bytes + length <= REUSE_BYTES:
            self._spare.setdefault(length, []).append(data)
            self._spare_bytes += length

    async def _fill(self, offset: int, data: bytearray) -> None:
        """Fill all of ``data`` with the image's bytes at ``offset``, or raise."""
        length = len(data)
        got = await self._aio("read", Queue.read, (offset, data), data, offset, length)
        if got != length:
            raise OSError(errno.EIO, f"rbd {self.target}: read of {length} bytes at {offset} returned {got}")

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        payload = data if type(data) is bytes else bytes(data)  # noqa: E721 - immutable while librbd reads it
        length = len(payload)
        await self._aio("write", Queue.write, (offset, payload), payload, offset, length)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        await self._aio("flush", Queue.flush, ())

    async def discard(self, offset: int, length: int) -> None:
        await self._aio("discard", Queue.discard, (offset, length))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        # librbd deallocates whole objects it zeroes unless told otherwise;
        # either way the range reads back as zeros.
        await self._aio("write_zeroes", Queue.write_zeroes, (offset, length))

    async def close(self) -> None:
        image, self._image = self._image, None
        if image is None:
            return
        if self._reaper_scope is not None:
            self._reaper_scope.cancel()
            trio.lowlevel.notify_closing(image.eventfd)
        # rbd_close waits for what librbd still holds; with the cluster gone it
        # may never return, so it runs in a thread we can abandon.
        with trio.move_on_after(self.timeout):
            await trio.to_thread.run_sync(self._shutdown, image, abandon_on_cancel=True)
        self._fail_waiting(OSError(errno.EIO, f"rbd {self.target}: the image was closed"))

    def _shutdown(self, image: Image) -> None:
        try:
            image.close()
        finally:
            self._close_sync()

    def _close_sync(self) -> None:
        for obj in (self._image, self._ioctx, self._cluster):
            if obj is not None:
                with contextlib.suppress(OSError):  # the eventfd's close: nothing more to do about it
                    obj.close()
        self._image = self._ioctx = self._cluster = None

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "cluster": {"fsid": getattr(self, "fsid", None), "mon_host": getattr(self, "mon_host", None), "conf": self.conf},
            "pool": self.pool,
            "image": self.image_name,
            "client": f"client.{self.client_id}",
            "readonly": self.readonly,
            "timeout_s": self.timeout,
            "librbd_in_flight": len(self._waiting),
            "timeouts": self._timeouts,
            "timed_out_still_queued": len(self._abandoned),
            "librbd_held_ops": self._held_ops,
            "librbd_held_bytes": self._held_bytes,
            "latency": {op: lat.describe() for op, lat in self._latency.items() if lat.count},
            "summary": self._summary(),
        }

    def _summary(self) -> str:
        """One line for ``dmuserd status``."""
        lat = ", ".join(
            f"{op} {lat.describe()['mean_ms']}/{lat.describe()['max_ms']} ms" for op, lat in self._latency.items() if lat.count
        )
        return (f"rbd {self.target} on cluster {getattr(self, 'fsid', '?')} ({getattr(self, 'mon_host', '?')}); "
                f"timeouts {self._timeouts}; latency mean/max: {lat or 'no requests yet'}")
