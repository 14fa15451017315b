"""The merge engine's pipeline: a step's commit runs beside the next step's reads.

What must hold however the two overlap: no write of a step before the
previous step's progress is durable (the I/O order of the protocol), no
progress for a step whose read-back differs, and the merge's own errors
coming out as themselves (not wrapped in the nursery's exception group),
after which a rerun ends with the target.
"""

from __future__ import annotations

import errno
import shutil
import threading

import pytest

from merge_testlib import merge_progress, torture_cow
from dmuserd.snapshot.merge import MergeIO, MergeResumeError, MergeVerifyError, merge_cow


class TracingIO(MergeIO):
    """Records every call as ``(kind, file, offset)`` in the order they ran."""

    def __init__(self, base_fd: int, cow_fd: int) -> None:
        super().__init__(base_fd, cow_fd)
        self.calls: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()

    def preadv(self, which, views, offset):
        with self._lock:
            self.calls.append(("read", which, offset))
            super().preadv(which, views, offset)

    def pwritev(self, which, views, offset):
        with self._lock:
            self.calls.append(("write", which, offset))
            super().pwritev(which, views, offset)

    def fsync(self, which):
        with self._lock:
            self.calls.append(("sync", which, -1))
            super().fsync(which)


def _work(tmp_path, t):
    base, cow = tmp_path / "work.img", tmp_path / "work.cow"
    shutil.copy(t["base"], base)
    shutil.copy(t["cow"], cow)
    return base, cow


async def test_steps_write_only_after_the_previous_commit(tmp_path):
    """Between a base write and the progress write that commits it, the only
    other calls are reads and the base's sync: the next step writes nothing
    (neither its scratch window nor the base) before the commit is durable."""
    t = torture_cow(tmp_path, 31, nblocks=400, buffer_size=16 << 10)
    base, cow = _work(tmp_path, t)
    made: list[TracingIO] = []
    await merge_cow(base, cow, offload="cpu", io_class=lambda b, c: made.append(TracingIO(b, c)) or made[-1])
    assert base.read_bytes() == t["target_bytes"]
    calls = [c for c in made[0].calls if c[0] != "read"]
    commits = 0
    uncommitted = False  # base written since the last progress write
    for i, (kind, which, offset) in enumerate(calls):
        if kind == "write" and which == "base":
            uncommitted = True
        elif kind == "write" and which == "cow" and offset == 0:  # the progress (header) write
            assert calls[i - 1] == ("sync", "base", -1), f"progress written before the base was synced: {calls[i-3:i+1]}"
            assert calls[i + 1] == ("sync", "cow", -1), "the progress write is not synced next"
            uncommitted = False
            commits += 1
        elif kind == "write":  # a scratch write: the previous step must be committed
            assert not uncommitted, f"a scratch write at call {i} before the previous step's commit"
    assert not uncommitted
    assert commits >= 4  # several steps ran, so several could have overlapped


class CorruptReadBackIO(MergeIO):
    """Flips one byte of the base as read back after the ``bad``-th base write."""

    def __init__(self, base_fd: int, cow_fd: int, bad: int) -> None:
        super().__init__(base_fd, cow_fd)
        self.writes, self.bad, self.armed = 0, bad, False

    def pwritev(self, which, views, offset):
        super().pwritev(which, views, offset)
        if which == "base":
            self.writes += 1
            self.armed = self.writes == self.bad

    def preadv(self, which, views, offset):
        super().preadv(which, views, offset)
        if which == "base" and self.armed:
            self.armed = False
            views[0][0] ^= 0xFF


async def test_failed_read_back_commits_nothing_of_its_step(tmp_path):
    t = torture_cow(tmp_path, 32, nblocks=400, buffer_size=16 << 10)
    base, cow = _work(tmp_path, t)
    with pytest.raises(MergeVerifyError, match="reads back differently"):
        await merge_cow(base, cow, offload="cpu", io_class=lambda b, c: CorruptReadBackIO(b, c, bad=12))
    merged, _ = merge_progress(cow)
    assert 0 < merged < t["total_ops"]  # earlier steps committed, the failing one not
    result = await merge_cow(base, cow, offload="cpu")
    assert result.merged_before == merged
    assert base.read_bytes() == t["target_bytes"]


