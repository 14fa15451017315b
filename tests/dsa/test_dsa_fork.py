"""fork(): the child reopens its queue and never touches the parent's."""

import json
import os

import trio

from dmuserd.dsa_offload import open_mover


async def _round_trip(mover, fill_byte):
    src = bytes([fill_byte]) * 100_000
    dst = bytearray(len(src))
    await mover.copy(dst, src)
    return dst == src


def test_child_reopens_and_works(ext):
    mover = open_mover("emulated", threshold=1)
    try:
        parent = os.getpid()
        assert trio.run(_round_trip, mover, 1)
        assert mover.queue.pid == parent and mover.queue.generation == 0
        parent_descriptors = mover.emulator.stats()["descriptors"]

        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # the child: report, and leave without running pytest's cleanup
            try:
                ok = trio.run(_round_trip, mover, 2)
                report = {"ok": ok, "pid": os.getpid(), "queue_pid": mover.queue.pid,
                          "generation": mover.queue.generation, "descriptors": mover.emulator.stats()["descriptors"],
                          "submitted": mover.stats()["submitted"]}
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                report = {"error": repr(exc)}
            os.write(write_end, json.dumps(report).encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as f:
            report = json.loads(f.read())
        os.waitpid(child, 0)

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
