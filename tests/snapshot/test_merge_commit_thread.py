"""The merge's commit thread: a step's I/O in one call, and the hooks of an
online merge hearing of each commit before the next window.

Offline, the commit thread takes the steps one after another without going
back to the event loop (``_merge_engine.MergeEngine._commit_steps``); with
hooks it must still wait, since a window is published only once the one
before it is retired. ``MergeIO.run_program`` makes a step's writes,
read-back, syncs and pipe signal: the extension's call and the Python ops
(taken when a subclass overrides ``pwritev``, ``preadv`` or ``fsync``) must
do the same.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import trio

from merge_testlib import torture_cow
from dmuserd.dsa_offload import open_mover
from dmuserd.snapshot._cow_reader import CowReader
from dmuserd.snapshot._merge_engine import _NATIVE, MergeEngine, MergeHooks
from dmuserd.snapshot.merge import MergeIO, plan_merge, read_state


class PythonSyncIO(MergeIO):
    """MergeIO through its Python calls (``fsync`` overridden as itself)."""

    def fsync(self, which):
        super().fsync(which)


@pytest.mark.parametrize("cls", [MergeIO, PythonSyncIO])
def test_run_program_makes_each_op_and_stops_where_the_read_back_differs(tmp_path, cls):
    """The extension's program and the Python ops alike: writes, a read-back
    compared with the data, syncs (counted), a notify byte, a wait going on
    at byte 1; a read-back that differs stops the program there (its offset
    in the data returned, nothing after it made), and so does a wait reading
    byte 0 (-2); a failing write raises the errno and notifies nobody."""
    if cls is MergeIO and _NATIVE is None:
        pytest.skip("the optional _merge_io extension is not built (no C compiler at install)")
    base, cow = tmp_path / "base.img", tmp_path / "t.cow"
    base.write_bytes(bytes(1 << 16))
    cow.write_bytes(bytes(4096))
    data = bytearray(b"a" * 100 + b"b" * 50 + b"c" * 4096)
    view = memoryview(data)
    runs = [(4096, [view[:100], view[100:150]]), (40000, [view[150:]])]
    back = bytearray(len(data))
    back_runs = [(4096, [memoryview(back)[:150]]), (40000, [memoryview(back)[150:]])]
    written_r, written_w = os.pipe2(os.O_NONBLOCK)
    go_r, go_w = os.pipe()
    fds = [os.open(base, os.O_RDWR), os.open(cow, os.O_RDWR)]
    try:
        io = cls(*fds)

        def program(mark: bytes, expect=data):
            return [("write", "base", runs), ("verify", "base", back_runs, expect, back), ("notify", written_w),
                    ("sync", "base"), ("wait", go_r), ("write", "cow", [(0, [mark])]), ("sync", "cow")]

        os.write(go_w, b"\1")
        differs, syncs, seconds = io.run_program(program(b"yes"))
        assert differs == -1 and syncs == 2 and isinstance(seconds, float) and seconds >= 0
        assert os.read(written_r, 16) == b"\1"  # one byte: the step was written and read back equal
        image = base.read_bytes()
        assert image[4096:4246] == b"a" * 100 + b"b" * 50 and image[40000:44096] == b"c" * 4096
        assert image[:4096] == bytes(4096) and image[4246:40000] == bytes(40000 - 4246)
        assert cow.read_bytes()[:3] == b"yes" and back == data
        other = bytearray(data)
        other[2000] ^= 1  # what "was written" differs from the file at data offset 2000: stop there
        assert io.run_program(program(b"no!", expect=other))[:2] == (2000, 0)
        assert cow.read_bytes()[:3] == b"yes"  # nothing after the verify was made
        with pytest.raises(BlockingIOError):
            os.read(written_r, 16)
        os.write(go_w, b"\0")  # a stop: the progress is not written
        assert io.run_program(program(b"no!"))[:2] == (-2, 1)
        assert os.read(written_r, 16) == b"\1" and cow.read_bytes()[:3] == b"yes"
        # a write that fails raises and tells nobody it was written
        bad = cls(os.open(base, os.O_RDONLY), fds[1])
        try:
            with pytest.raises(OSError) as caught:
                bad.run_program(program(b"bad"))
            assert caught.value.errno == errno.EBADF
        finally:
            os.close(bad.fds["base"])
        with pytest.raises(BlockingIOError):
            os.read(written_r, 16)
    finally:
        for fd in (*fds, written_r, written_w, go_r, go_w):
            os.close(fd)


class RecordingHooks(MergeHooks):
    """Records what the online merge tells: ("window", first new block, blocks) and ("committed", first, end)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    async def window_ready(self, new_blocks, data) -> None:
        await trio.lowlevel.checkpoint()
        self.events.append(("window", new_blocks[0], len(new_blocks)))

    def committed(self, first: int, end: int) -> None:
        self.events.append(("committed", first, end))


async def test_hooks_hear_each_commit_before_the_next_window(tmp_path):
    """With hooks (an online merge), every window is published only after
    every op before it was committed and told, and the commits are told in
    order, each once: the offline chain (steps written straight after the
    previous commit, the next one prepared meanwhile) must not reach here."""
    t = torture_cow(tmp_path, 41, nblocks=600, buffer_size=16 << 10)
    base, cow = tmp_path / "work.img", tmp_path / "work.cow"
    shutil.copy(t["base"], base)
    shutil.copy(t["cow"], cow)
    reader = CowReader(cow, check_merge=False)
    base_fd, cow_fd = os.open(base, os.O_RDWR), os.open(cow, os.O_RDWR)
    try:
        plan = plan_merge(reader, os.path.getsize(base), journal=False)
        io = MergeIO(base_fd, cow_fd)
        hooks = RecordingHooks()
        async with open_mover("cpu") as mover:
            engine = MergeEngine(reader, plan, io, mover, read_state(io, reader, plan), hooks=hooks)
            assert await engine.run() == plan.total_ops
    finally:
        os.close(base_fd)
        os.close(cow_fd)
        reader.close()
    assert base.read_bytes() == t["target_bytes"]
    windows = [e for e in hooks.events if e[0] == "window"]
    assert len(windows) >= 4  # several windows, so a later one could have come early
    told = 0  # ops committed and told so far
    for event in hooks.events:
        if event[0] == "committed":
            assert event[1] == told and event[2] > told, f"commits told out of order: {hooks.events}"
            told = event[2]
        else:  # the window's ops start where the told commits end: nothing of it or after it is committed
            assert plan.table.new_block[plan.order[told]] == event[1], f"window published early: {hooks.events}"
    assert told == plan.total_ops
