"""The daemon's side of one dm-user channel, sans I/O (in the style of h11).

Feed it the bytes read from the channel with :meth:`DaemonConnection.receive_data`
(in chunks of any size), take complete requests out with
:meth:`DaemonConnection.next_event`, and turn each answer into the bytes to
write back with :meth:`DaemonConnection.send_response`. It does no I/O and
keeps no clock: the same object serves a real ``/dev/dm-user`` channel, a
socket from the NBD plugin and the in-process kernel model.

::

    conn = DaemonConnection()
    conn.receive_data(chunk)
    while (event := conn.next_event()) is not NEED_DATA:
        ...  # event is a Request
        for buf in conn.send_response(Response(event.seq, ResponseType.SUCCESS, data)):
            channel.write(buf)

The connection checks what the kernel would not: a request's ``type`` and
``flags`` must be known and its ``len`` sane; a response must answer a seq
this connection handed out and not answered yet, and a successful READ
response must carry exactly ``len`` bytes. Each violation raises
:class:`ProtocolError` naming the field and the value.
"""

from __future__ import annotations

from dmuserd.protocol._constants import (
    ALL_FLAGS,
    HEADER_SIZE,
    SECTOR_SIZE,
    Flag,
    RequestType,
    ResponseType,
)
from dmuserd.protocol._errors import ProtocolError
from dmuserd.protocol._message import Header, Request, Response, _pack_header


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`DaemonConnection.next_event` when more bytes are needed.
NEED_DATA = _NeedData()

#: Largest READ/WRITE the daemon accepts by default (the NBD export's maximum
#: block size; the kernel's BIOs are far smaller).
DEFAULT_MAX_IO = 32 * 1024 * 1024

_U64_MAX = (1 << 64) - 1

# Enum lookups by table: calling an enum class costs more than the rest of a
# request's decoding, and this runs once per block I/O.
_REQUEST_TYPES = {int(t): t for t in RequestType}
_RESPONSE_TYPES = {int(t): t for t in ResponseType}
_FLAGS: dict[int, Flag] = {}


class DaemonConnection:
    """One channel's protocol state on the daemon side."""

    def __init__(self, *, max_io: int = DEFAULT_MAX_IO) -> None:
        self.max_io = max_io
        self._buffer = bytearray()
        self._header: Header | None = None
        # seq -> the request it answers, for requests handed out and not answered.
        self._outstanding: dict[int, Request] = {}

    @property
    def outstanding(self) -> int:
        """Requests handed out by :meth:`next_event` and not yet answered."""
        return len(self._outstanding)

    @property
    def need_bytes(self) -> int:
        """Bytes still missing for the next request, as far as known (at least 1).

        A transport that reads exactly what is needed (the kernel model, a
        channel read into a fixed buffer) asks for this much next.
        """
        if self._header is None:
            return max(HEADER_SIZE - len(self._buffer), 1)
        return max(self._header.len - len(self._buffer), 1)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into a request."""
        return len(self._buffer)

    def receive_data(self, data) -> None:
        """Add bytes read from the channel (any chunk size, including empty)."""
        self._buffer += data

    def next_event(self):
        """Return the next complete :class:`Request`, or :data:`NEED_DATA`."""
        if self._header is None:
            if len(self._buffer) < HEADER_SIZE:
                return NEED_DATA
            self._header = self._check_request_header(Header.decode(self._buffer))
            del self._buffer[:HEADER_SIZE]
        header = self._header
        payload = None
        if header.type == RequestType.WRITE:
            if len(self._buffer) < header.len:
                return NEED_DATA
            if len(self._buffer) == header.len:  # the usual case: one copy, not two
                payload = bytes(self._buffer)
                self._buffer.clear()
            else:
                payload = bytes(self._buffer[: header.len])
                del self._buffer[: header.len]
        self._header = None
        flags = _FLAGS.get(header.flags)
        if flags is None:
            flags = _FLAGS[header.flags] = Flag(header.flags)
        request = Request(header.seq, _REQUEST_TYPES[header.type], flags, header.sector, header.len, payload)
        self._outstanding[header.seq] = request
        return request

    def _check_request_header(self, header: Header) -> Header:
        if header.type not in _REQUEST_TYPES:
            raise ProtocolError("type", header.type, "unknown request type")
        if header.flags & ~ALL_FLAGS:
            raise ProtocolError("flags", header.flags, f"unknown flag bits {header.flags & ~ALL_FLAGS:#x}")
        if header.seq in self._outstanding:
            raise ProtocolError("seq", header.seq, "a request with this seq is still outstanding")
        if header.len % SECTOR_SIZE:
            raise ProtocolError("len", header.len, f"not a multiple of the {SECTOR_SIZE}-byte sector")
        if header.type in (RequestType.READ, RequestType.WRITE) and header.len > self.max_io:
            raise ProtocolError("len", header.len, f"larger than the {self.max_io}-byte I/O limit")
        if header.sector > _U64_MAX // SECTOR_SIZE or header.sector * SECTOR_SIZE + header.len > _U64_MAX:
            raise ProtocolError("sector", header.sector, "the request's end lies beyond 2**64 bytes")
        return header

    def send_response(self, response: Response) -> list:
        """Answer a request; return the buffers to write, in order.

        The header echoes the request's flags, sector and len (as snapuserd
        does). A successful READ answer is two buffers, header then payload,
        so a caller can hand both to ``writev``/``sendmsg`` without joining.
        """
        request = self._outstanding.get(response.seq)
        if request is None:
            raise ProtocolError("seq", response.seq, "no outstanding request has this seq")
        kind = _RESPONSE_TYPES.get(response.type)
        if kind is None:
            raise ProtocolError("type", response.type, "unknown response type")
        # Count bytes, not items (an array('I') or a cast memoryview is fine).
        size = None if response.payload is None else memoryview(response.payload).nbytes
        if kind == ResponseType.SUCCESS and request.type == RequestType.READ:
            if size != request.len:
                raise ProtocolError(
                    "payload", size, f"a READ response must carry exactly {request.len} bytes"
                )
        elif size:
            raise ProtocolError(
                "payload", size, f"a {kind.name} response to {request.type.name} carries no payload"
            )
        del self._outstanding[response.seq]
        header = _pack_header(request.seq, kind, request.flags, request.sector, request.len)
        if kind == ResponseType.SUCCESS and request.type == RequestType.READ:
            return [header, response.payload]
        return [header]
