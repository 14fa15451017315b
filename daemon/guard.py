"""Where input from outside enters, and the one guard around each entry.

A *surface* is a place where bytes from outside the daemon arrive: the
control socket (JSON lines, snapuserd's text protocol), each channel of a
served device (the NBD plugin's channel socket, ``/dev/dm-user/NAME``, the
in-process kernel model) and each FUSE request. Whatever arrives there, the
rule is the same: a failing input fails alone. The connection or request it
came on ends (or gets an error answer); the daemon, its nursery and every
other connection go on.

:class:`Guard` is the one mechanism for that. Handlers say what they refuse
on purpose with :meth:`Guard.reject` (or by raising :class:`Rejected`), and
run inside :meth:`Guard.isolate`, which turns any other exception (a bug)
into a log line naming the surface, the peer and the error, and a counter,
and ends only what it wraps::

    with guard.isolate("control-json", peer):
        await serve_one_client(...)

The counters are what ``dmuserd status --json`` shows as
``rejected_inputs``: ``{surface: {reason: count}}``. A bug counts under the
reason ``internal-error``; its log line names the exception and where it was
raised (the full traceback only at debug level: one hostile client must not
be able to fill a log with tracebacks).
"""

from __future__ import annotations

import socket
import struct
import traceback
from collections import Counter
from dataclasses import dataclass

import structlog

log = structlog.get_logger("dmuserd.guard")

_UCRED = struct.Struct("3i")

#: The counter's reason for an exception no handler expected.
INTERNAL = "internal-error"


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a connection, from ``SO_PEERCRED``."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock) -> "Peer | None":
        """The peer of a connected Unix socket (any object with ``getsockopt``), or None."""
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except (OSError, AttributeError):
            return None
        return cls(*_UCRED.unpack(raw))

    def fields(self) -> dict:
        return {"peer_pid": self.pid, "peer_uid": self.uid, "peer_gid": self.gid}


class Rejected(Exception):
    """An input refused on purpose: ``reason`` is a short counter key, ``detail`` says what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _where(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame an exception passed."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"


class Guard:
    """Counts and logs what each surface refused; isolates handlers (see the module doc)."""

    def __init__(self) -> None:
        self._counts: dict[str, Counter] = {}

    def count(self, surface: str, reason: str) -> None:
        self._counts.setdefault(surface, Counter())[reason] += 1

    def reject(self, surface: str, reason: str, detail: str, peer: Peer | None = None, **context) -> None:
        """Record one input refused on purpose (counted, logged as a warning)."""
        self.count(surface, reason)
        log.warning("input rejected", surface=surface, reason=reason, error=detail,
                    **(peer.fields() if peer else {}), **context)

    def failed(self, surface: str, exc: BaseException, peer: Peer | None = None, **context) -> None:
        """Record an exception that escaped a handler of ``surface``: rejected or a bug."""
        if isinstance(exc, Rejected):
            self.reject(surface, exc.reason, exc.detail, peer, **context)
            return
        self.count(surface, INTERNAL)
        fields = {**(peer.fields() if peer else {}), **context}
        log.error("handler failed: only this input is dropped", surface=surface,
                  error=f"{type(exc).__name__}: {exc}", at=_where(exc), **fields)
        log.debug("handler failure traceback", surface=surface,
                  traceback="".join(traceback.format_exception(exc)))

    def isolate(self, surface: str, peer: Peer | None = None, **context) -> "_Isolation":
        """A context manager: an exception inside is recorded here and goes no further.

        Cancellation and other ``BaseException``\\ s pass through untouched
        (a stop must still stop); from an exception group only its
        ``Exception`` leaves are recorded and the rest re-raised.
        """
        return _Isolation(self, surface, peer, context)

    def as_dict(self) -> dict:
        return {surface: dict(sorted(c.items())) for surface, c in sorted(self._counts.items())}

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self._counts.values())


class _Isolation:
    __slots__ = ("guard", "surface", "peer", "context")

    def __init__(self, guard: Guard, surface: str, peer: Peer | None, context: dict) -> None:
        self.guard, self.surface, self.peer, self.context = guard, surface, peer, context

    def __enter__(self) -> "_Isolation":
        return self

    def __exit__(self, etype, exc, tb) -> bool:
        if exc is None:
            return False
        if isinstance(exc, BaseExceptionGroup):
            matched, rest = exc.split(Exception)
            for leaf in _leaves(matched):
                self.guard.failed(self.surface, leaf, self.peer, **self.context)
            if rest is not None:
                raise rest
            return True
        if isinstance(exc, Exception):
            self.guard.failed(self.surface, exc, self.peer, **self.context)
            return True
        return False


def _leaves(group):
    if group is None:
        return
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
