"""``--export ublk[:ID][,queues=N][,depth=D][,recovery=1]``: a real ``/dev/ublkbN``.

ublk (Linux 6.0+, ``CONFIG_BLK_DEV_UBLK``) is a multi-queue block device
whose requests are served by a process through io_uring. This export
creates the device (ADD_DEV, SET_PARAMS with the backend's geometry), arms
every tag of every queue (:class:`~dmuserd.daemon.ublk.queue.Queue`) and
starts it (START_DEV); :meth:`UblkExport.start` returns once
``/dev/ublkbN`` exists. ``ID`` is the device number (``auto``, or left out:
the kernel picks a free one). An ID held by a running daemon is refused; one left by a
daemon that died without recovery (the kernel stopped that device and
failed its I/O) is removed and made again.

Block parameters come from the backend: logical = physical = minimum I/O
size = its block size (512 to 4096), read-only when it takes no writes, a
volatile write cache with FUA when it takes writes and flushes, discard and write-zeroes
limits where it has those operations; the largest request is the tag
buffer (512 KiB). They show in ``/sys/block/ublkbN/queue/``.

Stop: STOP_DEV as soon as a stop is under way (:meth:`stop_admitting`:
the disk goes, what is still in flight is answered), then DEL_DEV once the
daemon's rings and mappings are closed.

``recovery=1`` (``UBLK_F_USER_RECOVERY`` + ``UBLK_F_USER_RECOVERY_REISSUE``):
the device outlives its daemon. When the daemon dies (kill -9, a crash, or
a stop: a recovering device is never deleted by its daemon), the kernel
quiesces the device within its 5 s check; I/O waits. The next daemon
started with the same ``ublk:ID,recovery=1`` takes it over
(START_USER_RECOVERY, fetch, END_USER_RECOVERY) and the waiting I/O goes on.
Reissue policy: a request the dead daemon had taken but not answered is
issued again to the new daemon. Block reads, writes, flushes, discards and
write-zeroes are idempotent, so running one twice gives the same result;
nothing is acknowledged before the backend did it (FUA and flush as usual),
so nothing acknowledged is lost. The device is only taken over when its
size and block size match the backend; its queues and depth are the
device's. A kept device is removed by ``dmuserd ublk del ID``
(:mod:`~dmuserd.daemon.ublk.devices`) or at reboot.
"""

from __future__ import annotations

import errno
import os

import structlog
import trio

from dmuserd.backends import Op
from dmuserd.backends.options import Options
from dmuserd.daemon.config import ConfigError, ExportSpec
from dmuserd.daemon.export import Export, Host
from dmuserd.daemon.ublk import uapi
from dmuserd.daemon.ublk.control import Control
from dmuserd.daemon.ublk.devices import alive
from dmuserd.daemon.ublk.errors import UblkError
from dmuserd.daemon.ublk.queue import Queue
from dmuserd.protocol import SECTOR_SIZE

log = structlog.get_logger("dmuserd.ublk")

#: Each tag's buffer: the largest request the kernel sends.
BUFFER_SIZE = 512 * 1024
DEFAULT_QUEUES = 1
DEFAULT_DEPTH = 64
#: How long a new daemon waits for the kernel to give up on the old one (its check runs every 5 s).
RECOVERY_WAIT_SECONDS = 30.0
#: How long a stop waits for STOP_DEV and DEL_DEV.
STOP_SECONDS = 10.0
#: The largest discard / write-zeroes request (the kernel splits bigger ones).
MAX_DISCARD_SECTORS = (1 << 30) // SECTOR_SIZE
_MAX_ID = (1 << 20) - 1
NO_UBLK = (f"this kernel has no ublk ({uapi.CONTROL_PATH} does not exist: it needs Linux 6.0+ with "
           "CONFIG_BLK_DEV_UBLK, e.g. `modprobe ublk_drv`); serve the target with --export nbd:SOCKET "
           "or --export fuse:DIR instead")


def check_kernel() -> None:
    """:class:`ConfigError` (one line naming the alternatives) when the kernel has no ublk."""
    if not os.path.exists(uapi.CONTROL_PATH):
        raise ConfigError(NO_UBLK)


