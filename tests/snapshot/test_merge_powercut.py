"""Power-cut simulation: the merge's fsync ordering, not just its logic.

A storage wrapper (:class:`PowerCutIO`) loses every write not yet synced
(or a random part of them) at a crash point; the crash is placed at every
I/O call of a merge in turn, then at a random point of the resume too.
The merge must always end with the target image.
"""

from __future__ import annotations

import random
import shutil

import pytest

from merge_testlib import PowerCut, PowerCutIO, merge_progress, torture_cow
from dmuserd.snapshot.merge import merge_cow


async def _merge(base, cow, **io_options):
    io_holder = []

    def make_io(base_fd, cow_fd):
        io = PowerCutIO(base_fd, cow_fd, **io_options)
        io_holder.append(io)
        return io

    try:
        await merge_cow(base, cow, offload="cpu", io_class=make_io)
        return True, io_holder[0].calls
    except PowerCut:
        return False, io_holder[0].calls


@pytest.mark.parametrize("keep_some,step", [(False, 1), (True, 2)], ids=["drop-all", "drop-half"])
async def test_power_cut_at_io_calls(tmp_path, keep_some, step):
    """Crash at every I/O call (every other one with a random half of the
    unsynced writes kept), crash again in the resume, then finish."""
    await _power_cuts(tmp_path, 22, keep_some, step)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3, 9, 24])
@pytest.mark.parametrize("keep_some", [False, True], ids=["drop-all", "drop-half"])
async def test_power_cut_at_every_io_call_slow(tmp_path, seed, keep_some):
    await _power_cuts(tmp_path, seed, keep_some, 1)


async def _power_cuts(tmp_path, seed, keep_some, step):
    t = torture_cow(tmp_path, seed, nblocks=80, buffer_size=32 << 10)
    work_base, work_cow = tmp_path / "work.img", tmp_path / "work.cow"
    shutil.copy(t["base"], work_base)
    shutil.copy(t["cow"], work_cow)
    done, calls = await _merge(work_base, work_cow)
    assert done and work_base.read_bytes() == t["target_bytes"]
    rng = random.Random(5)
    windows_recovered = 0
    for crash_at in range(1, calls + 1, step):
        shutil.copy(t["base"], work_base)
        shutil.copy(t["cow"], work_cow)
        done, _ = await _merge(work_base, work_cow, crash_at=crash_at, seed=crash_at, keep_some=keep_some)
        assert not done
        windows_recovered += merge_progress(work_cow)[1] == 2
        # a second power cut somewhere in the resume, then a clean resume
        done, _ = await _merge(work_base, work_cow, crash_at=rng.randrange(1, 40), seed=-crash_at,
                               keep_some=keep_some)
        if not done:
            done, _ = await _merge(work_base, work_cow)
        assert done
        assert work_base.read_bytes() == t["target_bytes"], f"wrong image after a power cut at I/O call {crash_at}"
    # the torture COW makes windows go through the scratch area
    assert windows_recovered > 0
