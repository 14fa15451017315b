"""The dm-user message: a 40-byte little-endian header, then the payload.

The message types are named tuples: immutable like the events of h11, and
built several times per block I/O, where a frozen dataclass costs three
times as much to construct.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from dmuserd.protocol._constants import HEADER_SIZE, SECTOR_SIZE, Flag, RequestType, ResponseType
from dmuserd.protocol._errors import ProtocolError

if TYPE_CHECKING:
    from dmuserd.protocol._shm import Buffer

#: The header's layout (seq, type, flags, sector, len: five little-endian
#: u64), the one definition in the tree: every codec of the header, the
#: kernel model's, the dm-user channel reader's and the nbdkit plugin's,
#: packs and unpacks with it.
HEADER_STRUCT = struct.Struct("<5Q")
assert HEADER_STRUCT.size == HEADER_SIZE
_pack_header = HEADER_STRUCT.pack
_unpack_header = HEADER_STRUCT.unpack_from


class Header(NamedTuple):
    """The five u64 fields, raw: ``type`` is an int so that any header decodes."""

    seq: int
    type: int
    flags: int
    sector: int
    len: int

    def encode(self) -> bytes:
        try:
            return _pack_header(*self)
        except struct.error as exc:
            raise ProtocolError("header", self, f"a field does not fit in a u64 ({exc})") from None

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> "Header":
        """Decode the first 40 bytes of ``data``."""
        if len(data) < HEADER_SIZE:
            raise ProtocolError("header", len(data), f"truncated: {len(data)} of {HEADER_SIZE} bytes")
        return cls._make(_unpack_header(data))


_T = TypeVar("_T", bound=tuple[object, ...])

try:
    from dmuserd.protocol._records import new_message as new_message
except ImportError:  # built without a C compiler

    def new_message(cls: type[_T], /, *fields: object) -> _T:
        """``cls(*fields)`` for a :class:`Request` or :class:`Response` on an I/O path.

        A NamedTuple's constructor is a Python function in front of
        ``tuple.__new__``, which itself builds a plain tuple first and copies
        it; the C module (``protocol/_records.c``) builds the instance in one
        call, ~1.2k instructions less per message. Every request of every
        export builds one of each.
        """
        return tuple.__new__(cls, fields)


class Request(NamedTuple):
    """A kernel → daemon request. ``payload`` is set for WRITE only (a view of its slot on a slotted channel)."""

    seq: int
    type: RequestType
    flags: Flag
    sector: int
    len: int
    payload: bytes | memoryview | None = None

    @property
    def offset(self) -> int:
        """Byte offset on the device."""
        return self.sector * SECTOR_SIZE

    @property
    def header(self) -> Header:
        return Header(self.seq, int(self.type), int(self.flags), self.sector, self.len)

    def encode(self) -> bytes:
        """Header and payload as the kernel would send them."""
        head = self.header.encode()
        return head + self.payload if self.payload is not None else head


class OversizedRequest(NamedTuple):
    """A READ or WRITE longer than the connection's ``max_io``: answer it with ERROR.

    The kernel has no I/O size limit (large O_DIRECT or io_uring I/O), the
    daemon's buffers do. Such a request ends neither the channel nor the
    stream: the connection hands it out, outstanding like any request, once
    the whole message is in (a WRITE's payload is dropped as it streams in,
    never buffered), and the daemon answers ERROR (or UNSUPPORTED) for this
    one request. SUCCESS is refused: the data was never kept.
    """

    seq: int
    type: RequestType
    flags: Flag
    sector: int
    len: int

    @property
    def offset(self) -> int:
        """Byte offset on the device."""
        return self.sector * SECTOR_SIZE


class Response(NamedTuple):
    """A daemon → kernel response. ``payload`` is set for a successful READ only.

    The payload is a bytes-like object, or a list of them that together are
    the data (scatter-gather: sent one after the other, never joined).
    """

    seq: int
    type: ResponseType = ResponseType.SUCCESS
    payload: Buffer | list[Buffer] | None = None

    def header(self, length: int) -> Header:
        return Header(self.seq, int(self.type), 0, 0, length)
