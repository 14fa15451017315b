"""The emulator's semantics per opcode and per error status (spec: shared/specs/dsa.md)."""

import os
import struct

import crc32c
import pytest

from dmuserd.dsa_offload import Flag, Opcode, Status

from emu_helpers import RECORD_FLAGS, Runner


@pytest.fixture
def run(ext):
    return Runner(ext, ext.Emulator(max_transfer=1 << 20, max_batch=8))


def test_noop_and_drain_succeed(run):
    assert run.run(Opcode.NOOP).status == Status.SUCCESS
    assert run.run(Opcode.DRAIN).status == Status.SUCCESS


def test_memmove_copies_and_reports_direction(run):
    src, dst = bytearray(os.urandom(10000)), bytearray(10000)
    rec = run.run(Opcode.MEMMOVE, src=run.addr(src), dst=run.addr(dst), size=10000)
    assert (rec.status, rec.result) == (Status.SUCCESS, 0)
    assert dst == src
    # Overlap with dst above src: the copy runs backwards (result 1) and is right.
    buf = bytearray(os.urandom(8192))
    expect = bytearray(buf)
    expect[100:100 + 8000] = buf[0:8000]
    rec = run.run(Opcode.MEMMOVE, src=run.addr(buf), dst=run.addr(buf, 100), size=8000)
    assert (rec.status, rec.result) == (Status.SUCCESS, 1)
    assert buf == expect


def test_memfill_repeats_the_8_byte_pattern(run):
    dst = bytearray(1003)
    rec = run.run(Opcode.MEMFILL, pattern=int.from_bytes(b"ABCDEFGH", "little"), dst=run.addr(dst), size=1003)
    assert rec.status == Status.SUCCESS
    assert dst == (b"ABCDEFGH" * 126)[:1003]


def test_compare_reports_first_difference(run):
    a = bytearray(os.urandom(5000))
    b = bytearray(a)
    rec = run.run(Opcode.COMPARE, src=run.addr(a), src2=run.addr(b), size=5000)
    assert (rec.status, rec.result) == (Status.SUCCESS, 0)
    b[4321] ^= 0x40
    b[4500] ^= 0x01
    rec = run.run(Opcode.COMPARE, src=run.addr(a), src2=run.addr(b), size=5000)
    assert (rec.status, rec.result, rec.bytes_completed) == (Status.SUCCESS, 1, 4321)


def test_compare_check_result_gives_false_predicate(run):
    a, b = bytes(64), bytes(63) + b"\x01"
    flags = RECORD_FLAGS | Flag.CHECK_RESULT
    rec = run.run(Opcode.COMPARE, flags=flags, src=run.addr(a), src2=run.addr(b), size=64, expected_res=0)
    assert (rec.status, rec.result, rec.bytes_completed) == (Status.SUCCESS_FALSE_PREDICATE, 1, 63)
    rec = run.run(Opcode.COMPARE, flags=flags, src=run.addr(a), src2=run.addr(b), size=64, expected_res=1)
    assert rec.status == Status.SUCCESS


def test_compare_pattern(run):
    buf = bytearray(b"12345678" * 100)
    pattern = int.from_bytes(b"12345678", "little")
    assert run.run(Opcode.COMPARE_PATTERN, src=run.addr(buf), pattern=pattern, size=800).result == 0
    buf[517] = 0
    rec = run.run(Opcode.COMPARE_PATTERN, src=run.addr(buf), pattern=pattern, size=800)
    assert (rec.result, rec.bytes_completed) == (1, 517)


@pytest.mark.parametrize("seed", [0, 1, 0xFFFFFFFF, 0x1234ABCD])
def test_crc_matches_crc32c_package(run, seed):
    data = os.urandom(12345)
    rec = run.run(Opcode.CRCGEN, src=run.addr(data), size=len(data), crc_seed=seed)
    assert rec.status == Status.SUCCESS
    assert rec.op_specific == crc32c.crc32c(data, seed)


