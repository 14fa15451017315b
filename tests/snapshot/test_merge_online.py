"""Online merge of a served snapshot backend (in-process, real files and threads).

Readers hammer random blocks through ``SnapshotBackend.read`` (the inline
path and the worker-thread path) while the merge runs, pauses and resumes;
every read is checked against the target image.
"""

from __future__ import annotations

import random

import pytest
import trio

from cow_helpers import BS, build_v2
from merge_testlib import interrupt_in_window, merge_progress, torture_cow
from dmuserd.errors import DmuserdError
from dmuserd.snapshot.backend import SnapshotBackend
from dmuserd.snapshot.cow import OpType
from dmuserd.snapshot.merge import MergeStateError, MergeUnsafeError
from dmuserd.snapshot.merge_control import MergeState


async def _hammer(backend, target: bytes, seed: int, stop: trio.Event, stats: dict) -> None:
    rng = random.Random(seed)
    size = len(target)
    while not stop.is_set():
        kind = rng.randrange(4)
        if kind == 0:  # a sector somewhere (inline path)
            offset, length = rng.randrange(size // 512) * 512, 512
        elif kind == 1:  # one block
            offset, length = rng.randrange(size // BS) * BS, BS
        else:  # several blocks, across windows and op kinds
            offset = rng.randrange(size // BS) * BS
            length = min(rng.randrange(2, 40) * BS, size - offset)
        data = await backend.read(offset, length)
        stats["reads"] += 1
        if bytes(data) != target[offset : offset + length]:
            stats["mismatches"].append((offset, length, backend.merge.state, backend.merge.merged_ops))
        await trio.sleep(0)


@pytest.mark.parametrize("engine", ["cpu", "emulated"])
async def test_online_merge_with_readers_pause_and_resume(tmp_path, engine):
    t = torture_cow(tmp_path, 31, nblocks=2048, buffer_size=64 << 10)
    target = t["target_bytes"]
    backend = SnapshotBackend(t["base"], t["cow"], offload=engine)
    control = backend.merge
    assert control.state is MergeState.NOT_STARTED and control.percent() == 0.0
    with pytest.raises(MergeStateError):
        control.pause()
    stats = {"reads": 0, "mismatches": []}
    stop = trio.Event()
    rng = random.Random(3)
    pauses = 0
    async with trio.open_nursery() as nursery:
        for seed in range(4):
            nursery.start_soon(_hammer, backend, target, seed, stop, stats)
        control.start(nursery)
        with pytest.raises(MergeStateError):
            control.start(nursery)
        assert backend.describe()["merge"]["state"] == "merging"
        last = -1.0
        while control.state not in (MergeState.MERGED, MergeState.FAILED):
            await trio.sleep(rng.uniform(0, 0.01))
            percent = control.percent()
            assert percent >= last
            assert percent < 100.0 or control.state is MergeState.MERGED  # 100 only once complete
            last = percent
            if control.state is MergeState.MERGING and pauses < 6:
                control.pause()
                pauses += 1
                assert control.state is MergeState.PAUSED
                with trio.fail_after(30):
                    while not control.parked and control.state is MergeState.PAUSED:
                        await trio.sleep(0.001)
                parked_at = control.merged_ops
                reads = stats["reads"]
                with trio.fail_after(30):  # readers keep being served while the merge is parked
                    while stats["reads"] < reads + 50:
                        await trio.sleep(0.001)
                assert control.merged_ops == parked_at  # parked: no progress
                control.resume()
        stop.set()
    assert control.error is None and control.state is MergeState.MERGED
    assert pauses >= 1
    assert stats["mismatches"] == [] and stats["reads"] > 200
    assert t["base"].read_bytes() == target
    assert merge_progress(t["cow"])[0] == t["total_ops"]
    described = backend.describe()["merge"]
    assert described["state"] == "merged" and described["percent"] == 100.0
    # merged: the base is served as it is
    assert await backend.read(0, len(target)) == target
    with pytest.raises(MergeStateError):
        control.start(None)
    await backend.close()
    # a new backend over the merged pair knows it is merged
    again = SnapshotBackend(t["base"], t["cow"])
    assert again.merge.state is MergeState.MERGED and again.merge.percent() == 100.0
    assert await again.read(0, len(target)) == target
    await again.close()


async def test_percent_says_100_only_once_the_merge_is_marked_complete(tmp_path):
    """Every op written, the merge not yet marked done: 99.999, so a client
    polling ``merge_percent`` for 100 then finds ``getstatus`` complete."""
    t = torture_cow(tmp_path, 32, nblocks=256, buffer_size=64 << 10)
    backend = SnapshotBackend(t["base"], t["cow"], offload="cpu")
    control = backend.merge
    async with trio.open_nursery() as nursery:
        control.start(nursery)
    assert control.state is MergeState.MERGED and control.percent() == 100.0
    control.state = MergeState.MERGING  # the instant between the last op's commit and the mark
    assert control.merged_ops == t["total_ops"] and control.percent() == 99.999
    await backend.close()


async def test_backend_over_an_interrupted_window_reads_the_target(tmp_path):
    """Opened on a COW whose merge stopped while writing a scratch window, the
    backend serves the window from the COW file (the base is half written)
    and the online merge finishes it."""
    t = torture_cow(tmp_path, 32, nblocks=256, buffer_size=64 << 10)
    base, cow = tmp_path / "work.img", tmp_path / "work.cow"
    await interrupt_in_window(t, base, cow)
    assert base.read_bytes() != t["base_bytes"]
    backend = SnapshotBackend(base, cow, offload="cpu")
    target = t["target_bytes"]
    assert await backend.read(0, len(target)) == target
    for block in range(len(target) // BS):
        assert await backend.read(block * BS, BS) == target[block * BS : (block + 1) * BS], block
    async with trio.open_nursery() as nursery:
        backend.merge.start(nursery)
    assert backend.merge.state is MergeState.MERGED, backend.merge.error
    assert base.read_bytes() == target
    await backend.close()


async def test_online_merge_refusals(tmp_path):
    t = torture_cow(tmp_path, 33, nblocks=128)
    with open(t["cow"], "r+b") as f:  # the header says a merge made progress
        f.seek(26)
        f.write((1).to_bytes(8, "little"))
    # merged=no: the base is said to hold no progress; merging would mix the two
    backend = SnapshotBackend(t["base"], t["cow"], merged=False)
    with pytest.raises(MergeStateError, match="merged=no"):
        backend.merge.start(None)
    assert backend.merge.state is MergeState.NOT_STARTED
    await backend.close()
    # Copy ops, no scratch space and no journal can be written beside the file: served, but not merged
    build_v2(tmp_path / "noscratch.cow", [(OpType.COPY, 0, 5), (OpType.ZERO, 3, 0)], buffer_size=0)
    (tmp_path / "noscratch.cow.merge-journal").mkdir()
    backend = SnapshotBackend(t["base"], tmp_path / "noscratch.cow")
    assert await backend.read(0, BS) == t["base_bytes"][5 * BS : 6 * BS]
    with pytest.raises(MergeUnsafeError, match="scratch space"):
        backend.merge.start(None)
    assert isinstance(MergeUnsafeError("x"), DmuserdError)
    await backend.close()
