"""Page-fault recovery: touch the page, resubmit the rest, match the CPU engine."""

import random

import crc32c
import pytest

from dmuserd.dsa_offload import open_mover

SIZE = 5 * 4096 + 321
OFFSET = 37  # buffers not page aligned: faults land mid-operation, mid-pattern


def buffers(rng, size=SIZE):
    src_area = bytearray(rng.randbytes(size + OFFSET))
    dst_area = bytearray(size + OFFSET)
    return src_area, dst_area, memoryview(src_area)[OFFSET:], memoryview(dst_area)[OFFSET:]


async def run_op(mover, name, src, dst):
    if name == "copy":
        return await mover.copy(dst, src)
    if name == "fill":
        return await mover.fill(dst, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    if name == "crc32c":
        return await mover.crc32c(src, 0x5EED)
    if name == "copy_crc32c":
        return await mover.copy_crc32c(dst, src, 0x5EED)
    if name == "compare":
        return await mover.compare(src, dst)
    raise AssertionError(name)


@pytest.mark.parametrize("name,side", [("copy", "src"), ("copy", "dst"), ("fill", "dst"), ("crc32c", "src"),
                                       ("copy_crc32c", "dst"), ("compare", "src")])
async def test_faults_at_many_positions_match_cpu(ext, make_mover, name, side):
    mover = make_mover(threshold=1)
    cpu = open_mover("cpu")
    rng = random.Random(f"{name}-{side}")
    positions = [0, 1, 4095, 4096, SIZE - 1] + rng.sample(range(SIZE), 10)
    faults_before = 0
    for position in positions:
        src_area, dst_area, src, dst = buffers(rng)
        if name == "compare":  # a difference after the fault, found after recovery
            dst[:] = src
            dst[SIZE - 10] ^= 0xFF
        expect_area = bytearray(dst_area)
        expected = await run_op(cpu, name, memoryview(src_area)[OFFSET:], memoryview(expect_area)[OFFSET:])
        target = src if side == "src" else dst
        mover.emulator.set_fault(ext.address_of(target) + position, 1)
        got = await run_op(mover, name, src, dst)
        assert got == expected, f"{name} fault at {position}"
        assert dst_area == expect_area, f"{name} fault at {position}: output differs from the CPU engine"
        stats = mover.stats()
        assert stats["faults"] > faults_before, "the fault was not taken"
        faults_before = stats["faults"]
        assert stats["fallbacks"] == {}  # all recovered on the device
        mover.emulator.clear_faults()


async def test_several_faults_in_one_crc_continue_from_partial_values(ext, make_mover):
    mover = make_mover(threshold=1)
    data = bytearray(random.Random(1).randbytes(16 * 4096))
    base = ext.address_of(data)
    for page in (2, 5, 6, 11):
        mover.emulator.set_fault(base + page * 4096 + 7, 1)
    assert await mover.crc32c(data, 77) == crc32c.crc32c(data, 77)
    assert mover.stats()["faults"] >= 4


async def test_unresolvable_fault_falls_back_to_cpu(ext, make_mover):
    mover = make_mover(threshold=1)
    src, dst = bytearray(random.Random(2).randbytes(40000)), bytearray(40000)
    mover.emulator.set_fault(ext.address_of(dst) + 20000, 1, sticky=True)
    await mover.copy(dst, src)
    assert dst == src
    stats = mover.stats()
    assert stats["fallbacks"] == {"fault_unresolved": 1}
    assert 0 < stats["offloaded_bytes"] < 40000  # the part before the fault was the device's


async def test_fault_on_completion_record_page(make_mover):
    mover = make_mover(threshold=1)
    src, dst = bytearray(random.Random(3).randbytes(9000)), bytearray(9000)
    mover.emulator.fault_next_records(1)
    await mover.copy(dst, src)
    assert dst == src
    stats = mover.stats()
    assert stats["completion_record_faults"] == 1
    assert stats["emulator"]["cr_faults"] == 1
    assert stats["submitted"] == 2  # the first attempt did nothing and was resubmitted


async def test_block_on_fault_lets_the_device_wait(ext, make_mover):
    mover = make_mover(threshold=1, block_on_fault=True)
    src, dst = bytearray(random.Random(4).randbytes(30000)), bytearray(30000)
    mover.emulator.set_fault(ext.address_of(dst) + 10000, 1)
    await mover.copy(dst, src)
    assert dst == src
    stats = mover.stats()
    assert stats["faults"] == 0 and stats["submitted"] == 1
    assert stats["emulator"]["blocked"] == 1


async def test_overlapping_copy_with_fault_runs_backwards_and_resumes(ext, make_mover):
    mover = make_mover(threshold=1)
    buf = bytearray(random.Random(5).randbytes(8 * 4096))
    expect = bytearray(buf)
    expect[9000 : 9000 + 16384] = buf[0:16384]
    view = memoryview(buf)
    mover.emulator.set_fault(ext.address_of(buf) + 20000, 1)
    await mover.copy(view[9000 : 9000 + 16384], view[0:16384])
    assert buf == expect
    assert mover.stats()["faults"] >= 1
