"""The dm-user message: a 40-byte little-endian header, then the payload."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dmuserd.protocol._constants import HEADER_SIZE, SECTOR_SIZE, Flag, RequestType, ResponseType
from dmuserd.protocol._errors import ProtocolError

_HEADER = struct.Struct("<5Q")
assert _HEADER.size == HEADER_SIZE
_pack_header = _HEADER.pack


@dataclass(frozen=True, slots=True)
class Header:
    """The five u64 fields, raw: ``type`` is an int so that any header decodes."""

    seq: int
    type: int
    flags: int
    sector: int
    len: int

    def encode(self) -> bytes:
        try:
            return _HEADER.pack(self.seq, self.type, self.flags, self.sector, self.len)
        except struct.error as exc:
            raise ProtocolError("header", self, f"a field does not fit in a u64 ({exc})") from None

    @classmethod
    def decode(cls, data) -> "Header":
        """Decode the first 40 bytes of ``data``."""
        if len(data) < HEADER_SIZE:
            raise ProtocolError("header", len(data), f"truncated: {len(data)} of {HEADER_SIZE} bytes")
        return cls(*_HEADER.unpack_from(data))


@dataclass(frozen=True, slots=True)
class Request:
    """A kernel → daemon request. ``payload`` is set for WRITE only."""

    seq: int
    type: RequestType
    flags: Flag
    sector: int
    len: int
    payload: bytes | None = None

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


@dataclass(frozen=True, slots=True)
class Response:
    """A daemon → kernel response. ``payload`` is set for a successful READ only."""

    seq: int
    type: ResponseType = ResponseType.SUCCESS
    payload: bytes | bytearray | memoryview | None = None

    def header(self, length: int) -> Header:
        return Header(self.seq, int(self.type), 0, 0, length)
