"""Crash-safe merge of a COW file without scratch space (``buffer_size`` 0), through its journal.

The Copy/Xor windows go to ``<cow>.merge-journal`` with the scratch area's
protocol. Power cuts (a storage that loses unsynced writes, journal
included) at every I/O call, and real merge processes SIGKILLed at random
instants, must all end with the exact target; the journal is gone once the
merge completes.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
from pathlib import Path

import pytest

from merge_testlib import PowerCut, PowerCutIO, merge_progress, sha256, torture_cow
from dmuserd.snapshot import _merge_journal
from dmuserd.snapshot.backend import SnapshotBackend
from dmuserd.snapshot.merge import MergeUnsafeError, merge_cow
from dmuserd.snapshot.merge_control import MergeState


class JournalPowerCutIO(PowerCutIO):
    """:class:`PowerCutIO` that also loses the journal's unsynced writes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dirty["journal"] = {}


def journal_window(cow) -> tuple[int, int] | None:
    """(first op, state byte) of the journal beside ``cow``, or None when there is none."""
    path = Path(_merge_journal.journal_path(cow))
    if not path.exists():
        return None
    raw = path.read_bytes()[: _merge_journal.HEADER_SIZE + 1]
    if len(raw) <= _merge_journal.HEADER_SIZE:
        return None  # killed while it was being made: the next run makes it again
    return struct.unpack_from("<QB", raw, _merge_journal.FIRST_OFFSET)


async def _merge(base, cow, **io_options) -> tuple[bool, int]:
    made = []

    def make_io(base_fd, cow_fd):
        made.append(JournalPowerCutIO(base_fd, cow_fd, **io_options))
        return made[-1]

    try:
        await merge_cow(base, cow, offload="cpu", io_class=make_io)
        return True, made[0].calls
    except PowerCut:
        return False, made[0].calls


def _fresh(t: dict, base: Path, cow: Path) -> None:
    shutil.copy(t["base"], base)
    shutil.copy(t["cow"], cow)
    Path(_merge_journal.journal_path(cow)).unlink(missing_ok=True)


@pytest.mark.parametrize("keep_some,step", [(False, 1), (True, 3)], ids=["drop-all", "drop-half"])
async def test_power_cut_at_io_calls_without_scratch_space(tmp_path, keep_some, step):
    t = torture_cow(tmp_path, 41, nblocks=80, buffer_size=0)
    assert t["counts"]["copy"] and t["counts"]["xor"]
    base, cow = tmp_path / "work.img", tmp_path / "work.cow"
    _fresh(t, base, cow)
    done, calls = await _merge(base, cow)
    assert done and base.read_bytes() == t["target_bytes"]
    assert journal_window(cow) is None  # removed once merged
    rng = random.Random(7)
    windows_recovered = 0
    for crash_at in range(1, calls + 1, step):
        _fresh(t, base, cow)
        done, _ = await _merge(base, cow, crash_at=crash_at, seed=crash_at, keep_some=keep_some)
        assert not done
        window = journal_window(cow)
        windows_recovered += window is not None and window[1] == 2 and window[0] == merge_progress(cow)[0]
        done, _ = await _merge(base, cow, crash_at=rng.randrange(1, 40), seed=-crash_at, keep_some=keep_some)
        if not done:
            done, _ = await _merge(base, cow)
        assert done
        assert base.read_bytes() == t["target_bytes"], f"wrong image after a power cut at I/O call {crash_at}"
    assert windows_recovered > 0  # some cuts left a durable journal window that the resume replayed


