"""fork(): the child never touches the parent's queue; it reopens its own where the kernel lets it.

A dedicated work queue admits one opener and the parent still holds it, so
a child's reopen fails with EBUSY (as the kernel's idxd_cdev_open answers):
the child goes on on the CPU and says why. A shared queue reopens.
(This file used to pin a child reopening a dedicated queue.)
"""

import errno
import json
import os

import trio

from dmuserd.dsa_offload import open_mover


async def _round_trip(mover, fill_byte):
    src = bytes([fill_byte]) * 100_000
    dst = bytearray(len(src))
    await mover.copy(dst, src)
    return dst == src


def in_child(fn) -> dict:
    """Run ``fn()`` in a forked child; return the dict it returned (or the error it raised)."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report, and leave without running pytest's cleanup
        try:
            report = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            report = {"error": repr(exc)}
        os.write(write_end, json.dumps(report).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        report = json.loads(f.read())
    os.waitpid(child, 0)
    return report


def test_a_child_cannot_reopen_a_dedicated_queue_and_goes_on_on_the_cpu(ext):
    mover = open_mover("emulated", threshold=1)
    try:
        assert trio.run(_round_trip, mover, 1)
        parent_descriptors = mover.emulator.stats()["descriptors"]

        def child():
            try:  # the child's first use of the queue: its reopen fails
                mover.queue.reap()
                reap = "returned"
            except OSError as exc:
                reap = f"OSError {exc.errno}"
            except SystemError as exc:  # what it raised before: a result with an exception set
                reap = f"SystemError {exc}"
            ok = trio.run(_round_trip, mover, 2)
            trio.run(mover.aclose)
            stats = mover.stats()
            return {"reap": reap, "ok": ok, "fallbacks": stats["fallbacks"], "broken": stats["queue"]["broken"],
                    "descriptors": mover.emulator.stats()["descriptors"]}

        report = in_child(child)
        assert "error" not in report, report
        assert report["reap"] == f"OSError {errno.EBUSY}"
        assert report["ok"] and report["fallbacks"] == {"queue_unusable": 1}
        assert "busy" in report["broken"].lower()
        assert report["descriptors"] == parent_descriptors  # nothing reached any device
        assert mover.emulator.stats()["descriptors"] == parent_descriptors
        assert trio.run(_round_trip, mover, 3)  # the parent's queue still works
    finally:
        mover.close()


def test_a_child_reopens_a_shared_queue_and_works(ext):
    mover = open_mover("emulated", threshold=1, emulator_options={"mode": "shared"})
    try:
        parent = os.getpid()
        assert trio.run(_round_trip, mover, 1)
        assert mover.queue.pid == parent and mover.queue.generation == 0
        parent_descriptors = mover.emulator.stats()["descriptors"]

        def child():
            ok = trio.run(_round_trip, mover, 2)
            return {"ok": ok, "pid": os.getpid(), "queue_pid": mover.queue.pid, "generation": mover.queue.generation,
                    "descriptors": mover.emulator.stats()["descriptors"], "submitted": mover.stats()["submitted"]}

        report = in_child(child)
        assert "error" not in report, report
        assert report["ok"]
        assert report["queue_pid"] == report["pid"] != parent  # reopened in the child
        assert report["generation"] == 1
        # The child's descriptors went to the child's device: counted from where
        # the copied emulator stood, and nothing reached the parent's.
        assert report["descriptors"] > parent_descriptors
        assert mover.emulator.stats()["descriptors"] == parent_descriptors
        assert mover.queue.pid == parent and mover.queue.generation == 0
        assert trio.run(_round_trip, mover, 3)  # the parent's queue still works
    finally:
        mover.close()