class FailingSyncIO(MergeIO):
    """The ``fail_at``-th sync of the COW file fails with EIO (a commit's, or a scratch window's)."""

    def __init__(self, base_fd: int, cow_fd: int, fail_at: int) -> None:
        super().__init__(base_fd, cow_fd)
        self.syncs, self.fail_at = 0, fail_at

    def fsync(self, which):
        if which == "cow":
            self.syncs += 1
            if self.syncs == self.fail_at:
                raise OSError(errno.EIO, "injected sync failure")
        super().fsync(which)


@pytest.mark.parametrize("fail_at", [3, 8, 17])
async def test_commit_error_comes_out_as_itself(tmp_path, fail_at):
    t = torture_cow(tmp_path, 33, nblocks=400, buffer_size=16 << 10)
    base, cow = _work(tmp_path, t)
    with pytest.raises(OSError) as caught:
        await merge_cow(base, cow, offload="cpu", io_class=lambda b, c: FailingSyncIO(b, c, fail_at))
    assert type(caught.value) is OSError and caught.value.errno == errno.EIO
    assert merge_progress(cow)[0] < t["total_ops"]
    await merge_cow(base, cow, offload="cpu")
    assert base.read_bytes() == t["target_bytes"]


class PythonRunsIO(MergeIO):
    """MergeIO through its Python calls (``preadv``/``pwritev`` overridden as
    themselves: the ``*_runs`` methods then go run by run, not to the extension)."""

    def preadv(self, which, views, offset):
        super().preadv(which, views, offset)

    def pwritev(self, which, views, offset):
        super().pwritev(which, views, offset)


def test_runs_in_one_call_match_the_python_calls(tmp_path):
    """The extension's pwritev_runs/preadv_runs do what MergeIO's Python calls
    do: scattered runs of several views each, a run past IOV_MAX views, and a
    read that the end of the file cuts short, named the same way."""
    _merge_engine = pytest.importorskip("dmuserd.snapshot._merge_engine")
    if _merge_engine._NATIVE is None:
        pytest.skip("the optional _merge_io extension is not built (no C compiler at install)")
    import os
    import random

    rng = random.Random(4)
    size = 1 << 20
    runs_data = []
    for slot in rng.sample(range(15), 12):  # runs that do not overlap (slot 15 takes the long run)
        offset = slot * 65536 + rng.randrange(0, 4096)
        pieces = [rng.randbytes(rng.randrange(1, 3000)) for _ in range(rng.randrange(1, 6))]
        runs_data.append((offset, pieces))
    many = [bytes([i % 251]) * 3 for i in range(2500)]  # more views than IOV_MAX (1024)
    runs_data.append((size - 8192, many))
    images = []
    for cls in (MergeIO, PythonRunsIO):
        path = tmp_path / f"{cls.__name__}.img"
        path.write_bytes(bytes(size))
        fd = os.open(path, os.O_RDWR)
        try:
            io = cls(fd, -1)
            io.pwritev_runs("base", [(o, [memoryview(p) for p in ps]) for o, ps in runs_data])
            backs = [(o, [memoryview(bytearray(len(p))) for p in ps]) for o, ps in runs_data]
            io.preadv_runs("base", backs)
            assert [[bytes(v) for v in vs] for _, vs in backs] == [ps for _, ps in runs_data]
            with pytest.raises(MergeResumeError, match=r"the base file ends at 1048576, a read of 4096 bytes at 1046528"):
                io.preadv_runs("base", [(0, [memoryview(bytearray(10))]), (size - 2048, [memoryview(bytearray(4096))])])
        finally:
            os.close(fd)
        images.append(path.read_bytes())
    assert images[0] == images[1]