def params_for(backend, buffer_size: int = BUFFER_SIZE) -> uapi.Params:
    """The block queue parameters that describe ``backend``."""
    block = backend.block_size
    if not 512 <= block <= 4096:
        raise ConfigError(f"a ublk device has a block size of 512 to 4096 bytes; the backend's is {block}")
    shift = block.bit_length() - 1
    attrs = 0
    if not backend.supports(Op.WRITE):
        attrs |= uapi.Attr.READ_ONLY
    elif backend.supports(Op.FLUSH):  # a cache to flush only where writes go
        attrs |= uapi.Attr.VOLATILE_CACHE | uapi.Attr.FUA
    discard = backend.supports(Op.DISCARD)
    zeroes = backend.supports(Op.WRITE_ZEROES)
    return uapi.Params(
        dev_sectors=backend.size // SECTOR_SIZE, logical_bs_shift=shift, physical_bs_shift=shift,
        io_min_shift=shift, io_opt_shift=shift, max_sectors=buffer_size // SECTOR_SIZE, attrs=attrs,
        discard_granularity=block if discard or zeroes else 0,
        max_discard_sectors=MAX_DISCARD_SECTORS if discard else 0,
        max_write_zeroes_sectors=MAX_DISCARD_SECTORS if zeroes else 0,
    )


