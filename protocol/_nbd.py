"""The server side of the NBD protocol, sans I/O (in the style of h11).

The daemon's own NBD export (``--export nbd:WHERE,server=dmuserd``,
:mod:`dmuserd.daemon.nbd_server`) speaks NBD through this module: feed it
the bytes read from a client with :meth:`NbdServerConnection.receive_data`,
take typed events out with :meth:`NbdServerConnection.next_event`, write
what :meth:`NbdServerConnection.data_to_send` returns (the handshake's
answers) and, for each request, its reply (below: simple, or structured
chunks once negotiated) followed by a READ's data. It does no I/O and keeps
no clock.

::

    conn = NbdServerConnection(size, TransmissionFlag.SEND_FLUSH)
    sock.send(conn.data_to_send())           # the greeting
    conn.receive_data(chunk)
    while (event := conn.next_event()) is not NEED_DATA:
        sock.send(conn.data_to_send())       # option replies, if any
        ...                                  # NbdRequest: serve it; NbdRefused: reply its error

What is served (the spec: NetworkBlockDevice/nbd ``doc/proto.md``): the
fixed newstyle handshake (client flags FIXED_NEWSTYLE and NO_ZEROES),
options NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO (answered with
NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE), NBD_OPT_LIST, NBD_OPT_ABORT,
NBD_OPT_STRUCTURED_REPLY and, once structured replies are on,
NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT with the one context
``base:allocation``; every other option gets NBD_REP_ERR_UNSUP
(NBD_OPT_STARTTLS: NBD_REP_ERR_POLICY; extended headers stay unsupported).
Any export name is accepted (the export has one device); LIST names the
one export.

Replies. Without NBD_OPT_STRUCTURED_REPLY every reply is a simple one
(:func:`simple_reply`, a READ's data after it). With it
(:attr:`NbdServerConnection.structured`), a READ's data follows one final
OFFSET_DATA chunk (:func:`data_chunk`: always one chunk, so
NBD_FLAG_SEND_DF is advertised and NBD_CMD_FLAG_DF holds as it is; no
OFFSET_HOLE chunks), an error is a final ERROR chunk carrying its reason
(:meth:`NbdServerConnection.error_reply` picks the form negotiated), a
BLOCK_STATUS is answered by :func:`block_status_chunk`, and other
successes stay simple replies (the spec allows either). NBD_CMD_FLAG_FAST_ZERO
is accepted on WRITE_ZEROES where the caller advertises
NBD_FLAG_SEND_FAST_ZERO (the caller answers ENOTSUP where the zeroing
would not be fast); NBD_CMD_FLAG_FUA on any command where
NBD_FLAG_SEND_FUA is advertised (nothing to persist for a READ: ignored);
NBD_CMD_BLOCK_STATUS (flag REQ_ONE) only once ``base:allocation`` was
selected for the export name the client then chose (EINVAL otherwise).

Where the stream is decides what :meth:`NbdServerConnection.next_event` does:

============  ===================================  ==========================================
state         the bytes it takes                   what follows
============  ===================================  ==========================================
CLIENT_FLAGS  the 4-byte client flags              OPTIONS
OPTIONS       a 16-byte option header and its      OPTIONS (answers queued in data_to_send);
              data (at most MAX_OPTION_DATA)       TRANSMISSION (EXPORT_NAME, GO: an
                                                   :class:`NbdNegotiated`); CLOSED (ABORT:
                                                   :class:`NbdDisconnect`)
TRANSMISSION  a 28-byte request                    an :class:`NbdRequest` (no payload) or
                                                   :class:`NbdRefused`; PAYLOAD (a WRITE
                                                   within limits); DISCARD (a WRITE refused
                                                   or over MAX_PAYLOAD); CLOSED (DISC:
                                                   :class:`NbdDisconnect`)
PAYLOAD       the WRITE's ``length`` bytes, kept   an :class:`NbdRequest` carrying them;
                                                   TRANSMISSION
DISCARD       the refused WRITE's bytes, dropped   an :class:`NbdRefused`; TRANSMISSION
              as they arrive
CLOSED        nothing more                         :data:`NEED_DATA` (bytes are dropped)
============  ===================================  ==========================================

Hostile input. A request the connection can answer (an unknown command,
unknown or unadvertised flags, a range past the end, unaligned to the
minimum block size, longer than :data:`MAX_PAYLOAD`, a write to a
read-only export) becomes an :class:`NbdRefused` carrying the NBD error
the spec asks for (EINVAL; ENOSPC for a write past the end; EOVERFLOW over
the payload limit; EPERM read-only): that request fails, the stream goes
on. A malformed option (a META_CONTEXT request whose
lengths do not add up, a string over 4096 bytes) is answered
NBD_REP_ERR_INVALID with a message naming what is wrong, and the handshake
goes on. What loses the framing (a bad magic, an option over
:data:`MAX_OPTION_DATA`, unknown client flags) raises :class:`NbdProtocolError` naming the field, its value
and the stream offset: the caller ends that connection.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from typing import NamedTuple

from dmuserd.protocol._errors import ProtocolError

#: ``NBDMAGIC``, the first 8 bytes a server sends.
NBD_MAGIC = 0x4E42444D41474943
#: ``IHAVEOPT``: the greeting's second word and every option's magic.
IHAVEOPT = 0x49484156454F5054
#: The magic of an option reply.
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
#: The one metadata context served, and the id SET_META_CONTEXT gives it.
BASE_ALLOCATION = "base:allocation"
ALLOCATION_CONTEXT_ID = 1
#: Descriptors in one BLOCK_STATUS chunk at most (the spec: SHOULD NOT send more than 2**20).
MAX_EXTENTS = 1 << 20

#: Largest READ/WRITE payload served (the advertised maximum block size).
MAX_PAYLOAD = 32 * 1024 * 1024
#: Preferred block size advertised (or the minimum, if larger).
PREFERRED_BLOCK_SIZE = 4096
#: Longest option data accepted; a longer option ends the connection (a
#: GO with a 4096-byte name and many info requests fits many times).
MAX_OPTION_DATA = 64 * 1024
#: Taken bytes kept at the front of the receive buffer at most after a WRITE's payload is copied out (a
#: reader paused by its bounds would otherwise hold each payload twice: in the buffer and in the request).
COMPACT_MIN = 1024 * 1024
#: Largest string the spec allows (export names).
MAX_STRING = 4096

HANDSHAKE_FIXED_NEWSTYLE = 1 << 0
HANDSHAKE_NO_ZEROES = 1 << 1
_KNOWN_CLIENT_FLAGS = HANDSHAKE_FIXED_NEWSTYLE | HANDSHAKE_NO_ZEROES


class TransmissionFlag(enum.IntFlag):
    """What the export can do, sent with the export's size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Reply(enum.IntEnum):
    """Option reply types (errors have bit 31 set)."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_SHUTDOWN = (1 << 31) + 7


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(enum.IntFlag):
    """Flags of a structured reply chunk."""

    DONE = 1 << 0


class ChunkType(enum.IntEnum):
    """Structured reply chunk types (error chunks have bit 15 set)."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class AllocationFlag(enum.IntFlag):
    """The status flags of a ``base:allocation`` extent (0: allocated data)."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class NbdErrno(enum.IntEnum):
    """The error values of a reply (the spec's, fixed whatever the host's errno numbers)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class State(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    PAYLOAD = "payload"
    DISCARD = "discard"
    CLOSED = "closed"


class NbdProtocolError(ProtocolError):
    """Bytes that lose the NBD stream's framing: the connection must end.

    ``field`` and ``value`` name what was wrong, ``position`` is the byte
    offset in the client's stream where the offending message starts.
    """

    def __init__(self, field: str, value: object, position: int, message: str) -> None:
        super().__init__(field, value, message)
        self.args = (f"NBD protocol error in {field}={value!r} at stream offset {position}: {message}",)
        self.position = position


class NbdNegotiated(NamedTuple):
    """The handshake is over: transmission begins (``name`` the export the client asked for)."""

    name: str
    no_zeroes: bool


class NbdRequest(NamedTuple):
    """A request to serve (its range checked). ``payload`` is set for WRITE only."""

    cookie: int
    command: Command
    flags: int
    offset: int
    length: int
    payload: bytes | None = None


class NbdRefused(NamedTuple):
    """A request answered with ``error`` without reaching the device; ``reason`` says why."""

    cookie: int
    command: int
    offset: int
    length: int
    error: NbdErrno
    reason: str


class NbdDisconnect(NamedTuple):
    """The client ended the session (NBD_CMD_DISC or NBD_OPT_ABORT)."""

    reason: str


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`NbdServerConnection.next_event` when more bytes are needed.
NEED_DATA = _NeedData()

_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
_DATA_CHUNK = struct.Struct(">IHHQIQ")  # ... and the data's offset
_ERROR_CHUNK = struct.Struct(">IHHQIIH")  # ... and the error, the message's length
_STATUS_CHUNK = struct.Struct(">IHHQII")  # ... and the context id
_DESCRIPTOR = struct.Struct(">II")
_unpack_request = _REQUEST.unpack_from
_pack_reply = _REPLY.pack
_pack_data_chunk = _DATA_CHUNK.pack
_DONE = int(ReplyFlag.DONE)
_FUA, _DF = int(CommandFlag.FUA), int(CommandFlag.DF)
_OFFSET_DATA = int(ChunkType.OFFSET_DATA)

_COMMANDS = {int(c): c for c in Command}
#: Command flags each command may carry (others are EINVAL), before the export's own limits.
_ALLOWED_FLAGS = {
    Command.READ: int(CommandFlag.DF),
    Command.WRITE_ZEROES: int(CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO),
    Command.BLOCK_STATUS: int(CommandFlag.REQ_ONE),
}
#: What a flag needs besides: the transmission flag advertised (DF: structured replies, checked apart).
_FLAG_NEEDS = (
    (int(CommandFlag.FUA), TransmissionFlag.SEND_FUA),
    (int(CommandFlag.FAST_ZERO), TransmissionFlag.SEND_FAST_ZERO),
)
#: The transmission flag that must be advertised for a command to be sent.
_NEEDS = {
    Command.FLUSH: TransmissionFlag.SEND_FLUSH,
    Command.TRIM: TransmissionFlag.SEND_TRIM,
    Command.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
    Command.CACHE: TransmissionFlag.SEND_CACHE,
}
#: Commands that change data: refused on a read-only export, ENOSPC past the end.
_WRITING = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
#: Commands whose range is checked against the size and the block size.
_RANGED = frozenset({Command.READ, Command.WRITE, Command.TRIM, Command.WRITE_ZEROES, Command.CACHE,
                     Command.BLOCK_STATUS})
_READ, _WRITE, _DISC = Command.READ, Command.WRITE, Command.DISC


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """The 16-byte simple reply to request ``cookie`` (a successful READ's data follows it)."""
    return _pack_reply(SIMPLE_REPLY_MAGIC, error, cookie)


def data_chunk(cookie: int, offset: int, length: int) -> bytes:
    """The 28-byte header of a READ's one and final OFFSET_DATA chunk; its ``length`` bytes of data follow it."""
    return _pack_data_chunk(STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, cookie, 8 + length, offset)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    """A final ERROR chunk: ``error`` (nonzero) and ``message`` for a human (cut to 4096 bytes of UTF-8)."""
    if not error:
        raise ValueError("an ERROR chunk needs a nonzero error")
    text = message.encode("utf-8", "replace")[:MAX_STRING].decode("utf-8", "ignore").encode()
    return _ERROR_CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE, ChunkType.ERROR, cookie, 6 + len(text), error,
                             len(text)) + text


