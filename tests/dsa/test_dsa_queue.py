"""Batches, the queue-size limit, shared-queue retry, and what the mover counts."""

import random

import crc32c
import pytest
import trio

from dmuserd.dsa_offload import DsaArgumentError, open_mover


async def test_batch_list_fault_is_resolved_and_resubmitted(make_mover):
    """The batch's list page is missing: the page is touched, the batch goes again."""
    mover = make_mover(threshold=10000)
    srcs = [bytes([i]) * 3000 for i in range(4)]
    dsts = [bytearray(3000) for _ in range(4)]
    mover.emulator.fault_batch_list(0)
    assert await mover.batch([("copy", d, s) for d, s in zip(dsts, srcs)]) == [None] * 4
    assert [bytes(d) for d in dsts] == srcs
    stats = mover.stats()
    assert stats["faults"] == 1 and stats["emulator"]["members"] == 4 and stats["fallbacks"] == {}


async def test_batch_with_a_failing_member(ext, make_mover):
    mover = make_mover(threshold=10000)
    rng = random.Random(10)
    srcs = [bytearray(rng.randbytes(3000)) for _ in range(6)]
    # Destinations a page apart in their own mapping: the injected fault
    # must not share a page with the mover's descriptor list.
    area = memoryview(bytearray(64 * 4096))
    dsts = [area[(8 + 2 * i) * 4096 : (8 + 2 * i) * 4096 + 3000] for i in range(6)]
    # Member 3's destination faults: it fails inside the batch and is resumed alone.
    mover.emulator.set_fault(ext.address_of(dsts[3]) + 1500, 1)
    requests = [("copy", d, s) for d, s in zip(dsts, srcs)] + [("crc32c", srcs[0], 9), ("fill", bytearray(3000), 0xAB)]
    results = await mover.batch(requests)
    assert results == [None] * 6 + [crc32c.crc32c(srcs[0], 9), None]
    assert dsts == srcs
    assert requests[-1][1] == b"\xab" * 3000
    stats = mover.stats()
    assert stats["batches"] == 1 and stats["emulator"]["batches"] == 1 and stats["emulator"]["members"] == 8
    assert stats["batch_member_failures"] == 1 and stats["faults"] == 1


async def test_small_batch_stays_on_the_cpu(make_mover):
    mover = make_mover(threshold=1 << 20)
    dst = bytearray(100)
    assert await mover.batch([("copy", dst, b"x" * 100), ("crc32c", b"abc")]) == [None, crc32c.crc32c(b"abc")]
    assert dst == b"x" * 100
    assert mover.stats()["batches"] == 0 and mover.stats()["fallbacks"] == {"below_threshold": 2}


async def test_batch_rejects_unbatchable(make_mover):
    mover = make_mover()
    with pytest.raises(DsaArgumentError):
        await mover.batch([("create_delta", bytes(8), bytes(8))])


async def test_dedicated_queue_limit_under_a_flood(make_mover):
    """More copies than the queue holds: they take turns on the device.

    (This test used to pin the opposite: what did not fit went to the CPU,
    as ``queue_full`` fallbacks, though the mover had filled the queue itself.)"""
    mover = make_mover(threshold=1, size=4, delay_us=300)
    rng = random.Random(11)
    pairs = [(bytearray(rng.randbytes(20000)), bytearray(20000)) for _ in range(60)]

    async with trio.open_nursery() as nursery:
        for src, dst in pairs:
            nursery.start_soon(mover.copy, dst, src)
    assert all(src == dst for src, dst in pairs)
    stats = mover.stats()
    emu = stats["emulator"]
    assert emu["overflows"] == 0
    assert emu["max_occupancy"] == 4  # the limit was reached, never passed
    assert stats["fallbacks"] == {} and stats["cpu_ops"] == 0 and stats["offloaded_bytes"] == 60 * 20000
    assert stats["slot_waits"] > 0 and stats["queue"]["full"] == 0


async def test_a_large_copy_split_beyond_the_queue_size_stays_on_the_device(make_mover):
    """4 MiB in 64 KiB pieces on a 16-entry queue: every piece on the device
    (before: the pieces beyond the queue's size ran on the CPU, about half)."""
    mover = make_mover(threshold=4096, size=16, max_transfer=64 << 10)
    src = random.Random(14).randbytes(4 << 20)
    dst = bytearray(len(src))
    await mover.copy(dst, src)
    assert dst == src
    stats = mover.stats()
    assert stats["offloaded_bytes"] == 4 << 20 and stats["fallbacks"] == {} and stats["cpu_bytes"] == 0
    assert stats["submitted"] == 64 and stats["emulator"]["max_occupancy"] <= 16


