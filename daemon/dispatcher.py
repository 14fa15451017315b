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
* a backend exception fails that one request with ERROR and a log line.
  The device stays up.

Requests run concurrently; the caller bounds how many (see
:class:`~dmuserd.daemon.channels.ChannelServer`).
"""

from __future__ import annotations

import time

import structlog

from dmuserd.backends import Backend, Op, Unsupported
from dmuserd.protocol import SECTOR_SIZE, Flag, Request, RequestType, Response, ResponseType

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
_PREFLUSH, _FUA, _NOUNMAP = int(Flag.PREFLUSH), int(Flag.FUA), int(Flag.NOUNMAP)


class Stats:
    """Counters for ``dmuserd status`` and the systemd STATUS line."""

    def __init__(self) -> None:
        self.requests = {t.name.lower(): 0 for t in _OP_FOR_TYPE} | {"flush": 0}
        self.bytes_read = 0
        self.bytes_written = 0
        self.errors = 0
        self.unsupported = 0
        self.in_flight = 0
        self.started = time.monotonic()

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def as_dict(self) -> dict:
        return {
            "requests": dict(self.requests),
            "total_requests": self.total_requests,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "errors": self.errors,
            "unsupported": self.unsupported,
            "in_flight": self.in_flight,
            "uptime_s": round(time.monotonic() - self.started, 1),
        }


class Dispatcher:
    """Serve requests for one target from its backend."""

    def __init__(self, backend: Backend, *, name: str = "disk") -> None:
        self.backend = backend
        self.name = name
        self.stats = Stats()
        self._caps = backend.capabilities
        self._log = log.bind(device=name)

    def refresh_capabilities(self) -> None:
        """Re-read the backend's capabilities (a backend switched mode)."""
        self._caps = self.backend.capabilities

    async def handle(self, request: Request) -> Response:
        """Run one request; always returns a response, never raises."""
        self.stats.in_flight += 1
        try:
            return await self._handle(request)
        finally:
            self.stats.in_flight -= 1

    async def _handle(self, req: Request) -> Response:
        backend = self.backend
        kind = req.type
        flags = int(req.flags)  # int arithmetic: IntFlag operators build new enum members
        is_flush = kind == RequestType.FLUSH or (kind == RequestType.WRITE and req.len == 0)
        op = Op.FLUSH if is_flush else _OP_FOR_TYPE.get(kind)
        self.stats.requests["flush" if is_flush else _STAT_NAMES[kind]] += 1
        if op is None:
            return self._unsupported(req, f"{kind.name} is not a block operation dmuserd serves")
        if op not in self._caps or (flags & _PREFLUSH and Op.FLUSH not in self._caps and not is_flush):
            return self._unsupported(req, f"the backend does not support {op.value}")
        if not is_flush:
            offset = req.sector * SECTOR_SIZE
            length = req.len
            block = backend.block_size
            if offset % block or length % block or offset + length > backend.size:
                return self._error(req, self._range_problem(req))
        try:
            if flags & _PREFLUSH or is_flush:
                await backend.flush()
            if is_flush:
                return Response(req.seq)
            if kind == RequestType.READ:
                data = await backend.read(offset, length)
                if len(data) != length:
                    return self._error(req, f"backend returned {len(data)} bytes for a {length}-byte read")
                self.stats.bytes_read += length
                return Response(req.seq, ResponseType.SUCCESS, data)
            if kind == RequestType.WRITE:
                await backend.write(offset, req.payload, bool(flags & _FUA))
                self.stats.bytes_written += length
            elif op == Op.DISCARD:
                await backend.discard(offset, length)
            elif op == Op.WRITE_ZEROES:
                await backend.write_zeroes(offset, length, not (flags & _NOUNMAP))
            if flags & _FUA and kind != RequestType.WRITE and Op.FLUSH in self._caps:
                await backend.flush()
            return Response(req.seq)
        except Unsupported as exc:
            return self._unsupported(req, str(exc))
        except Exception as exc:  # noqa: BLE001 - one failing request fails alone
            return self._error(req, f"backend raised {type(exc).__name__}: {exc}")

    def _range_problem(self, req: Request) -> str:
        block = self.backend.block_size
        if req.offset % block or req.len % block:
            return f"offset {req.offset} / length {req.len} not aligned to the {block}-byte block size"
        return f"range {req.offset}+{req.len} ends beyond the device size {self.backend.size}"

    def _error(self, req: Request, why: str) -> Response:
        self.stats.errors += 1
        self._log.warning("request failed", seq=req.seq, op=req.type.name, offset=req.offset, length=req.len, error=why)
        return Response(req.seq, ResponseType.ERROR)

    def _unsupported(self, req: Request, why: str) -> Response:
        self.stats.unsupported += 1
        self._log.debug("request unsupported", seq=req.seq, op=req.type.name, reason=why)
        return Response(req.seq, ResponseType.UNSUPPORTED)
