"""Turn dm-user requests into backend calls.

The dispatcher is the one place that knows the mapping; every export (real
dm-user, FUSE, NBD) hands it :class:`~dmuserd.protocol.Request` objects and
writes back the :class:`~dmuserd.protocol.Response` it returns.

Rules it enforces, so backends never have to:

* a request out of range or not aligned to the backend's block size gets
  ERROR (and a log line), never reaches the backend;
* an operation the backend lacks gets UNSUPPORTED;
* ``PREFLUSH`` flushes before the request runs; a WRITE with ``len`` 0
  (how the 6.1 kernel sends flushes) is a flush; ``FUA`` writes reach the
  backend as ``write(..., fua=True)``, which must be durable on return;
* a FLUSH completes only after every write that completed before it was
  issued is durable: the backend's ``flush()`` covers all completed writes;
* a FLUSH (or a zero-length PREFLUSH WRITE) to a backend that cannot
  flush succeeds when the backend takes no writes at all (nothing can be
  pending: a read-only snapshot, say), and is UNSUPPORTED otherwise;
* a backend exception fails that one request with ERROR and a log line, and
  so does a READ answer whose byte size is not the request's (counted in
  bytes, whatever the buffer's item size). The device stays up; nothing in
  :meth:`Dispatcher.handle` can raise (a bug there is counted by the
  target's :class:`~dmuserd.daemon.guard.Guard` and fails the request).

Admission and draining, so one mechanism serves every export's stop:

* at most ``max_in_flight`` requests of a target run at once; the next
  ones wait in arrival order (no polling: a finishing request hands its slot
  to the first waiter);
* :meth:`Dispatcher.close_admission` (a stop is under way): every request
  not yet running, waiting ones included, is answered ERROR at once,
  counted (``refused``) and logged once; what runs finishes;
* :attr:`Dispatcher.drained` is set once admission is closed and nothing
  is in flight: the daemon waits for it before flushing the backend.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator

import structlog
import trio
from outcome import Value

from dmuserd.backends import Backend, Op, Unsupported
from dmuserd.daemon.guard import Guard
from dmuserd.protocol import SECTOR_SIZE, Flag, Request, RequestType, Response, ResponseType, new_message

log = structlog.get_logger("dmuserd.dispatch")

_OP_FOR_TYPE = {
    RequestType.READ: Op.READ,
    RequestType.WRITE: Op.WRITE,
    RequestType.FLUSH: Op.FLUSH,
    RequestType.DISCARD: Op.DISCARD,
    RequestType.SECURE_ERASE: Op.DISCARD,
    RequestType.WRITE_ZEROES: Op.WRITE_ZEROES,
}


_STAT_NAMES = {t: t.name.lower() for t in _OP_FOR_TYPE}
#: Request types dmuserd does not serve (WRITE_SAME, the zone types) count here.
_OTHER = "other"
#: Operations that leave something for a flush to make durable.
_WRITING_OPS = frozenset({Op.WRITE, Op.DISCARD, Op.WRITE_ZEROES})
_PREFLUSH, _FUA, _NOUNMAP = int(Flag.PREFLUSH), int(Flag.FUA), int(Flag.NOUNMAP)
# Enum members looked up once: an attribute of an enum class costs ~0.1 µs.
_READ_TYPE, _WRITE_TYPE, _FLUSH_TYPE = RequestType.READ, RequestType.WRITE, RequestType.FLUSH
_WRITE_ZEROES_TYPE = RequestType.WRITE_ZEROES
_OP_FLUSH = Op.FLUSH
_SUCCESS, _ERROR = ResponseType.SUCCESS, ResponseType.ERROR
#: Requests in flight per target by default (dm-user's reserve is sized for 128).
DEFAULT_MAX_IN_FLIGHT = 128


class Refused(Response):
    """The ERROR answer to a request refused because admission is closed (a stop).

    On the wire it is an ERROR like any other; a transport whose peer re-sends
    what was left unanswered (the NBD plugin) can leave it unanswered instead,
    so the next daemon serves it (see :func:`~dmuserd.daemon.channels.serve_channel`).
    """

    __slots__ = ()


class Stats:
    """Counters for ``dmuserd status`` and the systemd STATUS line."""

    def __init__(self) -> None:
        #: requests by type (a list indexed by :class:`RequestType`: one C step per request); a
        #: WRITE of length 0 (the kernel's flush) counts as a WRITE here and in ``empty_writes``
        self.by_type = [0] * (max(RequestType) + 1)
        self.empty_writes = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.errors = 0
        self.unsupported = 0
        #: requests running (admitted, not answered yet)
        self.in_flight = 0
        #: requests answered ERROR because admission was closed (a stop)
        self.refused = 0
        self.started = time.monotonic()

    @property
    def requests(self) -> dict[str, int]:
        """Requests by operation name; ``flush`` counts FLUSHes and the WRITEs of length 0."""
        counts = {name: 0 for name in _STAT_NAMES.values()} | {"flush": 0, _OTHER: 0}
        for kind, count in zip(RequestType, self.by_type):
            counts[_STAT_NAMES.get(kind, _OTHER)] += count
        counts["write"] -= self.empty_writes
        counts["flush"] += self.empty_writes
        return counts

    @property
    def total_requests(self) -> int:
        return sum(self.by_type)

    def as_dict(self) -> dict:
        return {
            "requests": dict(self.requests),
            "total_requests": self.total_requests,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "errors": self.errors,
            "unsupported": self.unsupported,
            "in_flight": self.in_flight,
            "refused": self.refused,
            "uptime_s": round(time.monotonic() - self.started, 1),
        }


class Dispatcher:
    """Serve requests for one target from its backend."""

    def __init__(self, backend: Backend, *, name: str = "disk", guard: Guard | None = None,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1 (got {max_in_flight})")
        self.backend = backend
        self.name = name
        self.stats = Stats()
        #: Counts and logs what this target's channels refuse (the daemon's, shared by its targets).
        self.guard = guard if guard is not None else Guard()
        self.max_in_flight = max_in_flight
        #: set once admission is closed and no request is in flight
        self.drained = trio.Event()
        # The admission bound: max_in_flight while admitting, 0 once closed,
        # so the hot path tests one integer.
        self._limit = max_in_flight
        #: tasks waiting for a slot, first come first served
        self._waiters: deque[trio.lowlevel.Task] = deque()
        self._log = log.bind(device=name)
        self.refresh_capabilities()

    @property
    def admitting(self) -> bool:
        """False once :meth:`close_admission` was called."""
        return self._limit != 0

    @property
    def has_room(self) -> bool:
        """A request handled now would run at once (admission open, a slot free, nobody waiting)."""
        return self.stats.in_flight < self._limit and not self._waiters

    def close_admission(self) -> None:
        """Answer every request not yet running ERROR from now on (a stop is under way).

        Requests waiting for a slot are refused too; those running finish,
        and :attr:`drained` is set when the last one does.
        """
        if not self._limit:
            return
        self._limit = 0
        waiting = len(self._waiters)
        self._log.info("admission closed: new requests are answered ERROR", in_flight=self.stats.in_flight,
                       waiting=waiting)
        while self._waiters:
            trio.lowlevel.reschedule(self._waiters.popleft(), Value(False))
        if not self.stats.in_flight:
            self.drained.set()

    def refresh_capabilities(self) -> None:
        """Re-read the backend's capabilities (a backend switched mode)."""
        caps = self._caps = self.backend.capabilities
        # Looked up per request by type (an int hash) rather than by Op
        # (an Enum, hashed in Python).
        self._can_flush = _OP_FLUSH in caps
        # A backend that takes no writes has nothing to make durable: a flush succeeds.
        self._flush_is_noop = not self._can_flush and not (caps & _WRITING_OPS)
        self._served_types = frozenset(t for t, op in _OP_FOR_TYPE.items() if op in caps)

    async def handle(self, req: Request, views: bool = False, into: memoryview | None = None) -> Response:
        """Run one request; always returns a response, never raises.

        With ``views``, a READ's data is the backend's :meth:`read_views`: a
        list of buffers that may be views of the backend's own memory, for a
        transport that hands them on at once (scatter-gather ``sendmsg``, the
        FUSE reply), so the data is never copied in the daemon. With
        ``into`` (``len`` bytes: where the transport wants a READ's data, the
        NBD export's shared slot), the backend reads straight into it
        (:meth:`~dmuserd.backends.Backend.readinto`) and the answer's data is
        ``into`` itself.

        Admission, the rules and the backend call are one coroutine: every
        request of every export runs it, and one frame more was ~0.15 µs of
        the ~1 µs the dispatcher costs a 4 KiB READ (measured in process,
        over a backend that returns at once).
        """
        stats = self.stats
        if stats.in_flight < self._limit and not self._waiters:
            stats.in_flight += 1  # the uncontended case: a slot is free and nobody waits for one
        elif not await self._admit():
            stats.refused += 1
            return Refused(req.seq, _ERROR)
        try:
            # The fields in one step: each read of a NamedTuple field by name is a descriptor call.
            seq, kind, flags, sector, length, payload = req
            # int arithmetic: IntFlag operators build new enum members (and most requests carry no flag)
            flags = int(flags) if flags else 0
            backend = self.backend
            stats.by_type[kind] += 1
            is_flush = kind == _FLUSH_TYPE or (kind == _WRITE_TYPE and not length)
            if is_flush:
                if kind == _WRITE_TYPE:
                    stats.empty_writes += 1
                if not self._can_flush:
                    return new_message(Response, seq, _SUCCESS, None) if self._flush_is_noop else self._unsupported(
                        req, f"the backend does not support {_OP_FLUSH.value}")
            else:
                if kind not in self._served_types:
                    op = _OP_FOR_TYPE.get(kind)
                    return self._unsupported(req, f"{kind.name} is not a block operation dmuserd serves" if op is None
                                             else f"the backend does not support {op.value}")
                if flags & _PREFLUSH and not self._can_flush:
                    return self._unsupported(req, f"the backend does not support {_OP_FLUSH.value} (the PREFLUSH)")
                offset = sector * SECTOR_SIZE
                block = backend.block_size
                if offset % block or length % block or offset + length > backend.size:
                    return self._error(req, self._range_problem(req))
            try:
                if flags & _PREFLUSH or is_flush:
                    await backend.flush()
                    if is_flush:
                        return new_message(Response, seq, _SUCCESS, None)
                if kind == _READ_TYPE:
                    if into is not None:
                        await backend.readinto(offset, into)  # fills all of it, or raises
                        data, size = into, length
                    elif views:
                        data = await backend.read_views(offset, length)
                        # read_views' buffers count in bytes; most reads are one buffer
                        size = len(data[0]) if len(data) == 1 else sum(map(len, data))
                    else:
                        data = await backend.read(offset, length)
                        # bytes is the usual answer; anything else counts in bytes, not items.
                        size = len(data) if type(data) is bytes else memoryview(data).nbytes
                    if size != length:
                        return self._error(req, f"backend returned {size} bytes for a {length}-byte read")
                    stats.bytes_read += length
                    return new_message(Response, seq, _SUCCESS, data)
                if kind == _WRITE_TYPE:
                    await backend.write(offset, payload, bool(flags & _FUA))
                    stats.bytes_written += length
                elif kind == _WRITE_ZEROES_TYPE:
                    await backend.write_zeroes(offset, length, not (flags & _NOUNMAP))
                else:  # DISCARD, SECURE_ERASE
                    await backend.discard(offset, length)
                if flags & _FUA and kind != _WRITE_TYPE and self._can_flush:
                    await backend.flush()
                return new_message(Response, seq, _SUCCESS, None)
            except Unsupported as exc:
                return self._unsupported(req, str(exc))
            except Exception as exc:  # noqa: BLE001 - one failing request fails alone
                return self._error(req, f"backend raised {type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bug here must fail this one request only
            self.guard.failed("dispatcher", exc, device=self.name, seq=req.seq)
            return self._error(req, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            if self._waiters or not self._limit:
                self._release()
            else:
                stats.in_flight -= 1

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[bool]:
        """Hold one of the target's request slots for a request that is not a block operation.

        For what an export serves beside :meth:`handle` (the NBD server's
        BLOCK_STATUS): the same slots, waiting order and stop. Yields True
        while the slot is held, the request counted in flight (a stop's
        :attr:`drained` waits for it); False at once when admission is
        closed, counted ``refused``: answer it as :class:`Refused`.
        (:meth:`handle` takes its slot inline, for speed, by the same rule.)
        """
        if self.has_room:
            self.stats.in_flight += 1
        elif not await self._admit():
            self.stats.refused += 1
            yield False
            return
        try:
            yield True
        finally:
            self._release()

    async def _admit(self) -> bool:
        """Wait for a slot (True: it is ours, counted in flight) or a closed admission (False)."""
        if not self._limit:
            return False
        task = trio.lowlevel.current_task()
        self._waiters.append(task)

        def abort(_raise_cancel) -> trio.lowlevel.Abort:
            self._waiters.remove(task)  # cancelled while waiting: it never held a slot
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _release(self) -> None:
        """A request is done: its slot goes to the first waiter, else it is freed."""
        if self._waiters:
            trio.lowlevel.reschedule(self._waiters.popleft(), Value(True))  # in_flight unchanged: handed over
            return
        self.stats.in_flight -= 1
        if not self._limit and not self.stats.in_flight:
            self.drained.set()

    def _range_problem(self, req: Request) -> str:
        block = self.backend.block_size
        if req.offset % block or req.len % block:
            return f"offset {req.offset} / length {req.len} not aligned to the {block}-byte block size"
        return f"range {req.offset}+{req.len} ends beyond the device size {self.backend.size}"

    def _error(self, req: Request, why: str) -> Response:
        self.stats.errors += 1
        self._log.warning("request failed", seq=req.seq, op=req.type.name, offset=req.offset, length=req.len, error=why)
        return Response(req.seq, _ERROR)

    def _unsupported(self, req: Request, why: str) -> Response:
        self.stats.unsupported += 1
        self._log.debug("request unsupported", seq=req.seq, op=req.type.name, reason=why)
        return Response(req.seq, ResponseType.UNSUPPORTED)
