"""A snapshot whose merge writes a separate device (snapuserd's ``base_path_merge``).

libsnapshot maps the old partition twice, ``<p>-src`` (read by the snapshot)
and ``<p>-base`` (written by the merge). Here two files stand for them: they
start with the same bytes, so which one a read came from is told apart by
changing a block no op touches in one of them.
"""

from __future__ import annotations

import random
import shutil

import pytest
import trio

from cow_helpers import BS
from merge_testlib import torture_cow
from dmuserd.backends import BackendError
from dmuserd.snapshot.backend import SnapshotBackend
from dmuserd.snapshot.merge_control import MergeState


def _untouched_block(backend) -> int:
    """A block no op writes, so the base's block is the target's."""
    view = backend.view
    return next(b for b in range(view.num_blocks) if view.op_for_block(b) is None)


async def _read_all(backend, size: int, rng: random.Random, target: bytes, mismatches: list) -> None:
    offset = 0
    while offset < size:
        length = min(rng.randrange(1, 64) * BS, size - offset)
        data = await backend.read(offset, length)
        if bytes(data) != target[offset : offset + length]:
            mismatches.append((offset, length, backend.merge.merged_ops))
        offset += length


async def test_merge_writes_the_merge_device_and_serves_it_after(tmp_path):
    t = torture_cow(tmp_path, 5, nblocks=1024, buffer_size=64 << 10)
    target = bytearray(t["target_bytes"])
    base_bytes = t["base"].read_bytes()
    src, merge_dev = t["base"], tmp_path / "base-merge.img"
    shutil.copyfile(src, merge_dev)
    backend = SnapshotBackend(src, t["cow"], base_merge=merge_dev, offload="cpu")
    try:
        assert backend.describe()["base_merge"] == str(merge_dev)
        marker = _untouched_block(backend) * BS
        # unmerged blocks come from the source: a change only the merge device has is not seen yet
        with open(merge_dev, "r+b") as f:
            f.seek(marker)
            f.write(b"\xa5" * BS)
        assert bytes(await backend.read(marker, BS)) == target[marker : marker + BS]
        mismatches: list = []
        rng = random.Random(1)
        async with trio.open_nursery() as nursery:
            backend.merge.start(nursery)
            while backend.merge.state is MergeState.MERGING:  # read everything while it merges
                await _read_all(backend, len(target), rng, target, mismatches)
        assert backend.merge.state is MergeState.MERGED, backend.merge.error
        assert mismatches == []
        # the merge wrote the merge device (the changed block aside, the target), never the source
        merged = bytearray(merge_dev.read_bytes())
        assert merged[marker : marker + BS] == b"\xa5" * BS
        merged[marker : marker + BS] = target[marker : marker + BS]
        assert merged == target
        assert src.read_bytes() == base_bytes
        # merged: everything is read from the merge device
        target[marker : marker + BS] = b"\xa5" * BS
        assert bytes(await backend.read(0, len(target))) == bytes(target)
    finally:
        await backend.close()


def test_merge_device_of_another_size_is_refused(tmp_path):
    t = torture_cow(tmp_path, 6, nblocks=256)
    other = tmp_path / "small.img"
    other.write_bytes(t["base"].read_bytes()[:-BS])
    with pytest.raises(BackendError, match="base_merge.*same blocks"):
        SnapshotBackend(t["base"], t["cow"], base_merge=other, offload="cpu")
    with pytest.raises(BackendError, match="cannot open"):
        SnapshotBackend(t["base"], t["cow"], base_merge=tmp_path / "missing.img", offload="cpu")
