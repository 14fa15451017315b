"""The systemd notify protocol (sd_notify(3)), standard library only.

A ``Type=notify`` service tells systemd how it is doing by sending small
datagrams (``KEY=value`` lines) to the AF_UNIX socket named in
``$NOTIFY_SOCKET``. dmuserd sends:

``READY=1``
    once every export is live (FUSE mounted, NBD listening, dm-user
    attached): ``systemctl start`` returns then, not before.
``STATUS=...``
    a one-line summary (targets, IOPS, merge progress), refreshed
    periodically; ``systemctl status`` shows it.
``WATCHDOG=1``
    every half ``$WATCHDOG_USEC``, from a task of the trio event loop itself,
    so a loop that is stuck (a blocking call, a busy loop) stops pinging and
    systemd kills and restarts the service (``WatchdogSec=``).
``STOPPING=1``
    when a SIGTERM starts the orderly stop.

Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing.
Sending never blocks and never raises: a full or vanished socket only costs
that one message.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("dmuserd.notify")


def _address(value: str) -> str | bytes | None:
    """The socket address in ``$NOTIFY_SOCKET``: a path, or ``@name`` (abstract)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def watchdog_interval(environ=None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half ``$WATCHDOG_USEC``), or None when off.

    ``$WATCHDOG_PID``, when set, must name this process (sd_watchdog_enabled(3)):
    a watchdog meant for a parent is not ours. Malformed values mean "off".
    """
    environ = os.environ if environ is None else environ
    text = environ.get("WATCHDOG_USEC", "")
    if not text.isascii() or not text.isdigit():
        return None
    usec = int(text)
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and owner.strip() != str(os.getpid() if pid is None else pid):
        return None
    return usec / 2e6


class Notifier:
    """Sends notify messages to systemd (or nowhere, when not under systemd)."""

    def __init__(self, environ=None) -> None:
        environ = os.environ if environ is None else environ
        self.address = _address(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = watchdog_interval(environ)
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        if environ is os.environ:
            # Children (losetup, nbdkit) must not talk to systemd in our name.
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (``send(READY=1, STATUS="...")``); True if delivered."""
        if self._sock is None:
            return False
        text = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            self._sock.sendto(text.encode(), self.address)
        except OSError as exc:
            log.debug("notify message not delivered", error=str(exc), fields=sorted(fields))
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(value) -> str:
    """Newlines would start a new assignment: a STATUS is one line."""
    return str(value).replace("\n", " ")
