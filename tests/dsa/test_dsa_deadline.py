"""A descriptor that never completes, and a device that reports an error.

Without a deadline a hung descriptor hangs its task and the daemon's
shutdown. With one, the queue is given up and reported, the work goes on on
the CPU, and the buffers the device was given stay exported (pinned): the
device may still write them. A software error (SWERR, what poll() on the
WQ fd reports) stops new submissions; what is in flight may still complete.
"""

import random
import time

import pytest
import trio

from dmuserd.dsa_offload import open_mover

TIMEOUT = 0.3


def mover_with(ext, **options):
    return open_mover("emulated", threshold=1, completion_timeout=TIMEOUT, emulator_options=options)


async def test_a_hung_descriptor_gives_the_queue_up_and_the_copy_finishes_on_the_cpu(ext):
    mover = mover_with(ext)
    src, dst = bytearray(random.Random(1).randbytes(100_000)), bytearray(100_000)
    mover.emulator.hang_next(1)
    with trio.fail_after(5):  # before: waited for ever
        await mover.copy(dst, src)
    assert dst == src
    stats = mover.stats()
    assert stats["fallbacks"] == {"completion_timeout": 1} and stats["completion_timeouts"] == 1
    assert "did not complete within" in stats["queue"]["broken"]
    assert stats["queue"]["in_flight"] == 1
    with pytest.raises(BufferError):  # still exported to the device
        src.append(0)
    # Later work goes straight to the CPU, saying why.
    other = bytearray(50_000)
    await mover.copy(other, bytes(range(250)) * 200)
    assert mover.stats()["fallbacks"] == {"completion_timeout": 2}
    with trio.fail_after(5):  # before: shutdown waited for the hung descriptor for ever
        await mover.aclose()
    assert mover.queue.closed and mover.queue.stranded == 1
    # The device completes it late: the buffers were never freed, and stay pinned.
    assert mover.emulator.release_hung() == 1
    with pytest.raises(BufferError):
        src.append(0)


async def test_every_waiter_stops_once_one_deadline_passes(ext):
    mover = mover_with(ext, size=8)
    mover.emulator.hang_next(5)
    pairs = [(random.Random(i).randbytes(40_000), bytearray(40_000)) for i in range(5)]
    start = time.monotonic()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for src, dst in pairs:
                nursery.start_soon(mover.copy, dst, src)
    assert time.monotonic() - start < 3 * TIMEOUT
    assert all(bytes(dst) == src for src, dst in pairs)
    assert mover.stats()["fallbacks"] == {"completion_timeout": 5}
    mover.close()  # the synchronous close does not hang either
    assert mover.queue.stranded == 5


async def test_a_device_error_stops_new_submissions_but_lets_in_flight_work_complete(ext):
    mover = mover_with(ext, delay_us=100_000)
    mover._device.completion_timeout = 5  # the slow descriptor must not look hung
    src, dst = random.Random(2).randbytes(60_000), bytearray(60_000)

    async def raise_error_meanwhile():
        await trio.sleep(0.03)
        mover.emulator.raise_swerr()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(raise_error_meanwhile)
        await mover.copy(dst, src)  # in flight when the error is logged: completes on the device
    assert dst == src
    assert mover.stats()["offloaded_bytes"] == 60_000
    other = bytearray(60_000)
    await mover.copy(other, src)  # after it: the CPU
    assert other == src
    stats = mover.stats()
    assert stats["fallbacks"] == {"device_error": 1} and stats["device_errors"] == 1
    assert stats["queue"]["device_error"] is True and "SWERR" in stats["queue"]["broken"]
    await mover.aclose()
    assert mover.queue.stranded == 0


async def test_a_device_error_before_opening_keeps_the_queue_unused(ext):
    emu = ext.Emulator()
    emu.raise_swerr()
    mover = open_mover("emulated", threshold=1, emulator=emu)
    data = bytes(range(256)) * 100
    assert await mover.crc32c(data) == await open_mover("cpu").crc32c(data)
    stats = mover.stats()
    assert stats["submitted"] == 0 and stats["fallbacks"] == {"device_error": 1}
    await mover.aclose()


async def test_a_hung_batch_falls_back_too(ext):
    mover = open_mover("emulated", threshold=8192, completion_timeout=TIMEOUT)
    mover.emulator.hang_next(1)
    srcs = [bytes([i]) * 3000 for i in range(4)]
    dsts = [bytearray(3000) for _ in srcs]
    with trio.fail_after(5):
        assert await mover.batch([("copy", d, s) for d, s in zip(dsts, srcs)]) == [None] * 4
    assert [bytes(d) for d in dsts] == srcs
    assert mover.stats()["fallbacks"] == {"completion_timeout": 4}
    await mover.aclose()
