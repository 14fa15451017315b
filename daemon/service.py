"""``dmuserd serve`` as a long-running service: run until a signal, stop in order.

Under systemd (``Type=notify``, see ``systemd/dmuserd@.service``) this is
where the service talks to the manager (:mod:`dmuserd.daemon.notify`):

* ``READY=1`` once :meth:`Daemon.run` reports every export live;
* ``STATUS=`` a one-line summary (:func:`status_line`), refreshed every
  :data:`STATUS_INTERVAL` seconds;
* ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` from a task of this event
  loop: a stuck loop stops pinging and systemd restarts the service;
* ``STOPPING=1`` on SIGTERM/SIGINT, then :meth:`Daemon.stop` (bounded) and
  exit status 0.

SIGHUP does not reload: the targets of a running daemon stay as they are
(changing a served device under its users is not something a reload should
do). It is logged as a warning and otherwise ignored, so ``systemctl
kill -s HUP`` or a log rotation script cannot take the devices down; apply a
changed config with ``systemctl restart``.

Before starting, a FUSE mount point left dead by a killed earlier instance
(``Transport endpoint is not connected``) is reclaimed: loop devices on it
are detached and it is lazily unmounted, so ``Restart=on-failure`` after a
SIGKILL gets a working service again. A live mount is never touched.
"""

from __future__ import annotations

import errno
import os
import signal
import time

import structlog
import trio

from dmuserd.daemon.config import DaemonSpec
from dmuserd.daemon.notify import Notifier
from dmuserd.daemon.runtime import Daemon

log = structlog.get_logger("dmuserd.daemon")

#: Seconds between STATUS= updates.
STATUS_INTERVAL = 2.0

#: File system type of our FUSE mounts in /proc/self/mountinfo (fsname/subtype).
FUSE_FSTYPE = "fuse.dmuserd"


async def run_until_signal(spec: DaemonSpec, control_socket: str | None, *, notifier: Notifier | None = None,
                           then=None) -> None:
    """Serve ``spec`` until SIGINT/SIGTERM, then stop in order (see the module doc).

    ``then(daemon)``, an async function, runs once the daemon is ready (to
    add targets as they become available: ``ota serve``); what it raises
    stops the daemon and comes out of here."""
    notifier = notifier if notifier is not None else Notifier()
    daemon = Daemon(spec, control_socket=control_socket)
    try:
        await reclaim_dead_fuse_mounts(spec)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as helpers:
                    if notifier.watchdog_interval:
                        helpers.start_soon(_watchdog, notifier)
                    await nursery.start(_run_daemon, daemon, nursery.cancel_scope)
                    summary = StatusSummary(daemon)
                    notifier.ready(summary.line())
                    helpers.start_soon(_status_updates, notifier, summary)
                    if then is not None:
                        helpers.start_soon(then, daemon)
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if signum == signal.SIGHUP:
                            log.warning("SIGHUP ignored: reloading is not supported; "
                                        "restart the service to apply a changed config", signal=name)
                            continue
                        log.info("signal received, stopping", signal=name)
                        notifier.stopping(f"stopping ({name})")
                        await daemon.stop()
                        break
                    helpers.cancel_scope.cancel()
        log.info("stopped")
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, trio.Cancelled)):
            notifier.status(f"failed: {_first_leaf(exc)}")
        raise
    finally:
        notifier.close()


async def _run_daemon(daemon: Daemon, signal_loop: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    await daemon.run(task_status=task_status)
    # The daemon stopped itself (snapuserd's "stop" on the control socket):
    # stop waiting for a signal too, so the process exits.
    signal_loop.cancel()


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def _watchdog(notifier: Notifier) -> None:
    """Ping systemd's watchdog from this event loop, at half its timeout."""
    log.info("watchdog enabled", interval_s=notifier.watchdog_interval)
    while True:
        notifier.watchdog()
        await trio.sleep(notifier.watchdog_interval)


async def _status_updates(notifier: Notifier, summary: "StatusSummary") -> None:
    while True:
        await trio.sleep(STATUS_INTERVAL)
        notifier.status(summary.line())


class StatusSummary:
    """The one-line STATUS: targets, IOPS since the last line, merge progress."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._last: dict[str, int] = {}
        self._at = time.monotonic()

    def line(self) -> str:
        status = self.daemon.status()
        now = time.monotonic()
        elapsed = max(now - self._at, 1e-3)
        parts = []
        for name, target in status["targets"].items():
            total = target.get("total_requests", 0)
            iops = (total - self._last.get(name, total)) / elapsed
            self._last[name] = total
            text = f"{name} {iops:.0f} IOPS"
            if target.get("errors"):
                text += f", {target['errors']} errors"
            merge = merge_percent(target)
            if merge is not None:
                text += f", merge {merge:.0f}%"
            parts.append(text)
        self._at = now
        count = len(status["targets"])
        state = "stopping" if status.get("stopping") else "serving"
        return f"{state} {count} target{'s' if count != 1 else ''}: " + "; ".join(parts)


def merge_percent(target_status: dict) -> float | None:
    """Merge progress a snapshot target reports in its status, as a percentage.

    Understood: ``merge_percent`` (0-100), or ``merge`` as a number (0-100) or
    a dict with ``percent``, or ``done``/``total``.
    """
    value = target_status.get("merge_percent", target_status.get("merge"))
    if isinstance(value, dict):
        if isinstance(value.get("percent"), (int, float)):
            value = value["percent"]
        elif isinstance(value.get("total"), (int, float)) and value["total"] > 0:
            value = 100.0 * value.get("done", 0) / value["total"]
        else:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# -- dead FUSE mounts of a killed instance ---------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_fstype(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The file system type mounted at ``path`` (the last mount there), or None."""
    path = os.path.abspath(path)
    found = None
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                after = line.split(" - ", 1)[1].split()
                if _unescape_mountinfo(fields[4]) == path and after:
                    found = after[0]
    except OSError:
        return None
    return found


def is_dead_mount(path: str) -> bool:
    """True when ``path`` is a mount whose FUSE server is gone (ENOTCONN)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


async def reclaim_dead_fuse_mounts(spec: DaemonSpec) -> list[str]:
    """Unmount our FUSE mount points that a killed instance left dead."""
    from dmuserd.daemon.loopdev import detach_loops_under

    reclaimed = []
    mountpoints = {os.path.abspath(e.where) for t in spec.targets for e in t.exports if e.kind == "fuse"}
    for path in sorted(mountpoints):
        if mount_fstype(path) != FUSE_FSTYPE or not is_dead_mount(path):
            continue
        log.warning("reclaiming the dead FUSE mount of an earlier instance", mountpoint=path)
        await detach_loops_under(path)
        result = await trio.run_process(["umount", "-l", path], capture_stderr=True, check=False)
        if result.returncode != 0:
            log.error("could not unmount the dead FUSE mount", mountpoint=path,
                      error=result.stderr.decode(errors="replace").strip())
            continue
        reclaimed.append(path)
    return reclaimed
