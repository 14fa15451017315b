"""The daemon: targets, their exports, the control socket, an orderly stop.

:class:`Daemon` is what ``dmuserd serve`` runs and what tests start in a
nursery::

    daemon = Daemon(spec)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)     # returns once every export is live
        ...
        await daemon.stop()                 # detach, flush, unmount

A target is a name, a backend, its dispatcher and its exports. FUSE exports
of all targets share one mount (pyfuse3 allows one per process). Every other
export kind is a module named in :data:`EXPORT_STARTERS` with one function::

    async def start_export(daemon, target, export, nursery) -> None

which returns once the export is live (listening, attached), records where
clients find it in ``target.endpoints[export.kind]``, and leaves its
long-running tasks in ``nursery``.
"""

from __future__ import annotations

import os
import time

import structlog
import trio

from dmuserd.backends import Backend, Op, backend_class, create
from dmuserd.daemon.config import ConfigError, DaemonSpec, TargetSpec
from dmuserd.daemon.dispatcher import Dispatcher
from dmuserd.daemon.guard import Guard

log = structlog.get_logger("dmuserd.daemon")

#: Export kinds other than FUSE: kind -> "module:function" (see the module doc).
EXPORT_STARTERS = {
    "nbd": "dmuserd.daemon.nbd:start_export",
    "dm-user": "dmuserd.daemon.dmuser:start_export",
}

#: How long a stop waits for in-flight requests before giving up on them.
STOP_GRACE_SECONDS = 10.0