def test_merge_without_scratch_space_survives_sigkill(tmp_path):
    from test_merge_torture import ForkServer

    t = torture_cow(tmp_path, 42, nblocks=1024, buffer_size=0)
    base, cow = tmp_path / "work.img", tmp_path / "work.cow"
    server = ForkServer(tmp_path)
    rng = random.Random(42)
    stats = {"kills": 0, "journal_windows_left": 0, "completed": 0}
    try:
        _fresh(t, base, cow)
        import time

        # How long a whole merge takes: the faster of two (the first pays for cold caches; kill
        # moments drawn from a too-long span mostly land after the merge is done).
        full = float("inf")
        for _ in range(2):
            started = time.monotonic()
            code, _ = server.merge(base, cow, "cpu", tmp_path / "marks", None)
            full = min(full, time.monotonic() - started)
            assert code == 0, server.errors()
            assert sha256(base) == t["target_sha"] and journal_window(cow) is None
            _fresh(t, base, cow)
        runs = 0
        while (stats["kills"] < 30 or stats["journal_windows_left"] < 2) and runs < 400:
            runs += 1
            code, _ = server.merge(base, cow, "cpu", tmp_path / "marks", rng.uniform(0, full))
            if code == -signal.SIGKILL:
                stats["kills"] += 1
                window = journal_window(cow)
                stats["journal_windows_left"] += window is not None and window[1] == 2
                continue
            assert code == 0, server.errors()
            assert sha256(base) == t["target_sha"], "the merged base differs from the target"
            assert journal_window(cow) is None
            stats["completed"] += 1
            _fresh(t, base, cow)
        code, _ = server.merge(base, cow, "cpu", tmp_path / "marks", None)
        assert code == 0, server.errors()
        assert sha256(base) == t["target_sha"]
    finally:
        server.close()
    print(stats)
    # (30 kills are asked for; on a loaded machine the 400 runs may bring a few less)
    assert stats["kills"] >= 20 and stats["journal_windows_left"] >= 1, stats


async def test_online_merge_without_scratch_space(tmp_path):
    import trio

    t = torture_cow(tmp_path, 43, nblocks=400, buffer_size=0)
    backend = SnapshotBackend(t["base"], t["cow"], offload="cpu")
    try:
        async with trio.open_nursery() as nursery:
            backend.merge.start(nursery)
        assert backend.merge.state is MergeState.MERGED, backend.merge.error
        assert t["base"].read_bytes() == t["target_bytes"]
        assert journal_window(t["cow"]) is None
        assert bytes(await backend.read(0, len(t["target_bytes"]))) == t["target_bytes"]
    finally:
        await backend.close()


async def test_no_journal_can_be_written_is_refused_saying_where(tmp_path):
    t = torture_cow(tmp_path, 44, nblocks=100, buffer_size=0)
    where = Path(_merge_journal.journal_path(t["cow"]))
    where.mkdir()
    before = t["base"].read_bytes()
    with pytest.raises(MergeUnsafeError, match=f"no merge journal can be written at {where}"):
        await merge_cow(t["base"], t["cow"], offload="cpu")
    assert t["base"].read_bytes() == before


async def test_a_foreign_durable_journal_is_not_replayed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = torture_cow(tmp_path / "a", 45, nblocks=80, buffer_size=0)
    b = torture_cow(tmp_path / "b", 46, nblocks=80, buffer_size=0)
    # a's merge cut inside a journal window, its journal then found beside b's COW
    for crash_at in range(1, 200):
        _fresh(a, tmp_path / "a.img", tmp_path / "a.cow")
        done, _ = await _merge(tmp_path / "a.img", tmp_path / "a.cow", crash_at=crash_at, lose=False)
        window = journal_window(tmp_path / "a.cow")
        if not done and window is not None and window[1] == 2:
            break
    else:
        pytest.fail("no cut left a durable journal window")
    shutil.copy(_merge_journal.journal_path(tmp_path / "a.cow"), _merge_journal.journal_path(b["cow"]))
    before = b["base"].read_bytes()
    from dmuserd.snapshot.merge import MergeResumeError

    with pytest.raises(MergeResumeError, match="another COW file"):
        await merge_cow(b["base"], b["cow"], offload="cpu")
    assert b["base"].read_bytes() == before
    os.unlink(_merge_journal.journal_path(b["cow"]))
    await merge_cow(b["base"], b["cow"], offload="cpu")
    assert b["base"].read_bytes() == b["target_bytes"]