def test_crc_seed_from_address_and_bypass_flags(run):
    data = os.urandom(777)
    seed = struct.pack("<I", 0xCAFEBABE)
    rec = run.run(Opcode.CRCGEN, flags=RECORD_FLAGS | Flag.CRC_SEED_FROM_ADDRESS, src=run.addr(data),
                  size=777, crc_seed=0, seed_addr=run.addr(seed))
    assert rec.op_specific == crc32c.crc32c(data, 0xCAFEBABE)
    # Bypassing inversion and reflection gives the register itself, MSB-first,
    # as DML's software kernel defines it: the reflected register, bit-reversed.
    # (This used to expect the reflected register, i.e. only the inversion bypassed.)
    def rev32(v):
        return int(f"{v:032b}"[::-1], 2)

    rec = run.run(Opcode.CRCGEN, flags=RECORD_FLAGS | Flag.CRC_BYPASS_INVERSION, src=run.addr(data), size=777,
                  crc_seed=0x11111111)
    raw_reflected = ~crc32c.crc32c(data, ~rev32(0x11111111) & 0xFFFFFFFF) & 0xFFFFFFFF
    assert rec.op_specific == rev32(raw_reflected)
    # Bypassing data reflection is supported (it used to be answered with invalid flags).
    rec = run.run(Opcode.CRCGEN, flags=RECORD_FLAGS | Flag.CRC_BYPASS_DATA_REFLECTION, src=run.addr(data), size=777)
    assert rec.status == Status.SUCCESS


def test_copy_crc_copies_and_checksums(run):
    src, dst = os.urandom(4096 + 17), bytearray(4096 + 17)
    rec = run.run(Opcode.COPY_CRC, src=run.addr(src), dst=run.addr(dst), size=len(src), crc_seed=9)
    assert rec.status == Status.SUCCESS and dst == src and rec.op_specific == crc32c.crc32c(src, 9)


def test_dualcast_writes_both_and_checks_bits_11_0(run):
    src = os.urandom(3000)
    area = bytearray(3 * 4096)
    base = run.addr(area)
    first = (-base) % 4096
    rec = run.run(Opcode.DUALCAST, src=run.addr(src), dst=base + first, dst2=base + first + 4096, size=1000)
    assert rec.status == Status.SUCCESS
    assert area[first:first + 1000] == src[:1000] == area[first + 4096:first + 5096]
    rec = run.run(Opcode.DUALCAST, src=run.addr(src), dst=base + first, dst2=base + first + 4100, size=1000)
    assert rec.status == Status.DUALCAST_ALIGNMENT


def test_create_and_apply_delta(run):
    a = bytearray(os.urandom(4096))
    b = bytearray(a)
    b[8] ^= 1
    b[4095] ^= 1
    record = bytearray(5120)
    rec = run.run(Opcode.CREATE_DELTA, src=run.addr(a), src2=run.addr(b), size=4096,
                  delta_addr=run.addr(record), max_delta=5120)
    assert (rec.status, rec.result, rec.op_specific) == (Status.SUCCESS, 1, 20)
    assert record[:20] == struct.pack("<H", 1) + b[8:16] + struct.pack("<H", 511) + b[4088:4096]
    rec = run.run(Opcode.APPLY_DELTA, delta_addr=run.addr(record), dst=run.addr(a), size=4096, delta_size=20)
    assert rec.status == Status.SUCCESS and a == b
    # Equal buffers: result 0, empty record.
    rec = run.run(Opcode.CREATE_DELTA, src=run.addr(a), src2=run.addr(b), size=4096,
                  delta_addr=run.addr(record), max_delta=5120)
    assert (rec.result, rec.op_specific) == (0, 0)


def test_apply_delta_rejects_bad_offsets(run):
    dst = bytearray(64)
    backwards = struct.pack("<H", 3) + bytes(8) + struct.pack("<H", 2) + bytes(8)
    rec = run.run(Opcode.APPLY_DELTA, delta_addr=run.addr(backwards), dst=run.addr(dst), size=64, delta_size=20)
    assert rec.status == Status.DELTA_OFFSETS_NOT_INCREASING
    beyond = struct.pack("<H", 8) + bytes(8)
    rec = run.run(Opcode.APPLY_DELTA, delta_addr=run.addr(beyond), dst=run.addr(dst), size=64, delta_size=10)
    assert rec.status == Status.DELTA_OFFSET_OUT_OF_RANGE
    rec = run.run(Opcode.APPLY_DELTA, delta_addr=run.addr(beyond), dst=run.addr(dst), size=64, delta_size=7)
    assert rec.status == Status.DELTA_RECORD_SIZE