@pytest.mark.parametrize("size,threaded", [(1 << 20, True), (100 << 10, False)])
async def test_big_fallbacks_run_in_a_worker_thread(ext, make_mover, monkeypatch, size, threaded):
    import threading

    from dmuserd.dsa_offload import _ops

    seen = []
    original = _ops.Copy.cpu

    def cpu(op):
        seen.append((threading.current_thread() is threading.main_thread(), op.nbytes()))
        original(op)

    monkeypatch.setattr(_ops.Copy, "cpu", cpu)
    mover = make_mover(threshold=1, max_transfer=4 << 20)
    src, dst = random.Random(15).randbytes(size), bytearray(size)
    mover.emulator.set_fault(ext.address_of(dst) + 100, 1, sticky=True)  # the device cannot do any of it
    await mover.copy(dst, src)
    assert dst == src
    assert mover.stats()["fallbacks"] == {"fault_unresolved": 1}
    assert seen == [(not threaded, size)]


async def test_emulator_catches_an_overrun_dedicated_queue(ext):
    """The guard above can fail: a queue that believes it is larger overflows."""
    emu = ext.Emulator(size=2, delay_us=20000)
    queue = ext.Queue(emulator=emu, size=6)
    bufs = [bytearray(64) for _ in range(5)]
    ops = [queue.submit(4, dst=b, size=64, pattern=1) for b in bufs]
    assert all(op is not None for op in ops)
    assert emu.stats()["overflows"] == 3
    queue.close()  # waits for all five
    assert all(b == b"\x01\0\0\0\0\0\0\0" * 8 for b in bufs)
    assert all(op.status == 1 for op in ops)


async def test_second_open_of_dedicated_queue_is_busy(ext):
    emu = ext.Emulator()
    queue = ext.Queue(emulator=emu)
    with pytest.raises(OSError) as err:
        ext.Queue(emulator=emu)
    assert err.value.errno == 16  # EBUSY
    queue.close()
    ext.Queue(emulator=emu).close()  # free again once closed


async def test_shared_queue_answers_retry(ext):
    emu = ext.Emulator(mode="shared", size=3, delay_us=400)
    movers = [open_mover("emulated", threshold=1, emulator=emu) for _ in range(3)]
    rng = random.Random(12)
    pairs = [(bytearray(rng.randbytes(5000)), bytearray(5000)) for _ in range(45)]

    async with trio.open_nursery() as nursery:
        for i, (src, dst) in enumerate(pairs):
            nursery.start_soon(movers[i % 3].copy, dst, src)
    assert all(src == dst for src, dst in pairs)
    retries = sum(m.queue.retries for m in movers)
    assert retries > 0 and emu.stats()["retries"] == retries
    assert emu.stats()["overflows"] == 0 and emu.stats()["max_occupancy"] <= 3
    # Gave-up retries became CPU fallbacks, counted as a full queue.
    assert sum(m.stats()["fallbacks"].get("queue_full", 0) for m in movers) > 0
    for m in movers:
        await m.aclose()


async def test_threshold_policy_and_stats(make_mover):
    mover = make_mover(threshold=8192)
    small_src, small_dst = b"s" * 100, bytearray(100)
    big_src, big_dst = b"b" * 100000, bytearray(100000)
    await mover.copy(small_dst, small_src)
    await mover.copy(big_dst, big_src)
    assert small_dst == small_src and big_dst == big_src
    stats = mover.stats()
    assert stats["fallbacks"] == {"below_threshold": 1}
    assert stats["offloaded_ops"] == 1 and stats["offloaded_bytes"] == 100000
    assert stats["cpu_bytes"] == 100


async def test_large_operations_split_by_max_transfer(make_mover):
    mover = make_mover(threshold=1, max_transfer=16384)
    rng = random.Random(13)
    src = bytearray(rng.randbytes(100000))
    dst = bytearray(100000)
    await mover.copy(dst, src)
    assert dst == src
    assert await mover.crc32c(src, 3) == crc32c.crc32c(src, 3)  # sequential pieces chain the seed
    dst[77777] ^= 1
    assert await mover.compare(src, dst) == 77777
    assert mover.stats()["submitted"] == 7 + 7 + 7


async def test_argument_errors(make_mover):
    mover = make_mover()
    with pytest.raises(DsaArgumentError):
        await mover.copy(bytearray(10), bytes(11))
    with pytest.raises(DsaArgumentError):
        await mover.copy(bytes(10), bytes(10))  # read-only destination
    with pytest.raises(DsaArgumentError):
        await mover.create_delta(bytes(12), bytes(12))  # not a multiple of 8
    with pytest.raises(ValueError):
        await mover.fill(bytearray(8), b"abc")
