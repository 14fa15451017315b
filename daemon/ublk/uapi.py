"""The ublk UAPI of Linux 6.1 (``include/uapi/linux/ublk_cmd.h``), as typed Python.

Numbers and struct layouts only, no I/O: what the control commands carry
(:class:`CtrlCmd`, :class:`DevInfo`, :class:`Params`), what a queue's
descriptor array holds (:func:`decode_descriptor` → :class:`Descriptor`) and
what FETCH/COMMIT commands carry (:func:`io_cmd`). Everything is
little-endian native layout, as the kernel reads it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple

#: The control device: every ublk device is created and removed through it.
CONTROL_PATH = "/dev/ublk-control"
#: A device's I/O channel (the server side), and its block device.
CHAR_PATH = "/dev/ublkc{}"
BLOCK_PATH = "/dev/ublkb{}"


class Cmd(enum.IntEnum):
    """Control commands (``cmd_op`` of a URING_CMD on ``/dev/ublk-control``)."""

    GET_QUEUE_AFFINITY = 0x01
    GET_DEV_INFO = 0x02
    ADD_DEV = 0x04
    DEL_DEV = 0x05
    START_DEV = 0x06
    STOP_DEV = 0x07
    SET_PARAMS = 0x08
    GET_PARAMS = 0x09
    START_USER_RECOVERY = 0x10
    END_USER_RECOVERY = 0x11


class IoCmd(enum.IntEnum):
    """Queue commands (``cmd_op`` of a URING_CMD on ``/dev/ublkcN``)."""

    FETCH_REQ = 0x20
    COMMIT_AND_FETCH_REQ = 0x21
    NEED_GET_DATA = 0x22


#: A FETCH completed with this: a request is waiting in the descriptor array.
IO_RES_OK = 0
IO_RES_NEED_GET_DATA = 1
#: A FETCH completed with this (-ENODEV): the device stops, no more requests on this tag.
IO_RES_ABORT = -19

#: Where the descriptor arrays are mmap'ed from ``/dev/ublkcN``: queue q at
#: ``CMD_BUF_OFFSET + q * max_cmd_buf_size()``.
CMD_BUF_OFFSET = 0
MAX_QUEUE_DEPTH = 4096


class Feature(enum.IntFlag):
    """``UBLK_F_*``: device flags negotiated by ADD_DEV."""

    SUPPORT_ZERO_COPY = 1 << 0
    URING_CMD_COMP_IN_TASK = 1 << 1
    NEED_GET_DATA = 1 << 2
    USER_RECOVERY = 1 << 3
    USER_RECOVERY_REISSUE = 1 << 4


class DevState(enum.IntEnum):
    DEAD = 0
    LIVE = 1
    QUIESCED = 2


class Op(enum.IntEnum):
    """``UBLK_IO_OP_*``: bits 0-7 of a descriptor's ``op_flags``."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_SAME = 4
    WRITE_ZEROES = 5


class IoFlag(enum.IntFlag):
    """``UBLK_IO_F_*``: bits 8-31 of ``op_flags`` (the values include the shift)."""

    FAILFAST_DEV = 1 << 8
    FAILFAST_TRANSPORT = 1 << 9
    FAILFAST_DRIVER = 1 << 10
    META = 1 << 11
    FUA = 1 << 13
    NOUNMAP = 1 << 15
    SWAP = 1 << 16


class Attr(enum.IntFlag):
    """``UBLK_ATTR_*`` of the basic parameters."""

    READ_ONLY = 1 << 0
    ROTATIONAL = 1 << 1
    VOLATILE_CACHE = 1 << 2
    FUA = 1 << 3


PARAM_TYPE_BASIC = 1 << 0
PARAM_TYPE_DISCARD = 1 << 1

# struct ublksrv_ctrl_cmd: dev_id u32, queue_id u16, len u16, addr u64, data[2] u64
_CTRL_CMD = struct.Struct("<IHHQQQ")
# struct ublksrv_ctrl_dev_info
_DEV_INFO = struct.Struct("<HHHHIIiIQQQQQ")
# struct ublk_params: len, types, basic {attrs u32, 4 x u8 shifts, max_sectors u32,
# chunk_sectors u32, dev_sectors u64, virt_boundary_mask u64}, discard {alignment u32,
# granularity u32, max_discard_sectors u32, max_write_zeroes_sectors u32, max_segments u16, reserved u16}
_PARAMS = struct.Struct("<II" "IBBBBIIQQ" "IIIIHH" "4x")  # padded to the u64 alignment, as in C
# struct ublksrv_io_desc: op_flags u32, nr_sectors u32, start_sector u64, addr u64
_DESC = struct.Struct("<IIQQ")
# struct ublksrv_io_cmd: q_id u16, tag u16, result s32, addr u64
_IO_CMD = struct.Struct("<HHiQ")