class Target:
    """One served device."""

    def __init__(self, spec: TargetSpec, backend: Backend, guard: Guard | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.backend = backend
        self.dispatcher = Dispatcher(backend, name=spec.name, guard=guard)
        #: the in-process device FUSE submits to (a DirectDevice, or an EmulatedDmUser with emulate=dm-user)
        self.device = None
        self.endpoints: dict[str, str] = {}

    def status(self) -> dict:
        return {
            "name": self.name,
            **self.backend.describe(),
            "exports": dict(self.endpoints),
            "capabilities": sorted(op.value for op in self.backend.capabilities),
            **self.dispatcher.stats.as_dict(),
        }


class Daemon:
    def __init__(self, spec: DaemonSpec, *, control_socket: str | None = None) -> None:
        self.spec = spec
        self.control_socket = control_socket if control_socket is not None else spec.control_socket
        self.targets: dict[str, Target] = {}
        self.fuse = None
        #: The daemon's main nursery while it runs: background jobs of targets
        #: (an online merge, say) start here so a stop cancels them in order.
        self.nursery: trio.Nursery | None = None
        self.started_at = time.time()
        self.stopping = False
        #: Every input surface's guard: what each refused, by reason (``status`` → ``rejected_inputs``).
        self.guard = Guard()
        self._cancel = trio.CancelScope()

    def _build_targets(self) -> None:
        seen = set()
        for spec in self.spec.targets:
            if spec.name in seen:
                raise ConfigError(f"two targets are named {spec.name!r}: target names must be unique")
            seen.add(spec.name)
        for spec in self.spec.targets:
            self.targets[spec.name] = Target(spec, create(spec.backend, self._backend_options(spec)), self.guard)

    def _backend_options(self, spec: TargetSpec) -> dict:
        """The target's backend options, with daemon-wide settings where it leaves them out."""
        options = dict(spec.backend_options)
        if self.spec.offload and "offload" in backend_class(spec.backend).daemon_options:
            options.setdefault("offload", self.spec.offload)
        return options

    def _fuse_mountpoint(self) -> str | None:
        mountpoints = {e.where for t in self.spec.targets for e in t.exports if e.kind == "fuse"}
        if len(mountpoints) > 1:
            raise ConfigError(
                f"FUSE exports name several mount points ({', '.join(sorted(mountpoints))}); "
                "one process has one FUSE mount: use the same directory for every target"
            )
        return mountpoints.pop() if mountpoints else None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve every target until :meth:`stop` or cancellation."""
        from dmuserd.daemon.malloc_tuning import keep_large_buffers

        keep_large_buffers()
        starters = {}
        for spec in self.spec.targets:
            for export in spec.exports:
                if export.kind != "fuse" and export.kind not in starters:
                    starters[export.kind] = _export_starter(export)
        mountpoint = self._fuse_mountpoint()
        self._build_targets()
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    if mountpoint:
                        await self._start_fuse(nursery, mountpoint)
                    for target in self.targets.values():
                        for export in target.spec.exports:
                            if export.kind != "fuse":
                                await starters[export.kind](self, target, export, nursery)
                    if self.control_socket:
                        from dmuserd.daemon.control import serve_control

                        await nursery.start(serve_control, self, self.control_socket)
                    log.info("ready", targets={n: t.endpoints for n, t in self.targets.items()})
                    task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                await self._close_backends()

    async def add_target(self, spec: TargetSpec, backend: Backend | None = None) -> Target:
        """Add a target to the running daemon and start its (non-FUSE) exports.

        For control commands that set devices up at runtime (snapuserd's
        ``init``/``start``). ``backend`` is used if given, else built from
        ``spec``. The target's tasks run in a scope of their own, so
        :meth:`remove_target` can stop it alone.
        """
        if self.nursery is None or self.stopping:
            raise ConfigError(f"target {spec.name!r}: the daemon is not running")
        if spec.name in self.targets:
            raise ConfigError(f"a target named {spec.name!r} exists already")
        if any(e.kind == "fuse" for e in spec.exports):
            raise ConfigError(f"target {spec.name!r}: FUSE exports cannot be added to a running daemon")
        starters = {e.kind: _export_starter(e) for e in spec.exports}
        target = Target(spec, backend if backend is not None else create(spec.backend, self._backend_options(spec)),
                        self.guard)
        target.done = trio.Event()

        async def hold(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            try:
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as nursery:
                        task_status.started((scope, nursery))
                        await trio.sleep_forever()
            finally:
                target.done.set()

        target.scope, nursery = await self.nursery.start(hold)
        self.targets[spec.name] = target
        try:
            for export in spec.exports:
                await starters[export.kind](self, target, export, nursery)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.remove_target(spec.name)
            raise
        return target

    async def remove_target(self, name: str) -> None:
        """Stop a target added by :meth:`add_target`: its exports, then flush and close its backend."""
        target = self.targets.pop(name, None)
        if target is None:
            raise ConfigError(f"no target named {name!r}")
        if getattr(target, "scope", None) is not None:
            target.scope.cancel()
            await target.done.wait()
        await self._flush(target)
        try:
            await target.backend.close()
        except Exception as exc:  # noqa: BLE001
            log.error("closing backend failed", device=target.name, error=str(exc))

    async def _start_fuse(self, nursery, mountpoint: str) -> None:
        from dmuserd.daemon.fuse import FuseExport, device_for

        self.fuse = FuseExport(mountpoint, self.guard)
        for target in self.targets.values():
            export = next((e for e in target.spec.exports if e.kind == "fuse"), None)
            if export is not None:
                target.device = device_for(target.dispatcher, export)
                await nursery.start(target.device.run)
                target.endpoints["fuse"] = self.fuse.add(
                    target.name, target.device, target.backend.size, target.backend.block_size
                )
        await nursery.start(self.fuse.run)

    async def stop(self) -> None:
        """Stop in order, within :data:`STOP_GRACE_SECONDS`; what a SIGTERM does.

        1. detach loop devices on our FUSE files (their own flush still
           gets served);
        2. take no new requests: each in-process dm-user target is removed
           (``dmsetup remove``), so new block I/O fails with EIO at once and
           the channels end after answering what they hold;
        3. let in-flight requests finish, up to the grace period; what is
           still running then fails (EIO to its caller) and is logged;
        4. flush every backend (acknowledged writes are durable);
        5. cancel the run: the FUSE mount goes, backends are closed.
        """
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping", grace_s=STOP_GRACE_SECONDS)
        with trio.move_on_after(STOP_GRACE_SECONDS) as grace:
            if self.fuse is not None and self.fuse.mounted:
                from dmuserd.daemon.loopdev import detach_loops_under

                await detach_loops_under(self.fuse.mountpoint)
            for target in self.targets.values():
                self._refuse_new_requests(target)
            while any(t.dispatcher.stats.in_flight for t in self.targets.values()):
                await trio.sleep(0.01)
            for target in self.targets.values():
                await self._flush(target)
        if grace.cancelled_caught:
            pending = {n: t.dispatcher.stats.in_flight for n, t in self.targets.items() if t.dispatcher.stats.in_flight}
            log.warning("stop grace period over: failing the requests still in flight",
                        grace_s=STOP_GRACE_SECONDS, in_flight=pending)
        self._cancel.cancel()

    def _refuse_new_requests(self, target: Target) -> None:
        """Close ``target``'s door for new block I/O (a stop is under way)."""
        if target.device is not None:
            target.device.stop_admitting()

    async def _flush(self, target: Target) -> None:
        if target.backend.supports(Op.FLUSH):
            try:
                await target.backend.flush()
            except Exception as exc:  # noqa: BLE001
                log.error("flush at stop failed", device=target.name, error=str(exc))

    async def _close_backends(self) -> None:
        for target in self.targets.values():
            await self._flush(target)
            try:
                await target.backend.close()
            except Exception as exc:  # noqa: BLE001
                log.error("closing backend failed", device=target.name, error=str(exc))

    def status(self) -> dict:
        from dmuserd.daemon import snapuserd

        status = {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "stopping": self.stopping,
            "targets": {name: t.status() for name, t in self.targets.items()},
            "rejected_inputs": self.guard.as_dict(),
        }
        handlers = snapuserd.status_of(self)  # snapuserd clients' handlers (update verification progress)
        if handlers is not None:
            status["snapuserd"] = handlers
        return status


def _export_starter(export):
    import importlib

    module_name, _, function = EXPORT_STARTERS.get(export.kind, ":").partition(":")
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"export {export}: the {export.kind} export is not available in this version") from None
