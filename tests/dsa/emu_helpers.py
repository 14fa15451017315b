"""Running single descriptors on the emulator (its synchronous execute hook)."""

from __future__ import annotations

import dataclasses
import struct

from dmuserd.dsa_offload import Flag

RECORD_FLAGS = int(Flag.COMPLETION_ADDR_VALID | Flag.REQUEST_COMPLETION_RECORD)


@dataclasses.dataclass
class Rec:
    status: int
    result: int
    fault_info: int
    bytes_completed: int
    fault_addr: int
    op_specific: int

    @classmethod
    def parse(cls, raw: bytes) -> "Rec":
        status, result, info, done, fault, op = struct.unpack_from("<BBBxIQI", raw)
        return cls(status, result, info, done, fault, op)


class Runner:
    """Builds descriptors over Python buffers and runs them on an emulator."""

    def __init__(self, ext, emulator) -> None:
        self.ext, self.emu = ext, emulator
        self._keep = []

    def addr(self, buf, offset: int = 0) -> int:
        self._keep.append(buf)
        return self.ext.address_of(buf) + offset

    def record_area(self, misalign: int = 0):
        area = bytearray(128)
        base = self.ext.address_of(area)
        offset = (-base) % 32 + misalign
        self._keep.append(area)
        return area, offset, base + offset

    def run(self, opcode: int, flags: int = RECORD_FLAGS, misalign: int = 0, **fields) -> Rec:
        area, offset, completion = self.record_area(misalign)
        desc = self.ext.build_descriptor(int(opcode), flags=flags, completion=completion, **fields)
        self.emu.execute(desc)
        return Rec.parse(bytes(area[offset : offset + 32]))