def block_status_chunk(cookie: int, context_id: int, extents: Iterable[tuple[int, int]], length: int,
                       req_one: bool = False) -> bytes:
    """The final BLOCK_STATUS chunk answering a query of ``length`` bytes for ``context_id``.

    ``extents`` are consecutive (length, status flags) pairs from the query's
    offset; what lies past ``length`` is cut off (the last descriptor is cut
    at the end), empty ones are skipped, and at most :data:`MAX_EXTENTS`
    descriptors go (one with ``req_one``, NBD_CMD_FLAG_REQ_ONE). Consecutive
    extents of one status are merged. ValueError if none is left: a reply
    must describe at least one byte.
    """
    descriptors: list[list[int]] = []
    covered = 0
    for size, status in extents:
        size = min(size, length - covered)
        if size <= 0:
            if covered >= length:
                break
            continue
        if descriptors and descriptors[-1][1] == status:
            descriptors[-1][0] += size
        elif len(descriptors) == (1 if req_one else MAX_EXTENTS):
            break
        else:
            descriptors.append([size, status])
        covered += size
    if not descriptors:
        raise ValueError(f"no extent describes any of the {length} bytes asked for")
    head = _STATUS_CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE, ChunkType.BLOCK_STATUS, cookie,
                              4 + 8 * len(descriptors), context_id)
    return head + b"".join(_DESCRIPTOR.pack(size, status) for size, status in descriptors)


