"""The on-disk structures of Android's snapshot COW file, versions 1 to 3.

Byte layouts come from ``../shared/specs/android-cow.md`` (AOSP libsnapshot's
``cow_format.h``): all integers little-endian, structs packed. This module
only packs and unpacks; what a valid *file* is lives in the reader, how one
is produced lives in the writer.

Errors are here too, because every layer raises them: a :class:`CowFormatError`
names the file offset and the rule a file breaks, so a user can tell a
truncated download from a hostile file from a bug of ours.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from dmuserd.errors import DmuserdError

MAGIC = 0x436F77634F572121
#: bytes of the prefix every version shares: magic, major, minor, header_size
PREFIX_SIZE = 14
HEADER_SIZE_V1 = 34
HEADER_SIZE_V2 = 38
HEADER_SIZE_V3 = 78
OP_SIZE_V2 = 20
OP_SIZE_V3 = 16
FOOTER_SIZE_V2 = 84
#: the footer op's data_length: the 64 unused bytes after it
FOOTER_UNUSED = 64
RESUME_POINT_SIZE = 16
RESUME_POINT_MAX = 4
#: snapuserd's default scratch ("buffer") region after the header
DEFAULT_BUFFER_SIZE = 2 * 1024 * 1024
#: v3 compression factor: chunk = block_size << f, f <= 6 (4 KiB to 256 KiB)
MAX_FACTOR_SHIFT = 6
#: v3 source_info layout
SOURCE_MASK = (1 << 48) - 1
TYPE_SHIFT = 60
FACTOR_SHIFT = 57
FACTOR_MASK = 0x7


class OpType(enum.IntEnum):
    COPY = 1
    REPLACE = 2
    ZERO = 3
    LABEL = 4
    CLUSTER = 5
    XOR = 6
    SEQUENCE = 7
    FOOTER = 255


#: ops that carry no block of the new partition
METADATA_OPS = frozenset({OpType.LABEL, OpType.CLUSTER, OpType.SEQUENCE, OpType.FOOTER})
#: ops whose source must not be overwritten before they merge
ORDERED_OPS = frozenset({OpType.COPY, OpType.XOR})


def type_marks(values, mark: int = 1) -> bytes:
    """A 256-byte ``bytes.translate`` table: ``mark`` at each of ``values``
    (op types, compressions), ``1 - mark`` elsewhere: what the readers and
    the C functions flag rows by type with. (Made a byte at a time from an
    enum, each such table cost 40-80 us of every start-up.)"""
    table = bytearray((1 - mark,)) * 256
    for value in values:
        table[value] = mark
    return bytes(table)


class Compression(enum.IntEnum):
    NONE = 0
    GZ = 1
    BROTLI = 2
    LZ4 = 3
    ZSTD = 4

    @classmethod
    def parse(cls, value) -> "Compression":
        """``"lz4"``, ``3`` or ``Compression.LZ4`` → ``Compression.LZ4``."""
        if isinstance(value, Compression):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            names = ", ".join(c.name.lower() for c in cls)
            raise CowError(f"unknown compression {value!r} (use one of {names})") from None


class CowError(DmuserdError):
    """Anything wrong with a COW file or with how it is used."""


class CowWriterError(CowError):
    """A COW file cannot be written as asked (the message says why)."""


#: what to tell the user per broken rule (the default covers the rest)
_HINTS = {
    "label-not-found": "read it without a label or with one it has",
    "source-outside-base": "pass the base image the COW file was made for",
    "block-outside-target": "pass the target size (size=...) the COW file was made for",
}
_DEFAULT_HINT = "the file is corrupt, truncated or not a COW file; regenerate it"


class CowFormatError(CowError):
    """A COW file breaks a rule of the format.

    ``offset`` is the byte offset in the COW file where the fault is seen
    (a header field, an op record, a data chunk), ``rule`` a short stable
    name of the rule broken (``"magic"``, ``"duplicate-block"``, ...), and
    ``detail`` the specifics.
    """

    def __init__(self, offset: int, rule: str, detail: str, *, path=None) -> None:
        self.offset = offset
        self.rule = rule
        self.detail = detail
        self.path = None if path is None else str(path)
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"COW file {self.path}" if self.path else "COW file"
        hint = _HINTS.get(self.rule, _DEFAULT_HINT)
        return f"{where}, offset {self.offset}: {self.detail} (rule {self.rule}); {hint}"

    def with_path(self, path) -> "CowFormatError":
        """The same error naming the file (readers add it on the way out)."""
        if self.path is None:
            self.path = str(path)
            self.args = (self._message(),)
        return self


# --- header -----------------------------------------------------------------

_PREFIX = struct.Struct("<QHHH")
_V2_REST = struct.Struct("<HHIIQI")  # footer_size .. buffer_size, at offset 14
_V3_REST = struct.Struct("<QIIQQII")  # sequence_data_count .. max_compression_size, at 38


@dataclass
class CowHeader:
    """A COW header; v3 fields are zero for older versions."""

    major: int = 2
    minor: int = 0
    header_size: int = HEADER_SIZE_V2
    footer_size: int = FOOTER_SIZE_V2
    op_size: int = OP_SIZE_V2
    block_size: int = 4096
    cluster_ops: int = 0
    num_merge_ops: int = 0
    buffer_size: int = DEFAULT_BUFFER_SIZE
    sequence_data_count: int = 0
    resume_point_count: int = 0
    resume_point_max: int = 0
    op_count: int = 0
    op_count_max: int = 0
    compression_algorithm: int = 0
    max_compression_size: int = 0
    magic: int = MAGIC

    def pack(self) -> bytes:
        prefix = _PREFIX.pack(self.magic, self.major, self.minor, self.header_size)
        rest = _V2_REST.pack(
            self.footer_size, self.op_size, self.block_size, self.cluster_ops, self.num_merge_ops, self.buffer_size
        )
        if self.major < 3:
            # version 1 ended before buffer_size
            return (prefix + rest)[: self.header_size]
        return (
            prefix
            + rest
            + _V3_REST.pack(
                self.sequence_data_count,
                self.resume_point_count,
                self.resume_point_max,
                self.op_count,
                self.op_count_max,
                self.compression_algorithm,
                self.max_compression_size,
            )
        )

    @classmethod
    def unpack(cls, data: bytes) -> "CowHeader":
        """Decode the fields present in ``data`` (validation is the reader's)."""
        padded = bytes(data) + bytes(max(0, HEADER_SIZE_V3 - len(data)))
        magic, major, minor, header_size = _PREFIX.unpack_from(padded, 0)
        fields = _V2_REST.unpack_from(padded, PREFIX_SIZE)
        header = cls(major, minor, header_size, *fields, magic=magic)
        if header_size < HEADER_SIZE_V2:
            header.buffer_size = 0
        if major >= 3:
            (
                header.sequence_data_count,
                header.resume_point_count,
                header.resume_point_max,
                header.op_count,
                header.op_count_max,
                header.compression_algorithm,
                header.max_compression_size,
            ) = _V3_REST.unpack_from(padded, HEADER_SIZE_V2)
        return header

    def as_dict(self) -> dict:
        out = {
            "version": f"{self.major}.{self.minor}",
            "header_size": self.header_size,
            "footer_size": self.footer_size,
            "op_size": self.op_size,
            "block_size": self.block_size,
            "cluster_ops": self.cluster_ops,
            "num_merge_ops": self.num_merge_ops,
            "buffer_size": self.buffer_size,
        }
        if self.major >= 3:
            out.update(
                sequence_data_count=self.sequence_data_count,
                resume_point_count=self.resume_point_count,
                resume_point_max=self.resume_point_max,
                op_count=self.op_count,
                op_count_max=self.op_count_max,
                compression_algorithm=self.compression_algorithm,
                max_compression_size=self.max_compression_size,
            )
        return out


#: byte offset of each header field, for error messages
HEADER_FIELD_OFFSET = {
    "magic": 0,
    "major": 8,
    "minor": 10,
    "header_size": 12,
    "footer_size": 14,
    "op_size": 16,
    "block_size": 18,
    "cluster_ops": 22,
    "num_merge_ops": 26,
    "buffer_size": 34,
    "sequence_data_count": 38,
    "resume_point_count": 46,
    "resume_point_max": 50,
    "op_count": 54,
    "op_count_max": 62,
    "compression_algorithm": 70,
    "max_compression_size": 74,
}


# --- ops --------------------------------------------------------------------

OP_V2 = struct.Struct("<BBHQQ")  # type, compression, data_length, new_block, source
OP_V3 = struct.Struct("<IIQ")  # data_length, new_block, source_info
FOOTER_OP = struct.Struct("<BBHQQ")  # type, compression, data_length, ops_size, num_ops
RESUME_POINT = struct.Struct("<QQ")  # label, op_index


def pack_op_v2(op_type: int, compression: int, data_length: int, new_block: int, source: int) -> bytes:
    return OP_V2.pack(op_type, compression, data_length, new_block, source)


def pack_op_v3(op_type: int, data_length: int, new_block: int, source: int, factor: int = 0) -> bytes:
    info = (op_type << TYPE_SHIFT) | (factor << FACTOR_SHIFT) | (source & SOURCE_MASK)
    return OP_V3.pack(data_length, new_block, info)


class CowOp:
    """One operation as read from a file (immutable, compared and hashed by its fields).

    ``source`` is what the type makes it (base block for Copy, data offset
    for Replace, base byte offset for Xor, the value for Label, the skip for
    Cluster). ``data_offset`` is where the op's stored data starts in the
    COW file (Replace/Xor/Sequence), ``chunk_size`` how many bytes of the
    new partition the op covers once decompressed (``block_size`` except
    for v3 Replace with a compression factor), ``offset`` where the op
    record itself is, and ``index`` its position in the op stream.

    Written out rather than a frozen slotted dataclass: making that class
    costs 0.7 ms of every start-up (``dmuserd cow merge``'s among them),
    which makes no op object.
    """

    __slots__ = ("type", "new_block", "source", "data_length", "compression", "index", "offset", "data_offset",
                 "chunk_size", "block_size")
    type: OpType
    new_block: int
    source: int
    data_length: int
    compression: int
    index: int
    offset: int
    data_offset: int | None
    chunk_size: int
    block_size: int

    def __init__(self, type: OpType, new_block: int, source: int, data_length: int, compression: int, index: int,
                 offset: int, data_offset: int | None = None, chunk_size: int = 4096, block_size: int = 4096) -> None:
        for name, value in zip(self.__slots__, (type, new_block, source, data_length, compression, index, offset,
                                                data_offset, chunk_size, block_size)):
            object.__setattr__(self, name, value)

    def _fields(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"CowOp is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"CowOp is immutable: cannot delete {name!r}")

    def __eq__(self, other) -> bool:
        return self._fields() == other._fields() if type(other) is CowOp else NotImplemented

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return "CowOp(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__) + ")"

    @property
    def blocks(self) -> int:
        """Blocks of the new partition this op writes (0 for metadata)."""
        return 0 if self.type in METADATA_OPS else self.chunk_size // self.block_size

    @property
    def is_ordered(self) -> bool:
        return self.type in ORDERED_OPS

    def as_dict(self) -> dict:
        out = {"index": self.index, "type": self.type.name.lower(), "offset": self.offset}
        if self.type == OpType.LABEL:
            out["label"] = self.source
        elif self.type == OpType.CLUSTER:
            out["cluster_data"] = self.source
        else:
            out.update(new_block=self.new_block, source=self.source, data_length=self.data_length)
            if self.data_offset is not None:
                out["data_offset"] = self.data_offset
            if self.blocks > 1:
                out["blocks"] = self.blocks
        return out
