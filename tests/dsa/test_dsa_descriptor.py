"""Descriptor bytes, field by field, against the offsets in shared/specs/dsa.md."""

import struct

import pytest

from dmuserd.dsa_offload import Flag, Opcode

COMPLETION = 0x1122_3344_5566_7740  # 32-byte aligned
A, B, C = 0xA0A0_0000_1000, 0xB0B0_0000_2000, 0xC0C0_0000_3000


def u8(d, o):
    return d[o]


def u16(d, o):
    return struct.unpack_from("<H", d, o)[0]


def u32(d, o):
    return struct.unpack_from("<I", d, o)[0]


def u64(d, o):
    return struct.unpack_from("<Q", d, o)[0]


def common(d, opcode, flags):
    assert len(d) == 64
    assert u8(d, 7) == opcode
    assert u32(d, 4) & 0xFFFFFF == flags
    assert u64(d, 8) == COMPLETION


FLAGS = int(Flag.COMPLETION_ADDR_VALID | Flag.REQUEST_COMPLETION_RECORD | Flag.CACHE_CONTROL)

# opcode, build_descriptor fields, {offset: (width, expected)} beyond the common ones
CASES = [
    (Opcode.NOOP, {}, {16: (8, 0), 24: (8, 0), 32: (4, 0), 40: (8, 0)}),
    (Opcode.DRAIN, {}, {16: (8, 0), 24: (8, 0)}),
    (Opcode.BATCH, {"desc_list": A, "count": 7}, {16: (8, A), 32: (4, 7), 24: (8, 0)}),
    (Opcode.MEMMOVE, {"src": A, "dst": B, "size": 4096}, {16: (8, A), 24: (8, B), 32: (4, 4096), 40: (8, 0)}),
    (Opcode.MEMFILL, {"pattern": 0x0807060504030201, "dst": B, "size": 100},
     {16: (8, 0x0807060504030201), 24: (8, B), 32: (4, 100)}),
    (Opcode.COMPARE, {"src": A, "src2": B, "size": 64, "expected_res": 1},
     {16: (8, A), 24: (8, B), 32: (4, 64), 40: (1, 1), 41: (1, 0)}),
    (Opcode.COMPARE_PATTERN, {"src": A, "pattern": 0xDEADBEEF, "size": 64, "expected_res": 1},
     {16: (8, A), 24: (8, 0xDEADBEEF), 40: (1, 1)}),
    (Opcode.CREATE_DELTA, {"src": A, "src2": B, "size": 512, "delta_addr": C, "max_delta": 640},
     {16: (8, A), 24: (8, B), 32: (4, 512), 40: (8, C), 48: (4, 640)}),
    (Opcode.APPLY_DELTA, {"delta_addr": C, "dst": B, "size": 512, "delta_size": 30},
     {16: (8, C), 24: (8, B), 32: (4, 512), 40: (4, 30)}),
    (Opcode.DUALCAST, {"src": A, "dst": B, "dst2": C, "size": 256}, {16: (8, A), 24: (8, B), 40: (8, C), 32: (4, 256)}),
    (Opcode.CRCGEN, {"src": A, "size": 99, "crc_seed": 0x12345678, "seed_addr": C},
     {16: (8, A), 32: (4, 99), 40: (4, 0x12345678), 44: (4, 0), 48: (8, C), 24: (8, 0)}),
    (Opcode.COPY_CRC, {"src": A, "dst": B, "size": 99, "crc_seed": 7}, {16: (8, A), 24: (8, B), 40: (4, 7), 48: (8, 0)}),
    (Opcode.CACHE_FLUSH, {"dst": B, "size": 8192}, {24: (8, B), 32: (4, 8192), 16: (8, 0)}),
]


@pytest.mark.parametrize("opcode,fields,expect", CASES, ids=[Opcode.name_of(c[0]) for c in CASES])
def test_descriptor_fields(ext, opcode, fields, expect):
    d = ext.build_descriptor(int(opcode), flags=FLAGS, completion=COMPLETION, **fields)
    common(d, opcode, FLAGS)
    for offset, (width, value) in expect.items():
        got = {1: u8, 2: u16, 4: u32, 8: u64}[width](d, offset)
        assert got == value, f"{Opcode.name_of(opcode)} @{offset}: {got:#x} != {value:#x}"
    # Nothing outside the fields the opcode uses.
    assert u16(d, 38) == 0
    assert u32(d, 0) == 0


def test_pasid_priv_interrupt_and_24_bit_flags(ext):
    flags = int(Flag.FENCE | Flag.CRC_SEED_FROM_ADDRESS | Flag.CRC_BYPASS_INVERSION)
    d = ext.build_descriptor(int(Opcode.CRCGEN), flags=flags, pasid=0xABCDE, priv=True, int_handle=0x1234)
    assert u32(d, 0) == 0xABCDE | 0x80000000
    assert d[4] | d[5] << 8 | d[6] << 16 == flags
    assert d[6] == 0x03  # op-specific CRC flags live in byte 6
    assert u16(d, 36) == 0x1234
    # The pasid is 20 bits: higher bits never leak into priv.
    assert u32(ext.build_descriptor(0, pasid=0xFFFFFFFF), 0) == 0xFFFFF


def test_descriptors_agree_with_python_opcodes(ext):
    for opcode in Opcode.members().values():
        assert ext.build_descriptor(int(opcode))[7] == opcode


def test_spec_values_are_plain_ints_with_names():
    from dmuserd.dsa_offload._spec import Status, status_name

    ops = Opcode.members()
    assert list(ops)[:4] == ["NOOP", "BATCH", "DRAIN", "MEMMOVE"] and len(ops) == 13  # the spec's order, all of them
    assert type(Opcode.MEMMOVE) is int and ops["MEMMOVE"] == 3
    assert Opcode.name_of(0x11) == "COPY_CRC" and Opcode.name_of(0x12) is None
    assert Flag.members()["CACHE_CONTROL"] == 0x100 and "members" not in Flag.members()
    assert status_name(0x13) == "0x13 TRANSFER_SIZE"
    assert status_name(Status.PAGE_FAULT | 0x80) == "0x03 PAGE_FAULT (write)"
    assert status_name(0x7E) == "0x7e UNKNOWN"