_ALLOCATION = BASE_ALLOCATION.encode()


def _meta_request(data: bytes) -> tuple[str, list[bytes]] | str:
    """(export name, queries) of a LIST/SET_META_CONTEXT request, or what is wrong with it.

    The layout: u32 name length, the name, u32 query count, then per query
    a u32 length and the query; every length within the option's data, no
    string over :data:`MAX_STRING` bytes, nothing left over.
    """
    if len(data) < 8:
        return f"{len(data)} bytes, fewer than the 8 of the name length and the query count"
    (name_length,) = _U32.unpack_from(data)
    if name_length > MAX_STRING:
        return f"export name length {name_length} over {MAX_STRING}"
    at = 4 + name_length
    if len(data) < at + 4:
        return f"export name length {name_length} runs past the option's {len(data)} bytes"
    (count,) = _U32.unpack_from(data, at)
    at += 4
    if count > (len(data) - at) // 4:
        return f"{count} queries cannot fit in the {len(data) - at} bytes after the count"
    queries = []
    for number in range(count):
        if len(data) - at < 4:
            return f"query {number} of {count}: its length (at byte {at}) runs past the option's data"
        (length,) = _U32.unpack_from(data, at)
        if length > MAX_STRING:
            return f"query {number} of {count} (at byte {at}): length {length} over {MAX_STRING}"
        if at + 4 + length > len(data):
            return f"query {number} of {count} (at byte {at}): length {length} runs past the option's data"
        queries.append(data[at + 4:at + 4 + length])
        at += 4 + length
    if at != len(data):
        return f"{len(data) - at} bytes after the last query"
    return data[4:4 + name_length].decode("utf-8", "replace"), queries