def test_cache_flush_succeeds(run):
    buf = bytearray(8192)
    assert run.run(Opcode.CACHE_FLUSH, dst=run.addr(buf), size=8192).status == Status.SUCCESS


def test_error_statuses(ext, run):
    src, dst = bytes(128), bytearray(128)
    s, d = run.addr(src), run.addr(dst)
    assert run.run(0x0B).status == Status.UNSUPPORTED_OPCODE
    rec = run.run(Opcode.MEMMOVE, flags=RECORD_FLAGS | 0x800000, src=s, dst=d, size=128)
    assert (rec.status, rec.op_specific) == (Status.INVALID_FLAGS, 0x800000)
    # BLOCK_ON_FAULT on a queue that does not allow it.
    assert run.run(Opcode.MEMMOVE, flags=RECORD_FLAGS | Flag.BLOCK_ON_FAULT, src=s, dst=d, size=128).status == Status.INVALID_FLAGS
    assert run.run(Opcode.MEMMOVE, src=s, dst=d, size=0).status == Status.TRANSFER_SIZE
    assert run.run(Opcode.MEMMOVE, src=s, dst=d, size=(1 << 20) + 1).status == Status.TRANSFER_SIZE
    assert run.run(Opcode.COPY_CRC, src=s, dst=s + 64, size=128).status == Status.OVERLAPPING_BUFFERS
    assert run.run(Opcode.MEMMOVE, misalign=8, src=s, dst=d, size=128).status == Status.MISALIGNED_COMPLETION_RECORD
    # An opcode the device does not advertise in op_cap.
    no_crc = Runner(ext, ext.Emulator(op_cap=(1 << Opcode.MEMMOVE) | (1 << Opcode.NOOP)))
    assert no_crc.run(Opcode.CRCGEN, src=s, size=128).status == Status.UNSUPPORTED_OPCODE
    assert no_crc.run(Opcode.NOOP).status == Status.SUCCESS


def _member(ext, opcode, record, **fields):
    return ext.build_descriptor(int(opcode), flags=RECORD_FLAGS, completion=ext.address_of(record), **fields)


def test_batch_runs_members_and_reports_failures(ext, run):
    src, dst = os.urandom(256), bytearray(256)
    records = [bytearray(64) for _ in range(3)]
    aligned = [ext.address_of(r) + (-ext.address_of(r)) % 32 for r in records]
    members = bytearray(64 * 3 + 64)
    offset = (-ext.address_of(members)) % 64
    descs = [
        ext.build_descriptor(int(Opcode.MEMMOVE), flags=RECORD_FLAGS, completion=aligned[0], src=run.addr(src), dst=run.addr(dst), size=256),
        ext.build_descriptor(0x0B, flags=RECORD_FLAGS, completion=aligned[1]),  # bad opcode
        ext.build_descriptor(int(Opcode.BATCH), flags=RECORD_FLAGS, completion=aligned[2], desc_list=0, count=2),  # no nesting
    ]
    members[offset:offset + 192] = b"".join(descs)
    rec = run.run(Opcode.BATCH, desc_list=run.addr(members, offset), count=3)
    assert (rec.status, rec.bytes_completed) == (Status.BATCH_MEMBER_FAILED, 3)
    statuses = [r[(-ext.address_of(r)) % 32] for r in records]
    assert statuses == [Status.SUCCESS, Status.UNSUPPORTED_OPCODE, Status.UNSUPPORTED_OPCODE]
    assert dst == src
    # Count out of range, misaligned list.
    assert run.run(Opcode.BATCH, desc_list=run.addr(members, offset), count=1).status == Status.DESCRIPTOR_COUNT
    assert run.run(Opcode.BATCH, desc_list=run.addr(members, offset), count=9).status == Status.DESCRIPTOR_COUNT
    assert run.run(Opcode.BATCH, desc_list=run.addr(members, offset + 8), count=2).status == Status.MISALIGNED_LIST


