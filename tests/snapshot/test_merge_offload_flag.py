"""``dmuserd serve --offload`` (and ``[daemon] offload``) choose the data mover
of a served snapshot's merge, and ``status`` shows what the mover did."""

from __future__ import annotations

import os

import pytest
import trio

from merge_testlib import sha256, torture_cow
from dmuserd.daemon.config import ConfigError, DaemonSpec, load_toml, parse_target
from dmuserd.daemon.runtime import Daemon
from dmuserd.snapshot.merge_control import MergeState


def _spec(t: dict, fuse_dir, offload: str | None) -> DaemonSpec:
    target = parse_target("snap", f"snapshot:base={t['base']},cow={t['cow']}", [f"fuse:{fuse_dir}"])
    return DaemonSpec([target], offload=offload)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")
async def test_daemon_offload_reaches_the_merge_and_status(tmp_path):
    t = torture_cow(tmp_path, 41, nblocks=256)
    daemon = Daemon(_spec(t, tmp_path / "fuse", "emulated"), control_socket=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        merge = daemon.targets["snap"].backend.merge
        assert merge.offload == "emulated"
        merge.start(daemon.nursery)
        with trio.fail_after(60):
            while merge.state is MergeState.MERGING:
                await trio.sleep(0.02)
        target_status = daemon.status()["targets"]["snap"]
        status = target_status["merge"]
        await daemon.stop()
    assert status["state"] == "merged", status
    mover = status["mover"]
    # One mover serves and merges (a dedicated DSA queue takes one opener):
    # the target's counters are the merge's.
    assert target_status["mover"] == mover
    assert mover["engine"] == "emulated"
    assert mover["ops"] > 0
    assert sha256(t["base"]) == sha256(t["target"])


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")
async def test_a_target_option_beats_the_daemon_setting(tmp_path):
    t = torture_cow(tmp_path, 42, nblocks=64)
    spec = DaemonSpec([parse_target("snap", f"snapshot:base={t['base']},cow={t['cow']},offload=cpu",
                                    [f"fuse:{tmp_path / 'fuse'}"])], offload="emulated")
    daemon = Daemon(spec, control_socket=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        assert daemon.targets["snap"].backend.merge.offload == "cpu"
        await daemon.stop()


def test_toml_offload_is_checked(tmp_path):
    config = tmp_path / "d.toml"
    config.write_text('[daemon]\noffload = "gpu"\n[targets.d]\nbackend = "memory:size=1M"\nexports = ["fuse:/x"]\n')
    with pytest.raises(ConfigError, match="offload.*'gpu' is not one of"):
        load_toml(str(config))
    config.write_text('[daemon]\noffload = "cpu"\n[targets.d]\nbackend = "memory:size=1M"\nexports = ["fuse:/x"]\n')
    assert load_toml(str(config)).offload == "cpu"