class NbdServerConnection:
    """One client connection's protocol state on the server side (see the module doc)."""

    def __init__(self, size: int, flags: TransmissionFlag | int = 0, *, block_size: int = 512,
                 export_name: str = "", description: str = "") -> None:
        if block_size < 1 or block_size & (block_size - 1) or block_size > 64 * 1024:
            raise ValueError(f"block_size {block_size} is not a power of two up to 64 KiB")
        self.size = size
        self.flags = TransmissionFlag(int(flags)) | TransmissionFlag.HAS_FLAGS
        self.block_size = block_size
        self.export_name = export_name
        self.description = description
        self.state = State.CLIENT_FLAGS
        self.no_zeroes = False
        self._buffer = bytearray()
        self._start = 0  # the first unread byte of _buffer
        self._consumed = 0  # bytes taken out of the stream before _buffer[_start]
        self._out = bytearray(_GREETING.pack(NBD_MAGIC, IHAVEOPT, HANDSHAKE_FIXED_NEWSTYLE | HANDSHAKE_NO_ZEROES))
        self._pending: tuple[int, int, int, int, int] | None = None  # PAYLOAD/DISCARD: the WRITE's fields
        self._refusal: tuple[NbdErrno, str] | None = None  # DISCARD: why
        self._discard = 0  # DISCARD: payload bytes still to drop
        self._read_only = bool(self.flags & TransmissionFlag.READ_ONLY)
        self._mask = block_size - 1
        if self.flags & TransmissionFlag.SEND_FAST_ZERO and not self.flags & TransmissionFlag.SEND_WRITE_ZEROES:
            raise ValueError("SEND_FAST_ZERO without SEND_WRITE_ZEROES (the spec forbids it)")
        #: NBD_OPT_STRUCTURED_REPLY was negotiated: READs are answered in chunks, errors with a message.
        self.structured = False
        #: The id of ``base:allocation`` if the client selected it (NBD_CMD_BLOCK_STATUS is served), else None.
        self.allocation_context: int | None = None
        self._context_export: str | None = None  # the export name SET_META_CONTEXT selected it for

    # -- bytes in, bytes out ------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read from the client (any chunk size, including empty)."""
        if self.state is State.CLOSED:
            return
        if self._discard:
            view = memoryview(data).cast("B")
            dropped = min(len(view), self._discard)
            self._discard -= dropped
            self._consumed += dropped
            data = view[dropped:]
        self._buffer += data

    def data_to_send(self) -> bytes:
        """Handshake bytes to write now (the greeting, option replies); empty when none."""
        out, self._out = bytes(self._out), bytearray()
        return out

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into an event."""
        return len(self._buffer) - self._start

    @property
    def in_transmission(self) -> bool:
        return self.state in (State.TRANSMISSION, State.PAYLOAD, State.DISCARD)

    @property
    def transmission_flags(self) -> TransmissionFlag:
        """The flags sent with the export: the caller's, and SEND_DF once structured replies are on."""
        return self.flags | TransmissionFlag.SEND_DF if self.structured else self.flags

    def error_reply(self, cookie: int, error: int, message: str) -> bytes:
        """The reply failing request ``cookie`` in the form negotiated: an ERROR chunk carrying ``message``
        (structured replies), else a simple reply (the message goes nowhere)."""
        return error_chunk(cookie, error, message) if self.structured else _pack_reply(SIMPLE_REPLY_MAGIC, error, cookie)

    def _take(self, n: int) -> int:
        """Where the next ``n`` buffered bytes start in ``_buffer`` (now taken), or -1 if they are not all in."""
        start = self._start
        if len(self._buffer) - start < n:
            if start:
                del self._buffer[:start]  # what was taken goes; the rest moves to the front
                self._start = 0
            return -1
        self._start = start + n
        self._consumed += n
        return start

    # -- events ------------------------------------------------------------------------------

    def next_event(self) -> NbdRequest | NbdRefused | NbdNegotiated | NbdDisconnect | _NeedData:
        """The next event, or :data:`NEED_DATA`; raises :class:`NbdProtocolError` when the framing is lost."""
        state = self.state
        if state is State.TRANSMISSION:
            return self._request()
        if state is State.PAYLOAD:
            return self._payload()
        if state is State.DISCARD:
            return self._discarded()
        if state is State.OPTIONS:
            return self._option()
        if state is State.CLIENT_FLAGS:
            at = self._take(4)
            if at < 0:
                return NEED_DATA
            flags = _U32.unpack_from(self._buffer, at)[0]
            if flags & ~_KNOWN_CLIENT_FLAGS:
                self.state = State.CLOSED
                raise NbdProtocolError("client_flags", flags, 0, "unknown client flags (the spec says: close)")
            self.no_zeroes = bool(flags & HANDSHAKE_NO_ZEROES)
            self.state = State.OPTIONS
            return self._option()
        return NEED_DATA

    def _fail(self, field: str, value: object, position: int, message: str) -> NbdProtocolError:
        self.state = State.CLOSED
        self._buffer = bytearray()
        self._start = 0
        return NbdProtocolError(field, value, position, message)

    # -- options -----------------------------------------------------------------------------

    def _option(self) -> NbdNegotiated | NbdDisconnect | _NeedData:
        while True:
            position = self._consumed
            at = self._take(_OPTION.size)
            if at < 0:
                return NEED_DATA
            magic, option, length = _OPTION.unpack_from(self._buffer, at)
            if magic != IHAVEOPT:
                raise self._fail("option_magic", hex(magic), position, "not IHAVEOPT")
            if length > MAX_OPTION_DATA:
                raise self._fail("option_length", length, position,
                                 f"option {option} carries more than {MAX_OPTION_DATA} bytes")
            if len(self._buffer) - self._start < length:
                self._start -= _OPTION.size  # the header again, with its data
                self._consumed -= _OPTION.size
                self._take(_OPTION.size + length)  # (compacts)
                return NEED_DATA
            at = self._take(length)
            event = self._answer_option(option, bytes(self._buffer[at:at + length]), position)
            if event is not None:
                return event

    def _reply(self, option: int, reply: Reply, data: bytes = b"") -> None:
        self._out += _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data))
        self._out += data

    def _answer_option(self, option: int, data: bytes, position: int) -> NbdNegotiated | NbdDisconnect | None:
        if option == Option.EXPORT_NAME:
            if len(data) > MAX_STRING:
                raise self._fail("export_name", len(data), position, f"longer than {MAX_STRING} bytes")
            self._out += _EXPORT_NAME_REPLY.pack(self.size, self.transmission_flags)
            if not self.no_zeroes:
                self._out += bytes(124)
            return self._negotiated(data.decode("utf-8", "replace"))
        if option == Option.ABORT:
            self._reply(option, Reply.ACK)
            self.state = State.CLOSED
            return NbdDisconnect("NBD_OPT_ABORT")
        if option == Option.LIST:
            if data:
                self._reply(option, Reply.ERR_INVALID, b"NBD_OPT_LIST takes no data")
            else:
                encoded = self.export_name.encode()
                self._reply(option, Reply.SERVER, _U32.pack(len(encoded)) + encoded)
                self._reply(option, Reply.ACK)
            return None
        if option in (Option.INFO, Option.GO):
            chosen = self._info_request(data)
            if chosen is None:
                self._reply(option, Reply.ERR_INVALID, b"malformed request: u32 name length, name, "
                                                        b"u16 count, count u16 info types")
                return None
            self._reply(option, Reply.INFO, _INFO_EXPORT.pack(Info.EXPORT, self.size, self.transmission_flags))
            self._reply(option, Reply.INFO, _INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE, self.block_size, max(PREFERRED_BLOCK_SIZE, self.block_size), MAX_PAYLOAD))
            self._reply(option, Reply.ACK)
            if option == Option.GO:
                return self._negotiated(chosen)
            return None
        if option == Option.STRUCTURED_REPLY:
            if data:
                self._reply(option, Reply.ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
            else:
                self.structured = True
                self._reply(option, Reply.ACK)
            return None
        if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            self._meta_context(option, data)
            return None
        if option == Option.STARTTLS:
            self._reply(option, Reply.ERR_POLICY, b"TLS is not offered by this server")
            return None
        self._reply(option, Reply.ERR_UNSUP, b"option not supported")
        return None

    def _negotiated(self, name: str) -> NbdNegotiated:
        """Transmission begins for export ``name``: a context selected for another name is dropped."""
        if name != self._context_export:
            self.allocation_context = None
        self.state = State.TRANSMISSION
        return NbdNegotiated(name, self.no_zeroes)

    def _meta_context(self, option: int, data: bytes) -> None:
        """Answer LIST_META_CONTEXT / SET_META_CONTEXT: ``base:allocation`` is the one context there is."""
        setting = option == Option.SET_META_CONTEXT
        if setting:  # a SET replaces what an earlier one selected, even when it fails
            self.allocation_context = self._context_export = None
        name = Option(option).name
        if not self.structured:
            self._reply(option, Reply.ERR_INVALID, f"NBD_OPT_{name} needs NBD_OPT_STRUCTURED_REPLY first".encode())
            return
        parsed = _meta_request(data)
        if isinstance(parsed, str):
            self._reply(option, Reply.ERR_INVALID, f"malformed NBD_OPT_{name}: {parsed}".encode())
            return
        export, queries = parsed
        wanted = {_ALLOCATION} if setting else {_ALLOCATION, b"base:"}  # LIST: "base:" is the namespace's wildcard
        if (queries or setting) and wanted.isdisjoint(queries):
            self._reply(option, Reply.ACK)  # nothing known asked for (SET with no query selects nothing)
            return
        context_id = ALLOCATION_CONTEXT_ID if setting else 0  # LIST's ids are reserved: zero
        self._reply(option, Reply.META_CONTEXT, _U32.pack(context_id) + _ALLOCATION)
        self._reply(option, Reply.ACK)
        if setting:
            self.allocation_context = ALLOCATION_CONTEXT_ID
            self._context_export = export

    @staticmethod
    def _info_request(data: bytes) -> str | None:
        """The export name of an INFO/GO request, or None if malformed."""
        if len(data) < 6:
            return None
        (name_length,) = _U32.unpack_from(data)
        if name_length > MAX_STRING or len(data) < 4 + name_length + 2:
            return None
        (count,) = _U16.unpack_from(data, 4 + name_length)
        if len(data) != 4 + name_length + 2 + 2 * count:
            return None
        return data[4:4 + name_length].decode("utf-8", "replace")

    # -- transmission ------------------------------------------------------------------------

    def _request(self) -> NbdRequest | NbdRefused | NbdDisconnect | _NeedData:
        position = self._consumed
        at = self._take(28)
        if at < 0:
            return NEED_DATA
        magic, flags, kind, cookie, offset, length = _unpack_request(self._buffer, at)
        if magic != REQUEST_MAGIC:
            raise self._fail("request_magic", hex(magic), position, f"not {REQUEST_MAGIC:#x}")
        command = _COMMANDS.get(kind)
        if command is _READ and not flags and length <= MAX_PAYLOAD and not (offset | length) & self._mask \
                and offset + length <= self.size and length:
            return NbdRequest(cookie, command, 0, offset, length)  # the common case, checked at once
        refusal = self._check(command, kind, flags, offset, length)
        if command is _WRITE:
            if refusal is None:
                self._pending = (cookie, kind, flags, offset, length)
                self.state = State.PAYLOAD
                return self._payload()
            self._pending = (cookie, kind, flags, offset, length)
            self._refusal = refusal
            self.state = State.DISCARD
            have = len(self._buffer) - self._start
            dropped = min(have, length)
            self._start += dropped
            self._consumed += dropped
            self._discard = length - dropped
            return self._discarded()
        if refusal is not None:
            return NbdRefused(cookie, kind, offset, length, *refusal)
        if command is _DISC:
            self.state = State.CLOSED
            return NbdDisconnect("NBD_CMD_DISC")
        return NbdRequest(cookie, command, flags, offset, length)  # type: ignore[arg-type]

    def _check(self, command: Command | None, kind: int, flags: int, offset: int,
               length: int) -> tuple[NbdErrno, str] | None:
        """Why this request is refused (its NBD error and a reason), or None: it may be served."""
        if command is None or command is Command.RESIZE:
            return NbdErrno.EINVAL, f"unknown command {kind}"
        needed = _NEEDS.get(command)
        if needed is not None and not self.flags & needed:
            return NbdErrno.EINVAL, f"{command.name} was not advertised"
        if command is Command.BLOCK_STATUS and self.allocation_context is None:
            return NbdErrno.EINVAL, "BLOCK_STATUS without a metadata context negotiated (NBD_OPT_SET_META_CONTEXT)"
        if flags & ~(_ALLOWED_FLAGS.get(command, 0) | _FUA):
            return NbdErrno.EINVAL, f"flags {flags:#x} not valid for {command.name}"
        for flag, advertised in _FLAG_NEEDS:
            if flags & flag and not self.flags & advertised:
                return NbdErrno.EINVAL, f"{CommandFlag(flag).name} was not advertised"
        if flags & _DF and not self.structured:
            return NbdErrno.EINVAL, "DF without structured replies (NBD_FLAG_SEND_DF was not advertised)"
        if command in _WRITING and self._read_only:
            return NbdErrno.EPERM, "the export is read-only"
        if command is Command.FLUSH and (offset or length):
            return NbdErrno.EINVAL, f"FLUSH with offset {offset} and length {length} (both must be 0)"
        if command in _RANGED:
            if command in (_READ, _WRITE) and length > MAX_PAYLOAD:
                return NbdErrno.EOVERFLOW, f"length {length} exceeds the maximum payload {MAX_PAYLOAD}"
            if offset + length > self.size:
                return (NbdErrno.ENOSPC if command in _WRITING else NbdErrno.EINVAL,
                        f"range {offset}+{length} ends beyond the export size {self.size}")
            if (offset | length) & self._mask:
                return NbdErrno.EINVAL, f"range {offset}+{length} not aligned to the {self.block_size}-byte block size"
            if not length and command is not Command.CACHE:
                return NbdErrno.EINVAL, f"{command.name} of length 0"
        return None

    def _payload(self) -> NbdRequest | _NeedData:
        cookie, _, flags, offset, length = self._pending  # type: ignore[misc]
        at = self._take(length)
        if at < 0:
            return NEED_DATA
        self._pending = None
        self.state = State.TRANSMISSION
        with memoryview(self._buffer) as view:  # one copy (a bytearray slice, then bytes(), made two)
            payload = view[at:at + length].tobytes()
        if self._start >= COMPACT_MIN:  # the taken payload goes now, not when the next request is short
            del self._buffer[:self._start]
            self._start = 0
        return NbdRequest(cookie, _WRITE, flags, offset, length, payload)

    def _discarded(self) -> NbdRefused | _NeedData:
        if self._discard:
            return NEED_DATA
        cookie, kind, _, offset, length = self._pending  # type: ignore[misc]
        error, reason = self._refusal  # type: ignore[misc]
        self._pending = self._refusal = None
        self.state = State.TRANSMISSION
        return NbdRefused(cookie, kind, offset, length, error, reason)