def test_page_fault_partial_completion_fields(ext, run):
    import mmap

    # Buffers in pages of their own (mmap), 100 bytes into a page: no completion
    # record (heap) shares their pages, and where their pages start is known.
    areas = [mmap.mmap(-1, 6 * 4096), mmap.mmap(-1, 6 * 4096)]
    src, dst = memoryview(areas[0])[100 : 100 + 5 * 4096], memoryview(areas[1])[100 : 100 + 5 * 4096]
    src[:] = os.urandom(5 * 4096)
    s, d = run.addr(src), run.addr(dst)
    fault = (d + 3 * 4096) & ~4095  # a destination page: a write fault
    run.emu.set_fault(fault, 1)
    rec = run.run(Opcode.MEMMOVE, src=s, dst=d, size=len(src))
    assert rec.status == Status.PAGE_FAULT | 0x80
    assert rec.fault_info & 1
    assert rec.bytes_completed == fault - d
    assert rec.fault_addr == fault
    assert dst[: fault - d] == src[: fault - d] and not any(dst[fault - d:])
    # A read fault on the source: no write bit.
    run.emu.clear_faults()
    run.emu.set_fault(s + 100, 1)
    rec = run.run(Opcode.CRCGEN, src=s + 4096, size=4096)
    assert rec.status == Status.SUCCESS  # the page of s+100 is not in this range
    rec = run.run(Opcode.CRCGEN, src=s, size=8192)
    page = (s + 100) & ~4095
    assert rec.status == Status.PAGE_FAULT and rec.fault_addr == max(page, s)
    assert rec.op_specific == crc32c.crc32c(bytes(src[: max(page, s) - s]))


def test_page_fault_backwards_copy_reports_result_1(ext, run):
    buf = bytearray(os.urandom(8 * 4096))
    b = run.addr(buf)
    size, shift = 4 * 4096, 9000
    page = (b + size + 4095) & ~4095  # above the source, inside the destination
    run.emu.set_fault(page, 1)
    before = bytes(buf)
    rec = run.run(Opcode.MEMMOVE, src=b, dst=b + shift, size=size)
    assert rec.status == Status.PAGE_FAULT | 0x80 and rec.result == 1
    # Done from the end down to just above the faulting page, nothing below.
    done = (b + shift + size) - (page + 4096)
    assert rec.bytes_completed == done > 0
    assert buf[shift + size - done : shift + size] == before[size - done : size]
    assert buf[: page - b] == before[: page - b]


def test_block_on_fault_waits_instead(ext):
    run = Runner(ext, ext.Emulator(block_on_fault=True))
    src, dst = os.urandom(4 * 4096), bytearray(4 * 4096)
    run.emu.set_fault(run.addr(dst, 5000), 1)
    rec = run.run(Opcode.MEMMOVE, flags=RECORD_FLAGS | Flag.BLOCK_ON_FAULT, src=run.addr(src), dst=run.addr(dst), size=len(src))
    assert rec.status == Status.SUCCESS and dst == src
    assert run.emu.stats()["blocked"] == 1
    # A page the OS cannot bring in: the page request is rejected.
    run.emu.set_fault(run.addr(dst, 9000), 1, sticky=True)
    rec = run.run(Opcode.MEMMOVE, flags=RECORD_FLAGS | Flag.BLOCK_ON_FAULT, src=run.addr(src), dst=run.addr(dst), size=len(src))
    assert rec.status == Status.PAGE_REQUEST_REJECTED


def test_fault_on_the_completion_record_page(ext, run):
    """The record's page is missing: the operation still runs; the record
    arrives with status 0x1a, the record's address, and what was done.
    (This test used to pin "nothing was executed".)"""
    import mmap

    area = mmap.mmap(-1, 3 * 4096)  # page-aligned: the data pages are not the record's
    src, dst = memoryview(area)[100:200], memoryview(area)[4096 + 100 : 4096 + 200]
    src[:] = os.urandom(100)
    run.emu.fault_next_records(1)
    rec = run.run(Opcode.MEMMOVE, src=run.addr(src), dst=run.addr(dst), size=100)
    assert rec.status == Status.COMPLETION_RECORD_FAULT
    assert (rec.bytes_completed, rec.result, rec.fault_info) == (100, 0, 1)
    assert rec.fault_addr % 32 == 0 and rec.fault_addr != 0
    assert dst == src  # it ran
    assert run.emu.stats()["cr_faults"] == 1
    del src, dst