class UblkExport(Export):
    """A ublk block device served from the target's dispatcher (see the module doc)."""

    kind = "ublk"
    where_default = "auto"

    def __init__(self, spec: ExportSpec, host: Host) -> None:
        super().__init__(spec, host)
        self.dev_id: int | None = None
        self.queues_wanted = DEFAULT_QUEUES
        self.depth_wanted = DEFAULT_DEPTH
        self.recovery = False
        self.info: uapi.DevInfo | None = None
        self.queues: list[Queue] = []
        self.recovered = False
        self._control: Control | None = None
        self._char_fd: int | None = None
        self._stop_uid: int | None = None
        self._state = "new"
        self._serve_scope: trio.CancelScope | None = None
        self._served = trio.Event()

    @classmethod
    def from_spec(cls, spec: ExportSpec, host: Host) -> UblkExport:
        opts = Options(str(spec), spec.options, kind="export", error=ConfigError)
        export = cls(spec, host)
        export.queues_wanted = opts.int("queues", DEFAULT_QUEUES, min=1, max=256)
        export.depth_wanted = opts.int("depth", DEFAULT_DEPTH, min=1, max=uapi.MAX_QUEUE_DEPTH)
        export.recovery = opts.bool("recovery", False)
        opts.finish("queues=N, depth=D, recovery=1")
        where = spec.where.strip()
        if where not in ("", "auto"):
            try:
                export.dev_id = int(where)
            except ValueError:
                export.dev_id = -1
            if not 0 <= export.dev_id <= _MAX_ID:
                raise ConfigError(f"export {str(spec)!r}: the ublk device ID is a number 0 to {_MAX_ID}, "
                                  f"or auto (got {where!r})")
        if export.recovery and export.dev_id is None:
            raise ConfigError(f"export {str(spec)!r}: recovery=1 needs a device ID (ublk:0,recovery=1): "
                              "the next daemon finds the device by it")
        check_kernel()
        return export

    @property
    def device(self) -> str | None:
        return uapi.BLOCK_PATH.format(self.info.dev_id) if self.info is not None else None

    async def start(self, target, nursery: trio.Nursery) -> str:
        params = params_for(target.backend)
        self._control = control = Control()
        try:
            existing = await control.info(self.dev_id) if self.dev_id is not None else None
            if existing is not None and not alive(existing.ublksrv_pid) and (
                    existing.state == uapi.DevState.DEAD or not existing.flags & uapi.Feature.USER_RECOVERY):
                existing = await self._remove_leftover(existing)
            if existing is not None and self.recovery and existing.flags & uapi.Feature.USER_RECOVERY:
                await self._take_over(existing, params, target, nursery)
            else:
                await self._create(params, target, nursery)
        except BaseException:
            with trio.CancelScope(shield=True):
                if self._serve_scope is not None:  # its end stops (or keeps) the device
                    self._serve_scope.cancel()
                    await self._served.wait()
                else:
                    await self._shutdown()
            raise
        self.endpoint = self.device
        return self.endpoint

    async def _remove_leftover(self, dead: uapi.DevInfo) -> uapi.DevInfo | None:
        """DEL_DEV a device whose daemon died without recovery, once the kernel stopped it (its 5 s check)."""
        control, dev_id = self._control, dead.dev_id
        with trio.move_on_after(RECOVERY_WAIT_SECONDS):
            while dead is not None and dead.state != uapi.DevState.DEAD:
                await trio.sleep(0.2)
                dead = await control.info(dev_id)
        if dead is None or dead.state != uapi.DevState.DEAD:
            return dead  # gone meanwhile, or still live: ADD_DEV says what is wrong
        log.warning("removing a stopped ublk device left by a daemon that is gone", device_id=dev_id)
        await control.delete(dev_id, STOP_SECONDS)
        return None

    async def _create(self, params: uapi.Params, target, nursery: trio.Nursery) -> None:
        control = self._control
        flags = uapi.Feature.USER_RECOVERY | uapi.Feature.USER_RECOVERY_REISSUE if self.recovery else 0
        wanted = uapi.DevInfo(self.queues_wanted, self.depth_wanted, BUFFER_SIZE,
                              self.dev_id if self.dev_id is not None else uapi.ANY_ID, flags,
                              ublksrv_pid=os.getpid())  # until START_DEV, how others tell it is being set up
        try:
            self.info = await control.add(wanted)
        except UblkError as exc:
            if exc.errno != errno.EEXIST:
                raise
            other = await control.info(self.dev_id)
            who = (f"served by pid {other.ublksrv_pid}, state {uapi.DevState(other.state).name.lower()}"
                   if other is not None else "just taken")
            raise UblkError(f"ublk device {self.dev_id} exists already ({who}): choose another ID or "
                            "ublk:auto" + ("" if self.recovery else ", or recovery=1 to take over a device "
                                           "made with recovery=1"), errno=errno.EEXIST) from None
        self._state = "added"
        if self.info.nr_hw_queues != self.queues_wanted:
            log.warning("the kernel gave fewer ublk queues than asked (one per CPU at most)",
                        asked=self.queues_wanted, queues=self.info.nr_hw_queues)
        await control.set_params(self.info.dev_id, params)
        await self._open_queues(target, nursery)
        await control.command(uapi.Cmd.START_DEV, self.info.dev_id, data0=os.getpid())
        self._state = "serving"
        log.info("ublk device started", device=self.device, queues=len(self.queues), depth=self.info.queue_depth,
                 recovery=self.recovery, target=target.name)

    async def _take_over(self, existing: uapi.DevInfo, params: uapi.Params, target, nursery: trio.Nursery) -> None:
        """Recover a device whose daemon is gone (``recovery=1``)."""
        control = self._control
        dev_id = existing.dev_id
        self._state = "recovering"  # from here on, a failure leaves the device to the next try
        if existing.state == uapi.DevState.LIVE and existing.ublksrv_pid != os.getpid() \
                and alive(existing.ublksrv_pid):
            raise UblkError(f"ublk device {dev_id} is served by pid {existing.ublksrv_pid}, which runs: "
                            "stop that daemon first, or choose another ID", errno=errno.EBUSY)
        theirs = await control.params(dev_id)
        if (theirs.dev_sectors, theirs.logical_bs_shift) != (params.dev_sectors, params.logical_bs_shift):
            raise UblkError(f"ublk device {dev_id} has {theirs.dev_sectors} sectors of "
                            f"{1 << theirs.logical_bs_shift} bytes; this backend needs {params.dev_sectors} of "
                            f"{1 << params.logical_bs_shift}: not taken over", errno=errno.EINVAL)
        with trio.move_on_after(RECOVERY_WAIT_SECONDS):
            while True:
                try:
                    await control.command(uapi.Cmd.START_USER_RECOVERY, dev_id)
                    break
                except UblkError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                await trio.sleep(0.2)  # the kernel has not let go of the old daemon yet
        self.info = await control.info(dev_id)
        if self.info is None or self.info.state != uapi.DevState.QUIESCED:
            raise UblkError(f"ublk device {dev_id} could not be taken over within {RECOVERY_WAIT_SECONDS:.0f} s "
                            f"(state {existing.state}, its daemon pid {existing.ublksrv_pid})", errno=errno.EBUSY)
        if (self.info.nr_hw_queues, self.info.queue_depth) != (self.queues_wanted, self.depth_wanted):
            log.info("taking over a ublk device with its own queues and depth",
                     queues=self.info.nr_hw_queues, depth=self.info.queue_depth)
        await self._open_queues(target, nursery)
        await control.command(uapi.Cmd.END_USER_RECOVERY, dev_id, data0=os.getpid())
        self._state = "serving"
        self.recovered = True
        log.info("ublk device taken over", device=self.device, previous_pid=existing.ublksrv_pid,
                 queues=len(self.queues), target=target.name)

    async def _open_queues(self, target, nursery: trio.Nursery) -> None:
        path = uapi.CHAR_PATH.format(self.info.dev_id)
        with trio.move_on_after(5):
            while not os.path.exists(path):  # devtmpfs adds the node with the device; udev may take a moment
                await trio.sleep(0.01)
        try:
            self._char_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise UblkError(f"cannot open {path}: {exc.strerror}", errno=exc.errno) from None
        for q_id in range(self.info.nr_hw_queues):
            queue = Queue(self._char_fd, q_id, self.info.queue_depth, BUFFER_SIZE)
            self.queues.append(queue)
            queue.fetch_all()
        await nursery.start(self._serve, target)

    async def _serve(self, target, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Every queue's loop; when they end (cancelled, or the device went away) the device is stopped."""
        try:
            with trio.CancelScope() as self._serve_scope:
                async with trio.open_nursery() as requests:
                    for queue in self.queues:
                        requests.start_soon(queue.serve, target.dispatcher.handle, requests, self.host.guard)
                    task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()
            self._served.set()

    def stop_admitting(self) -> None:
        """A stop is under way: STOP_DEV now (the disk goes; in-flight requests still get answers)."""
        if self.recovery or self._control is None or self._stop_uid is not None or self.info is None:
            return
        self._state = "stopping"
        self._stop_uid = self._control.submit(uapi.Cmd.STOP_DEV, self.info.dev_id)

    async def _shutdown(self) -> None:
        if self.recovery and self._state not in ("new", "added"):
            # Kept for the next daemon: the kernel hands it over once this process is gone. (Only a
            # device this daemon made and never started is deleted.)
            self._state = "kept"
            log.info("ublk device kept for the next daemon (recovery=1)", device=self.device)
            return
        await self._delete()

    async def _delete(self) -> None:
        """STOP_DEV (answering EIO to what still arrives), close our side, DEL_DEV."""
        control, info = self._control, self.info
        if control is None:
            return
        self._state = "stopping"
        try:
            if info is not None:
                with trio.move_on_after(STOP_SECONDS) as waited:
                    if self._stop_uid is None:
                        self._stop_uid = control.submit(uapi.Cmd.STOP_DEV, info.dev_id)
                    async with trio.open_nursery() as nursery:
                        for queue in self.queues:
                            nursery.start_soon(queue.refuse_until_stopped)
                    await control.wait(self._stop_uid)
                if waited.cancelled_caught:
                    log.error("ublk STOP_DEV did not finish in time", device=self.device, seconds=STOP_SECONDS)
            for queue in self.queues:
                queue.close()
            if self._char_fd is not None:
                os.close(self._char_fd)
                self._char_fd = None
            if info is not None:
                await control.delete(info.dev_id, STOP_SECONDS)
                log.info("ublk device deleted", device=self.device)
        except UblkError as exc:
            log.error("ublk device could not be removed", device=self.device, error=str(exc))
        finally:
            self._state = "deleted"
            control.close()
            self._control = None

    def status(self) -> dict:
        info = self.info
        queues = [queue.status() for queue in self.queues]
        summary = (f"{self.device} {self._state}, {len(queues)} queue(s) of depth {queues[0]['depth']}: requests "
                   + "/".join(str(q["requests"]) for q in queues)
                   + f", in flight {sum(q['in_flight'] for q in queues)}, errors {sum(q['errors'] for q in queues)}"
                   + f", malformed {sum(q['malformed'] for q in queues)}"
                   + (", recovery on" + (" (taken over)" if self.recovered else "") if self.recovery else "")
                   if queues else f"ublk device {self.device or self.dev_id} {self._state}")
        return {
            "summary": summary,
            "device": self.device,
            "id": info.dev_id if info is not None else self.dev_id,
            "state": self._state,
            "recovery": self.recovery,
            "recovered": self.recovered,
            "max_io": BUFFER_SIZE,
            "queues": queues,
        }
