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

A READ or WRITE longer than ``max_io`` breaks nothing: the kernel has no
I/O size limit, only the daemon's buffers have one. It comes out as an
:class:`OversizedRequest`, which the daemon answers with ERROR; a WRITE's
payload is dropped as it streams in, never buffered.

Where the stream is decides what :meth:`DaemonConnection.next_event` does:

========  ===================================  =============================================
state     the bytes it takes                   what follows
========  ===================================  =============================================
HEADER    a 40-byte header                     a :class:`Request` (any type but WRITE);
                                               PAYLOAD (a WRITE); DISCARD (an oversized
                                               WRITE); an :class:`OversizedRequest` (an
                                               oversized READ)
PAYLOAD   the WRITE's ``len`` bytes, kept      a :class:`Request` carrying them; HEADER
DISCARD   the oversized WRITE's ``len``        an :class:`OversizedRequest`; HEADER
          bytes, dropped as they arrive
========  ===================================  =============================================

(PAYLOAD is ``_header`` set, DISCARD is ``_oversized`` set, HEADER neither.)

Given a :class:`~dmuserd.protocol.SlotPool` (``pool=``), the connection
speaks the slotted framing of :mod:`dmuserd.protocol._shm`: each header is
followed by a slot word; a WRITE with a slot comes out complete at once, its
``payload`` a view of the slot (valid until it is answered), and the
answer to a READ with a slot is the header alone, its data in the slot:
:meth:`DaemonConnection.destination` gives the READ's slot, for the
backend to read into (then the answer's data *is* that view and nothing
is copied), and any other answer data is copied into the slot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

from dmuserd.protocol._constants import (
    ALL_FLAGS,
    HEADER_SIZE,
    SECTOR_SIZE,
    Flag,
    RequestType,
    ResponseType,
)
from dmuserd.protocol._errors import ProtocolError
from dmuserd.protocol._message import (
    Header,
    OversizedRequest,
    Request,
    Response,
    _pack_header,
    _unpack_header,
)
from dmuserd.protocol._shm import NO_SLOT, SLOT_STRUCT, SlotPool

if TYPE_CHECKING:
    from dmuserd.protocol._shm import Buffer

#: A header's fields as unpacked: seq, type, flags, sector, len.
_Fields: TypeAlias = "tuple[int, int, int, int, int]"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`DaemonConnection.next_event` when more bytes are needed.
NEED_DATA = _NeedData()

#: Largest READ/WRITE the daemon serves by default (the NBD export's maximum
#: block size). A longer one is an :class:`OversizedRequest`, not an error:
#: the kernel sets no limit (one O_DIRECT BIO may span hundreds of MiB).
DEFAULT_MAX_IO = 32 * 1024 * 1024

_U64_MAX = (1 << 64) - 1
_MAX_SECTOR = _U64_MAX // SECTOR_SIZE

# Enum lookups by table: calling an enum class costs more than the rest of a
# request's decoding, and this runs once per block I/O.
_REQUEST_TYPES = {int(t): t for t in RequestType}
_RESPONSE_TYPES = {int(t): t for t in ResponseType}
_FLAGS: dict[int, Flag] = {}
_READ, _WRITE, _SUCCESS = RequestType.READ, RequestType.WRITE, ResponseType.SUCCESS
_IO_TYPES = (int(_READ), int(_WRITE))
_UNKNOWN_FLAGS = ~ALL_FLAGS
_OVERSIZED = OversizedRequest
_unpack_slot = SLOT_STRUCT.unpack_from


def _size(payload: Buffer | list[Buffer]) -> int:
    """A payload's size in bytes, not items (an array('I') or a cast memoryview is fine)."""
    if type(payload) is bytes:
        return len(payload)
    if isinstance(payload, list):
        return sum(memoryview(piece).nbytes for piece in payload)
    return memoryview(payload).nbytes


def _flag(flags: int) -> Flag:
    """The :class:`Flag` of a header's flags, built once per distinct value."""
    flag = _FLAGS.get(flags)
    if flag is None:
        flag = _FLAGS[flags] = Flag(flags)
    return flag