DESCRIPTOR_SIZE = _DESC.size
DEV_INFO_SIZE = _DEV_INFO.size
PARAMS_SIZE = _PARAMS.size
assert (_CTRL_CMD.size, _DEV_INFO.size, _PARAMS.size, _DESC.size, _IO_CMD.size) == (32, 64, 64, 24, 16)

#: ``dev_id`` for "any free ID" in ADD_DEV; ``queue_id`` of a command that is not for a queue.
ANY_ID = 0xFFFFFFFF
NO_QUEUE = 0xFFFF


def ctrl_cmd(dev_id: int, *, addr: int = 0, length: int = 0, data0: int = 0, queue_id: int = NO_QUEUE) -> bytes:
    """The 32-byte command area of a control URING_CMD."""
    return _CTRL_CMD.pack(dev_id, queue_id, length, addr, data0, 0)


@dataclass
class DevInfo:
    """``struct ublksrv_ctrl_dev_info``: what ADD_DEV asks for and GET_DEV_INFO reports."""

    nr_hw_queues: int
    queue_depth: int
    max_io_buf_bytes: int
    dev_id: int = ANY_ID
    flags: int = 0
    state: int = DevState.DEAD
    ublksrv_pid: int = -1

    def encode(self) -> bytes:
        return _DEV_INFO.pack(self.nr_hw_queues, self.queue_depth, self.state, 0, self.max_io_buf_bytes,
                              self.dev_id, self.ublksrv_pid, 0, self.flags, 0, 0, 0, 0)

    @classmethod
    def decode(cls, data) -> DevInfo:
        queues, depth, state, _, max_io, dev_id, pid, _, flags, *_ = _DEV_INFO.unpack_from(data)
        return cls(queues, depth, max_io, dev_id, flags, state, pid)


@dataclass
class Params:
    """``struct ublk_params``: the block queue's limits, applied at START_DEV.

    The discard part is sent only where the backend discards or writes zeroes.
    """

    dev_sectors: int
    logical_bs_shift: int = 9
    physical_bs_shift: int = 12
    io_min_shift: int = 9
    io_opt_shift: int = 12
    max_sectors: int = 1024
    attrs: int = 0
    discard_granularity: int = 0
    max_discard_sectors: int = 0
    max_write_zeroes_sectors: int = 0

    @property
    def types(self) -> int:
        has_discard = self.max_discard_sectors or self.max_write_zeroes_sectors
        return PARAM_TYPE_BASIC | (PARAM_TYPE_DISCARD if has_discard else 0)

    def encode(self) -> bytes:
        segments = 1 if self.max_discard_sectors else 0
        return _PARAMS.pack(_PARAMS.size, self.types, self.attrs, self.logical_bs_shift, self.physical_bs_shift,
                            self.io_opt_shift, self.io_min_shift, self.max_sectors, 0, self.dev_sectors, 0,
                            0, self.discard_granularity, self.max_discard_sectors, self.max_write_zeroes_sectors,
                            segments, 0)

    @classmethod
    def decode(cls, data) -> Params:
        (_, _, attrs, lbs, pbs, opt, io_min, max_sectors, _, sectors, _, _, granularity, max_discard,
         max_zeroes, _, _) = _PARAMS.unpack_from(data)
        return cls(sectors, lbs, pbs, io_min, opt, max_sectors, attrs, granularity, max_discard, max_zeroes)


class Descriptor(NamedTuple):
    """One slot of a queue's descriptor array: the request behind a completed FETCH."""

    op: int
    flags: int
    nr_sectors: int
    start_sector: int
    addr: int


def decode_descriptor(array, tag: int) -> Descriptor:
    """The descriptor of ``tag`` in a queue's mmap'ed array."""
    op_flags, nr_sectors, start, addr = _DESC.unpack_from(array, tag * _DESC.size)
    return Descriptor(op_flags & 0xFF, op_flags & ~0xFF, nr_sectors, start, addr)


def io_cmd(q_id: int, tag: int, result: int, addr: int) -> bytes:
    """The 16-byte command area of a FETCH_REQ / COMMIT_AND_FETCH_REQ."""
    return _IO_CMD.pack(q_id, tag, result, addr)


def descriptor_array_size(depth: int, page_size: int) -> int:
    """Bytes to mmap for one queue's descriptors (whole pages, as the kernel checks)."""
    return -(-depth * _DESC.size // page_size) * page_size


def descriptor_array_offset(q_id: int, page_size: int) -> int:
    """Where queue ``q_id``'s descriptors start in ``/dev/ublkcN`` (the kernel reserves room for the maximum depth)."""
    return CMD_BUF_OFFSET + q_id * descriptor_array_size(MAX_QUEUE_DEPTH, page_size)
