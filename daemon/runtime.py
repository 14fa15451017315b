"""The daemon: targets, their exports, the control socket, an orderly stop.

:class:`Daemon` is what ``dmuserd serve`` runs and what tests start in a
nursery::

    daemon = Daemon(spec)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)     # returns once every export is live
        ...
        await daemon.stop()                 # detach, drain, flush, unmount

A target is a name, a backend, its dispatcher and its exports. Every export
is an :class:`~dmuserd.daemon.export.Export` found by kind in the
``dmuserd.exports`` registry; the daemon knows none by name. It is the
exports' :class:`~dmuserd.daemon.export.Host`: the guard, the ``stopping``
flag, ``shared`` (the one FUSE mount lives there) and its nursery.
"""

from __future__ import annotations

import os
import time
from typing import Any

import structlog
import trio

from dmuserd.backends import Backend, Op, backend_class, create
from dmuserd.daemon.config import ConfigError, DaemonSpec, TargetSpec
from dmuserd.daemon.dispatcher import Dispatcher
from dmuserd.daemon.export import Export, build
from dmuserd.daemon.guard import Guard

log = structlog.get_logger("dmuserd.daemon")

#: How long a stop waits for in-flight requests before giving up on them.
STOP_GRACE_SECONDS = 10.0


class Target:
    """One served device."""

    def __init__(self, spec: TargetSpec, backend: Backend, guard: Guard | None = None,
                 exports: list[Export] | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.backend = backend
        self.dispatcher = Dispatcher(backend, name=spec.name, guard=guard)
        #: built (options checked) before the target starts; each one's ``endpoint`` is set once it serves
        self.exports: list[Export] = exports if exports is not None else []
        #: the scope of a target added at run time (:meth:`Daemon.add_target`), and its end
        self.scope: trio.CancelScope | None = None
        self.done: trio.Event | None = None

    @property
    def endpoints(self) -> dict[str, str]:
        """Export kind → where clients find it, for the exports serving now."""
        return {e.spec.kind: e.endpoint for e in self.exports if e.endpoint is not None}

    def status(self) -> dict:
        details = {e.spec.kind: e.status() for e in self.exports if e.endpoint is not None}
        return {
            "name": self.name,
            **self.backend.describe(),
            "exports": self.endpoints,
            "export_status": {k: v for k, v in details.items() if v},
            "capabilities": sorted(op.value for op in self.backend.capabilities),
            **self.dispatcher.stats.as_dict(),
        }


class Daemon:
    """Serve the targets of a :class:`DaemonSpec`; the :class:`~dmuserd.daemon.export.Host` of their exports."""

    def __init__(self, spec: DaemonSpec, *, control_socket: str | None = None) -> None:
        self.spec = spec
        self.control_socket = control_socket if control_socket is not None else spec.control_socket
        self.targets: dict[str, Target] = {}
        #: The daemon's main nursery while it runs: background jobs of targets
        #: (an online merge, say) and process-wide export tasks (the FUSE
        #: mount) start here so a stop cancels them in order.
        self.nursery: trio.Nursery | None = None
        #: Process-wide state of export kinds (``shared["fuse"]``: the one FUSE mount).
        self.shared: dict[str, Any] = {}
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
        # Every export's options are checked before any backend opens.
        exports = {spec.name: self._build_exports(spec) for spec in self.spec.targets}
        for spec in self.spec.targets:
            self.targets[spec.name] = Target(spec, create(spec.backend, self._backend_options(spec)), self.guard,
                                             exports[spec.name])

    def _build_exports(self, spec: TargetSpec) -> list[Export]:
        return [build(export, self) for export in spec.exports]

    def _backend_options(self, spec: TargetSpec) -> dict:
        """The target's backend options, with daemon-wide settings where it leaves them out."""
        options = dict(spec.backend_options)
        if self.spec.offload and "offload" in backend_class(spec.backend).daemon_options:
            options.setdefault("offload", self.spec.offload)
        return options

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve every target until :meth:`stop` or cancellation."""
        from dmuserd.daemon.malloc_tuning import keep_large_buffers

        keep_large_buffers()
        self._build_targets()
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    for target in self.targets.values():
                        await _start_exports(target, nursery)
                    if self.control_socket:
                        from dmuserd.daemon.control import serve_control

                        await nursery.start(serve_control, self, self.control_socket)
                    log.info("ready", targets={n: t.endpoints for n, t in self.targets.items()})
                    task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                await self._close_backends()

    async def add_target(self, spec: TargetSpec, backend: Backend | None = None) -> Target:
        """Add a target to the running daemon and start its exports.

        For control commands that set devices up at runtime (snapuserd's
        ``init``/``start``). ``backend`` is used if given, else built from
        ``spec``. The target's tasks run in a scope of their own, so
        :meth:`remove_target` can stop it alone.
        """
        if self.nursery is None or self.stopping:
            raise ConfigError(f"target {spec.name!r}: the daemon is not running")
        if spec.name in self.targets:
            raise ConfigError(f"a target named {spec.name!r} exists already")
        exports = self._build_exports(spec)
        target = Target(spec, backend if backend is not None else create(spec.backend, self._backend_options(spec)),
                        self.guard, exports)
        done = target.done = trio.Event()

        async def hold(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            try:
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as nursery:
                        task_status.started((scope, nursery))
                        await trio.sleep_forever()
            finally:
                done.set()

        target.scope, nursery = await self.nursery.start(hold)
        self.targets[spec.name] = target
        try:
            await _start_exports(target, nursery)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.remove_target(spec.name)
            raise
        return target

    async def remove_target(self, name: str) -> None:
        """Stop a target added by :meth:`add_target` the way :meth:`stop` stops all, then close its backend."""
        target = self.targets.get(name)
        if target is None:
            raise ConfigError(f"no target named {name!r}")
        await self._stop_targets([target])
        self.targets.pop(name, None)
        if target.scope is not None:
            target.scope.cancel()
            await target.done.wait()
        await self._flush(target)
        try:
            await target.backend.close()
        except Exception as exc:  # noqa: BLE001
            log.error("closing backend failed", device=target.name, error=str(exc))

    async def stop(self) -> None:
        """Stop in order, within :data:`STOP_GRACE_SECONDS`; what a SIGTERM does (see :meth:`_stop_targets`).

        Then the run is cancelled: export tasks end (the FUSE mount goes),
        backends are closed.
        """
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping", grace_s=STOP_GRACE_SECONDS)
        await self._stop_targets(list(self.targets.values()))
        self._cancel.cancel()

    async def _stop_targets(self, targets: list[Target]) -> None:
        """The one way targets stop, within :data:`STOP_GRACE_SECONDS`.

        1. each export's :meth:`~dmuserd.daemon.export.Export.prepare_stop`
           while requests are still served (FUSE detaches loop devices on its
           files: their own flush gets served);
        2. each dispatcher closes admission (new requests: ERROR at once) and
           each export stops admitting (clients fail fast: an in-process
           dm-user target is removed);
        3. in-flight requests finish (``dispatcher.drained``), up to the
           grace period; what is still running then fails (EIO to its
           caller) and is logged;
        4. every backend is flushed (acknowledged writes are durable);
        5. each export's :meth:`~dmuserd.daemon.export.Export.finish_stop`
           delivers the answers still queued.
        """
        with trio.move_on_after(STOP_GRACE_SECONDS) as grace:
            for target in targets:
                for export in target.exports:
                    if export.endpoint is not None:
                        await export.prepare_stop()
            for target in targets:
                target.dispatcher.close_admission()
                for export in target.exports:
                    export.stop_admitting()
            for target in targets:
                await target.dispatcher.drained.wait()
            for target in targets:
                await self._flush(target)
            for target in targets:
                for export in target.exports:
                    await export.finish_stop()
        if grace.cancelled_caught:
            pending = {t.name: t.dispatcher.stats.in_flight for t in targets if t.dispatcher.stats.in_flight}
            log.warning("stop grace period over: failing the requests still in flight",
                        grace_s=STOP_GRACE_SECONDS, in_flight=pending)

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


async def _start_exports(target: Target, nursery: trio.Nursery) -> None:
    """Start ``target``'s exports in ``nursery``, recording where each serves."""
    for export in target.exports:
        export.endpoint = await export.start(target, nursery)
        log.info("export serving", device=target.name, export=str(export.spec), endpoint=export.endpoint)
