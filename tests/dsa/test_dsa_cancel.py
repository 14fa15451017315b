"""Cancellation: a buffer the device was given stays exported until the device is done."""

import array
import gc
import time
import weakref

import pytest
import trio


async def test_cancelled_copy_keeps_buffers_until_completion(make_mover):
    mover = make_mover(threshold=1, delay_us=500_000)  # a slow device (slow enough for a loaded machine)
    src = array.array("B", range(256)) * 400
    dst = array.array("B", bytes(len(src)))
    src_ref, dst_ref = weakref.ref(src), weakref.ref(dst)
    expected = bytes(src)

    with trio.move_on_after(0.02) as scope:
        await mover.copy(dst, src)
    assert scope.cancelled_caught
    assert mover.queue.in_flight == 1
    # Still exported to the device: cannot be resized (and so not moved).
    with pytest.raises(BufferError):
        src.append(1)
    with pytest.raises(BufferError):
        dst.append(1)
    # The caller lets go; the device's hold keeps both alive and in place.
    del src, dst
    gc.collect()
    assert src_ref() is not None and dst_ref() is not None
    # Once the device completes, the copy has happened and the holds go.
    dst = dst_ref()
    await mover._device.completions.wait_idle()
    assert bytes(dst) == expected
    dst.append(1)  # resizable again: no longer exported
    gc.collect()
    assert src_ref() is None  # nothing but the device held it


async def test_a_cancelled_copy_releases_its_buffers_when_the_device_is_done(make_mover):
    """With nobody calling the mover again: the poller releases them.
    (Before, they stayed exported until the next reap, which may never come.)"""
    mover = make_mover(threshold=1, delay_us=300_000)  # slow enough that the first check sees it exported
    src = array.array("B", range(256)) * 400
    dst = array.array("B", bytes(len(src)))
    with trio.move_on_after(0.01) as scope:
        await mover.copy(dst, src)
    assert scope.cancelled_caught
    await trio.lowlevel.checkpoint()  # trio lets go of the cancelled call's frames
    with pytest.raises(BufferError):
        dst.append(1)
    deadline = time.monotonic() + 5
    while mover.emulator.stats()["occupancy"] and time.monotonic() < deadline:
        time.sleep(0.01)  # no trio checkpoint, no mover call: nothing reaps
    assert bytes(dst) == bytes(src)  # the device copies before it counts the descriptor done
    # The poller thread releases the buffers once it sees the completion, a moment later: wait for that
    # (a resize fails while dst is exported), not for a guessed time.
    deadline = time.monotonic() + 5
    while True:
        try:
            dst.append(1)  # no longer exported
            break
        except BufferError:
            assert time.monotonic() < deadline, "the poller did not release the cancelled copy's buffers"
            time.sleep(0.01)
    src.append(1)


async def test_cancelled_waiter_hands_over_completion_reading(make_mover):
    """A cancelled task does not strand the others waiting on the same queue."""
    mover = make_mover(threshold=1, delay_us=20_000)
    bufs = [(bytes([i]) * 5000, bytearray(5000)) for i in range(4)]

    async with trio.open_nursery() as nursery:
        victim = trio.CancelScope()

        async def cancelled_copy():
            with victim:
                await mover.copy(bytearray(5000), b"v" * 5000)

        nursery.start_soon(cancelled_copy)
        await trio.sleep(0.005)
        for src, dst in bufs:
            nursery.start_soon(mover.copy, dst, src)
        await trio.sleep(0.005)
        victim.cancel()
    assert all(src == dst for src, dst in bufs)


async def test_aclose_waits_for_in_flight_work(make_mover):
    mover = make_mover(threshold=1, delay_us=50_000)
    dst = bytearray(10000)
    with trio.move_on_after(0.01):
        await mover.fill(dst, 0x77)
    await mover.aclose()
    assert dst == b"\x77" * 10000
    assert mover.queue.closed and mover.queue.in_flight == 0