class DaemonConnection:
    """One channel's protocol state on the daemon side."""

    def __init__(self, *, max_io: int = DEFAULT_MAX_IO, pool: SlotPool | None = None) -> None:
        self.max_io = max_io
        if pool is not None and pool.slot_size > max_io:
            raise ValueError(f"slots of {pool.slot_size} bytes exceed max_io={max_io}")
        self._pool = pool
        # Bytes before a request's payload: the header, and a slotted channel's slot word.
        self._frame = HEADER_SIZE if pool is None else HEADER_SIZE + SLOT_STRUCT.size
        # seq -> (slot, its view for the request), for slotted requests handed out and not answered.
        self._slots: dict[int, tuple[int, memoryview]] = {}
        self._buffer = bytearray()
        # A WRITE's payload that arrived as one immutable bytes, kept as it is
        # (the model and our FUSE export hand over payloads that way).
        self._whole_payload: bytes | None = None
        self._header: _Fields | None = None  # PAYLOAD: the fields of a header whose payload is due
        self._oversized: _Fields | None = None  # DISCARD: the fields of an oversized request
        self._discard = 0  # DISCARD: bytes of its payload still to drop
        # seq -> the request it answers, for requests handed out and not answered.
        self._outstanding: dict[int, Request | OversizedRequest] = {}

    @property
    def outstanding(self) -> int:
        """Requests handed out by :meth:`next_event` and not yet answered."""
        return len(self._outstanding)

    @property
    def need_bytes(self) -> int:
        """Bytes still missing for the next request, as far as known (at least 1).

        A transport that reads exactly what is needed (the kernel model, a
        channel read into a fixed buffer) asks for this much next. While an
        oversized WRITE's payload is dropped it is at most ``max_io``, so
        such a transport holds one bounded piece at a time.
        """
        if self._oversized is not None:
            return max(min(self._discard, self.max_io), 1)
        if self._header is None:
            return max(self._frame - len(self._buffer), 1)
        if self._whole_payload is not None:
            return 1
        return max(self._header[4] - len(self._buffer), 1)  # the header's len

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into a request."""
        return len(self._buffer) + (0 if self._whole_payload is None else len(self._whole_payload))

    def receive_data(self, data: Buffer) -> None:
        """Add bytes read from the channel (any chunk size, including empty)."""
        if self._discard:
            data = self._drop(data)
        header = self._header
        if (header is not None and not self._buffer and self._whole_payload is None and type(data) is bytes
                and len(data) == header[4]):
            self._whole_payload = data  # exactly the payload due: no copy in, none out
            return
        self._buffer += data

    def _drop(self, data: Buffer) -> memoryview:
        """DISCARD: drop what ``data`` holds of the oversized payload; return the bytes after it."""
        view = memoryview(data).cast("B")
        dropped = min(len(view), self._discard)
        self._discard -= dropped
        return view[dropped:]

    def next_event(self) -> Request | OversizedRequest | _NeedData:
        """Return the next complete :class:`Request` or :class:`OversizedRequest`, or :data:`NEED_DATA`."""
        if self._oversized is not None:
            return NEED_DATA if self._discard else self._hand_out_oversized()
        buffer = self._buffer
        header = self._header
        if header is None:
            frame = self._frame
            if len(buffer) < frame:
                return NEED_DATA
            header = self._header_fields(buffer)
            seq, rtype, flags, sector, length = header
            slot = NO_SLOT if frame == HEADER_SIZE else _unpack_slot(buffer, HEADER_SIZE)[0]
            # The checks of _check_request_header, as one test for the good case.
            if (rtype not in _REQUEST_TYPES or flags & _UNKNOWN_FLAGS or seq in self._outstanding
                    or length % SECTOR_SIZE or (length > self.max_io and rtype in _IO_TYPES)
                    or sector > _MAX_SECTOR or sector * SECTOR_SIZE + length > _U64_MAX):
                self._check_request_header(Header._make(header))  # returns only if merely oversized
                if slot != NO_SLOT:
                    self._slot_pool().take(slot, rtype, length)  # refuses: longer than max_io, so than a slot
                del buffer[:frame]
                return self._begin_oversized(header)
            del buffer[:frame]
            if slot != NO_SLOT:
                return self._slotted(header, slot)
            self._header = header
        seq, rtype, flags, sector, length = header
        payload: bytes | None = None
        if rtype == _WRITE:
            if self._whole_payload is not None:
                payload, self._whole_payload = self._whole_payload, None
            elif len(buffer) < length:
                return NEED_DATA
            elif len(buffer) == length:  # one copy, not two
                payload = bytes(buffer)
                buffer.clear()
            else:
                payload = bytes(buffer[:length])
                del buffer[:length]
        self._header = None
        request = Request(seq, _REQUEST_TYPES[rtype], _flag(flags), sector, length, payload)
        self._outstanding[seq] = request
        return request

    def _slotted(self, header: _Fields, slot: int) -> Request:
        """A request whose data is in (or goes to) ``slot``: complete with its header."""
        seq, rtype, flags, sector, length = header
        view = self._slot_pool().take(slot, rtype, length)
        request = Request(seq, _REQUEST_TYPES[rtype], _flag(flags), sector, length,
                          view if rtype == _WRITE else None)
        self._slots[seq] = (slot, view)
        self._outstanding[seq] = request
        return request

    def destination(self, request: Request) -> memoryview | None:
        """Where a READ's data goes without a copy: its slot (``len`` bytes), or None.

        None for a request that names no slot, or that is not a READ. A
        daemon that fills this view and answers with it as the data (the
        very object) sends the answer with no copy of the data at all.
        """
        if self._slots and request.type == _READ:
            held = self._slots.get(request.seq)
            if held is not None:
                return held[1]
        return None

    def _slot_pool(self) -> SlotPool:
        """The pool (called only where a slot word named a slot, so there is one)."""
        pool = self._pool
        assert pool is not None
        return pool

    def close(self) -> None:
        """The channel ended: free the slots of requests that will never be answered."""
        for slot, _view in self._slots.values():
            self._slot_pool().release(slot)
        self._slots.clear()

    @staticmethod
    def _header_fields(buffer: bytearray) -> _Fields:
        fields: _Fields = _unpack_header(buffer)  # five u64 by the struct's format
        return fields

    def _begin_oversized(self, header: _Fields) -> Request | OversizedRequest | _NeedData:
        """An oversized READ is handed out now; an oversized WRITE once its payload is dropped."""
        self._oversized = header
        if header[1] == _WRITE:
            buffer = self._buffer
            dropped = min(len(buffer), header[4])
            del buffer[:dropped]
            self._discard = header[4] - dropped
        return self.next_event()

    def _hand_out_oversized(self) -> OversizedRequest:
        assert self._oversized is not None  # DISCARD
        seq, rtype, flags, sector, length = self._oversized
        self._oversized = None
        event = OversizedRequest(seq, _REQUEST_TYPES[rtype], _flag(flags), sector, length)
        self._outstanding[seq] = event
        return event

    def _check_request_header(self, header: Header) -> None:
        """Raise :class:`ProtocolError` naming the first field the daemon cannot take.

        Returns if the header is sound and only longer than ``max_io``.
        """
        if header.type not in _REQUEST_TYPES:
            raise ProtocolError("type", header.type, "unknown request type")
        if header.flags & ~ALL_FLAGS:
            raise ProtocolError("flags", header.flags, f"unknown flag bits {header.flags & ~ALL_FLAGS:#x}")
        if header.seq in self._outstanding:
            raise ProtocolError("seq", header.seq, "a request with this seq is still outstanding")
        if header.len % SECTOR_SIZE:
            raise ProtocolError("len", header.len, f"not a multiple of the {SECTOR_SIZE}-byte sector")
        if header.sector > _MAX_SECTOR or header.sector * SECTOR_SIZE + header.len > _U64_MAX:
            raise ProtocolError("sector", header.sector, "the request's end lies beyond 2**64 bytes")
        if header.type in _IO_TYPES and header.len > self.max_io:
            return  # an OversizedRequest
        raise AssertionError(f"no check refused {header}")  # the fast test and these disagree

    def send_response(self, response: Response) -> list[Buffer]:
        """Answer a request; return the buffers to write, in order.

        The header echoes the request's flags, sector and len (as snapuserd
        does). A successful READ answer is two buffers, header then payload,
        so a caller can hand both to ``writev``/``sendmsg`` without joining;
        a payload given as a list of buffers is a header then each buffer.
        """
        seq, rtype, payload = response
        request = self._outstanding.get(seq)
        if request is None:
            raise ProtocolError("seq", seq, "no outstanding request has this seq")
        kind = _RESPONSE_TYPES.get(rtype)
        if kind is None:
            raise ProtocolError("type", rtype, "unknown response type")
        if kind == _SUCCESS and type(request) is _OVERSIZED:
            raise ProtocolError("type", rtype, f"the {request.type.name} was {request.len} bytes, over the "
                                               f"{self.max_io}-byte limit: it can only be answered with ERROR")
        if kind == _SUCCESS and request.type == _READ:
            size = None if payload is None else _size(payload)
            if payload is None or size != request.len:
                raise ProtocolError("payload", size, f"a READ response must carry exactly {request.len} bytes")
            del self._outstanding[seq]
            header = _pack_header(seq, kind, request.flags, request.sector, request.len)
            if self._slots and (held := self._slots.pop(seq, None)) is not None:
                slot, view = held
                pool = self._slot_pool()
                if payload is not view:  # not read into its destination: copy it there
                    pool.fill(slot, payload)
                pool.release(slot)
                return [header]
            return [header, *payload] if isinstance(payload, list) else [header, payload]
        if payload is not None and (size := _size(payload)):
            raise ProtocolError("payload", size, f"a {kind.name} response to {request.type.name} carries no payload")
        del self._outstanding[seq]
        if self._slots and (held := self._slots.pop(seq, None)) is not None:
            self._slot_pool().release(held[0])
        return [_pack_header(seq, kind, request.flags, request.sector, request.len)]
