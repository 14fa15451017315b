"""Submission through write() (where mapping the portal is refused), against
the emulator's model of the kernel's WQ character device (cdev.c's
idxd_submit_user_descriptor): EINVAL for a BATCH where user submission is
not safe, EAGAIN after the kernel's own ENQCMDS retries on a full shared
queue, no feedback on a dedicated one."""

import errno
import random
import threading
import time

import pytest

from dmuserd.dsa_offload import open_mover


def test_a_batch_is_refused_with_einval_where_user_submission_is_not_safe(ext):
    emu = ext.Emulator(user_submission_safe=False)
    queue = ext.Queue(emulator=emu, portal="write")
    dsts = [bytearray(64) for _ in range(2)]
    with pytest.raises(OSError) as err:
        queue.submit_batch([(4, {"dst": d, "size": 64, "pattern": 1}) for d in dsts])
    assert err.value.errno == errno.EINVAL
    assert queue.in_flight == 0 and queue.refused == 1 and emu.stats()["write_errors"] == 1
    op = queue.submit(4, dst=dsts[0], size=64, pattern=1)  # a plain descriptor goes through
    assert op is not None
    queue.close()
    assert dsts[0] == b"\x01" + bytes(7) + (b"\x01" + bytes(7)) * 7
    # Where it is safe, the kernel passes a BATCH on.
    safe = ext.Queue(emulator=ext.Emulator(), portal="write")
    assert safe.submit_batch([(4, {"dst": d, "size": 64, "pattern": 2}) for d in dsts]) is not None
    safe.close()


def test_a_full_shared_queue_answers_eagain_once_and_the_gil_is_free_meanwhile(ext):
    """One write() per refused submission (the kernel already retried), run
    without the GIL. Before: 64 write() calls, all with the GIL held."""
    emu = ext.Emulator(mode="shared", size=1, delay_us=400_000, enqcmds_retries=2, refuse_delay_us=20_000)
    queue = ext.Queue(emulator=emu, portal="write", size=2)  # believes it holds two: the second is refused
    assert queue.submit(4, dst=bytearray(4096), size=4096, pattern=1) is not None
    ticks, stop = [0], threading.Event()

    def tick():
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.002)

    thread = threading.Thread(target=tick)
    thread.start()
    time.sleep(0.01)
    before = ticks[0]
    start = time.monotonic()
    assert queue.submit(4, dst=bytearray(4096), size=4096, pattern=2) is None  # EAGAIN: full
    elapsed, during = time.monotonic() - start, ticks[0] - before
    stop.set()
    thread.join()
    stats = emu.stats()
    assert stats["writes"] == 2 and stats["write_errors"] == 1  # one write() for the refused one
    # The call took the kernel's three ENQCMDS attempts (20 ms each, about 30 ticks of the
    # other thread), never waiting for the first descriptor (400 ms): the counts above say it
    # was refused, not served late. With the GIL held throughout, the other thread could not tick.
    assert during >= 2, f"the other thread ran {during} times in {elapsed:.3f} s"
    assert queue.full == 1 and queue.retries == 1  # refused attempts: one
    queue.close()


async def test_the_mover_on_a_write_queue(ext):
    mover = open_mover("emulated", threshold=1, portal="write", emulator_options={"size": 4})
    assert mover.queue.kind == "write" and "write()" in mover.queue.portal_note
    src, dst = random.Random(1).randbytes(300_000), bytearray(300_000)
    await mover.copy(dst, src)
    assert dst == src and mover.stats()["fallbacks"] == {}
    assert mover.emulator.stats()["writes"] == mover.stats()["submitted"]
    await mover.aclose()
