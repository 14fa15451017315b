"""DSA constants from shared/specs/dsa.md: opcodes, descriptor flags, statuses.

The C extension has its own copy in ``dsa_hw.h`` (C cannot import this);
``tests/dsa/test_descriptor.py`` checks the two agree by building descriptors.

They are wire values, plain ints in namespaces (``Opcode.MEMMOVE``), not
``enum`` classes: building an IntEnum or IntFlag costs 20-30 µs a member,
about 1.2 ms for these four at every import, and every mover pays it (the
CPU one too: its operations carry their opcodes), the start-up of
``dmuserd cow merge`` included. :meth:`Values.members` and
:meth:`Values.name_of` give the names where something is shown.
"""

from __future__ import annotations


class Values:
    """A namespace of one field's wire values: upper-case class attributes, plain ints."""

    @classmethod
    def members(cls) -> dict[str, int]:
        """Name -> value, in the order the spec lists them."""
        return {name: value for name, value in vars(cls).items() if name.isupper()}

    @classmethod
    def name_of(cls, value: int) -> str | None:
        """The name of ``value`` (the first, should two share it), or None."""
        return next((name for name, v in cls.members().items() if v == value), None)


class Opcode(Values):
    """Operation codes (a descriptor's byte 7)."""

    NOOP = 0x00
    BATCH = 0x01
    DRAIN = 0x02
    MEMMOVE = 0x03
    MEMFILL = 0x04
    COMPARE = 0x05
    COMPARE_PATTERN = 0x06
    CREATE_DELTA = 0x07
    APPLY_DELTA = 0x08
    DUALCAST = 0x09
    CRCGEN = 0x10
    COPY_CRC = 0x11
    CACHE_FLUSH = 0x20


class Flag(Values):
    """Descriptor flag bits (bytes 4-6)."""

    FENCE = 0x1
    BLOCK_ON_FAULT = 0x2
    COMPLETION_ADDR_VALID = 0x4
    REQUEST_COMPLETION_RECORD = 0x8
    REQUEST_INTERRUPT = 0x10
    CHECK_RESULT = 0x80
    CACHE_CONTROL = 0x100
    STRICT_ORDERING = 0x2000
    DEST_READBACK = 0x4000
    CRC_SEED_FROM_ADDRESS = 0x10000
    CRC_BYPASS_INVERSION = 0x20000
    CRC_BYPASS_DATA_REFLECTION = 0x40000


class Status(Values):
    """Completion record status codes (its first byte, under ``STATUS_MASK``)."""

    NONE = 0x00
    SUCCESS = 0x01
    SUCCESS_FALSE_PREDICATE = 0x02
    PAGE_FAULT = 0x03
    PAGE_REQUEST_REJECTED = 0x04
    BATCH_MEMBER_FAILED = 0x05
    BATCH_LIST_PAGE_FAULT = 0x06
    DELTA_OFFSETS_NOT_INCREASING = 0x07
    DELTA_OFFSET_OUT_OF_RANGE = 0x08
    UNSUPPORTED_OPCODE = 0x10
    INVALID_FLAGS = 0x11
    NONZERO_RESERVED = 0x12
    TRANSFER_SIZE = 0x13
    DESCRIPTOR_COUNT = 0x14
    DELTA_RECORD_SIZE = 0x15
    OVERLAPPING_BUFFERS = 0x16
    DUALCAST_ALIGNMENT = 0x17
    MISALIGNED_LIST = 0x18
    COMPLETION_RECORD_FAULT = 0x1A
    MISALIGNED_COMPLETION_RECORD = 0x1B
    MISALIGNED_ADDRESS = 0x1C


class GenCap(Values):
    """Bits of the device's GENCAP register (sysfs ``dsaN/gen_cap``; the
    kernel's ``union gen_cap_reg``) that decide which descriptor flags and
    operations a queue can take."""

    BLOCK_ON_FAULT = 1 << 0
    OVERLAP_COPY = 1 << 1
    CACHE_CONTROL_MEMORY = 1 << 2
    CACHE_CONTROL_CACHE = 1 << 3
    COMMAND_CAP = 1 << 4
    DEST_READBACK = 1 << 8
    DRAIN_READBACK = 1 << 9


#: Operations that write memory: the ones CACHE_CONTROL (allocate the
#: written lines in the cache) is meant for. Others never get the flag.
WRITES_MEMORY = frozenset({Opcode.MEMMOVE, Opcode.MEMFILL, Opcode.CREATE_DELTA, Opcode.APPLY_DELTA, Opcode.DUALCAST,
                           Opcode.COPY_CRC})

WRITE_FAULT = 0x80  # or-ed into status 3 when the fault was on a write
STATUS_MASK = 0x7F

DELTA_GRANULE = 8  # create-delta compares 8-byte granules
DELTA_ENTRY = 10  # u16 granule offset + 8 bytes of new data
DELTA_MAX_SIZE = 0x10000 * DELTA_GRANULE  # the u16 offset's reach: 512 KiB


def status_name(status: int) -> str:
    """``0x13 TRANSFER_SIZE``-style text for a raw status byte."""
    code = status & STATUS_MASK
    name = Status.name_of(code) or "UNKNOWN"
    return f"{code:#04x} {name}{' (write)' if status & WRITE_FAULT and code == Status.PAGE_FAULT else ''}"
