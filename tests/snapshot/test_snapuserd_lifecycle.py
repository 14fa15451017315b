"""snapuserd's ``delete`` and ``stop`` (they wait for the devices to go) and its bounded merges.

In-process: the dm-user export is replaced by a stand-in that is "removed"
when the test says so (a real table's removal is what the VM test does);
everything else (the daemon, its targets, the snapshot backends, the
merges) is real.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from merge_testlib import torture_cow
from dmuserd.daemon import export as export_registry
from dmuserd.daemon import snapuserd
from dmuserd.daemon.config import DaemonSpec
from dmuserd.daemon.export import Export
from dmuserd.daemon.runtime import Daemon
from dmuserd.snapshot.merge_control import MergeState


class Tables:
    """Stand-in dm-user tables: ``remove(name)`` ends the export as the kernel's removal does."""

    def __init__(self) -> None:
        self.removed: dict[str, trio.Event] = {}

    def export_class(self, kind: str) -> type[Export]:
        tables = self

        class StandIn(Export):
            """The dm-user export, minus the kernel: it ends when the test removes its table."""

            async def start(self, target, nursery) -> str:
                removed = tables.removed.setdefault(self.spec.where, trio.Event())
                await nursery.start(self._serve, removed)
                return f"/dev/mapper/{self.spec.where}"

            async def _serve(self, removed: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
                task_status.started()
                try:
                    await removed.wait()
                finally:
                    self.endpoint = None

        assert kind == "dm-user", kind
        return StandIn

    def remove(self, name: str) -> None:
        self.removed[name].set()


@pytest.fixture
def tables(monkeypatch):
    t = Tables()
    monkeypatch.setattr(export_registry, "export_class", t.export_class)
    return t


@pytest.fixture
async def daemon(nursery, tmp_path, tables):
    d = Daemon(DaemonSpec([]), control_socket=str(tmp_path / "snapuserd"))
    await nursery.start(d.run)
    yield d
    await d.stop()


async def say(daemon, message: str) -> str | None:
    reply, _ = await snapuserd.handle_message(daemon, message.encode())
    return reply


async def _started(daemon, tmp_path, name: str, seed: int, nblocks: int = 600) -> dict:
    where = tmp_path / name
    where.mkdir()
    t = torture_cow(where, seed, nblocks=nblocks)
    assert (await say(daemon, f"init,{name},{t['cow']},{t['base']},{t['base']}")).startswith("success,")
    assert await say(daemon, f"start,{name}") == "success"
    return t


async def test_delete_answers_once_the_device_is_gone_and_serves_it_till_then(daemon, tmp_path, tables):
    t = await _started(daemon, tmp_path, "p", 1)
    target = daemon.targets["p"]
    replies: list = []

    async def delete() -> None:
        replies.append(await say(daemon, "delete,p"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(delete)
        await trio.testing.wait_all_tasks_blocked()
        assert replies == []  # the table is still there: delete waits
        assert await say(daemon, "query") == "active"  # other requests are answered meanwhile
        data = await target.dispatcher.backend.read(0, 4096 * 8)  # and the device is served
        assert bytes(data) == t["target_bytes"][: 4096 * 8]
        tables.remove("p")
    assert replies == ["success"]
    assert "p" not in daemon.targets and "p" not in snapuserd.state_of(daemon).handlers
    assert await say(daemon, "delete,p") == "success"  # gone already


async def test_delete_while_the_table_stays_fails_and_keeps_serving(daemon, tmp_path, tables, monkeypatch):
    monkeypatch.setattr(snapuserd, "DELETE_WAIT", 0.05)
    await _started(daemon, tmp_path, "p", 2)
    assert await say(daemon, "delete,p") == "fail"
    assert "dm-user" in daemon.targets["p"].endpoints
    assert await say(daemon, "getstatus,p") == "snapshot"
    tables.remove("p")
    with trio.fail_after(10):
        await snapuserd.state_of(daemon).handlers["p"].gone.wait()
    assert await say(daemon, "delete,p") == "success"


async def test_stop_ends_the_daemon_once_its_devices_are_gone(tmp_path, tables):
    d = Daemon(DaemonSpec([]), control_socket=str(tmp_path / "snapuserd"))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            await _started(d, tmp_path, "p", 3)
            where = tmp_path / "q"
            where.mkdir()
            q = torture_cow(where, 4, nblocks=100)
            assert (await say(d, f"init,q,{q['cow']},{q['base']},{q['base']}")).startswith("success,")  # never started
            assert await say(d, "stop") is None
            await trio.testing.wait_all_tasks_blocked()
            assert not d.stopping and await say(d, "query") == "passive"  # serving p until its table goes
            tables.remove("p")
    assert d.stopping and snapuserd.state_of(d).handlers == {}


async def test_merges_run_at_most_merge_threads_at_once(daemon, tmp_path, tables):
    state = snapuserd.state_of(daemon)
    state.merge_threads = 1
    cows = [await _started(daemon, tmp_path, f"p{i}", 10 + i) for i in range(2)]
    handlers = [state.handlers[f"p{i}"] for i in range(2)]
    assert await say(daemon, "pause_merge") == "success"  # nothing to pause yet
    assert await say(daemon, "initiate_merge,p0") == "success"
    assert await say(daemon, "initiate_merge,p1") == "success"
    with trio.fail_after(30):
        while handlers[0].merge.state is not MergeState.MERGING:
            await trio.sleep(0.01)
    assert await say(daemon, "pause_merge") == "success"
    with trio.fail_after(30):
        while not handlers[0].merge.parked:
            await trio.sleep(0.01)
    await trio.testing.wait_all_tasks_blocked()
    # p0 holds the only slot while paused: p1 waits, reported as merging (accepted)
    assert handlers[1].merge.state is MergeState.NOT_STARTED and handlers[1].merge_queued
    assert await say(daemon, "getstatus,p1") == "snapshot-merge"
    assert daemon.status()["snapuserd"]["handlers"]["p1"]["merge"] == "queued"
    assert await say(daemon, "resume_merge") == "success"
    with trio.fail_after(60):
        while await say(daemon, "merge_percent") != "100.000000":
            running = [h.misc for h in handlers if h.merge.state in (MergeState.MERGING, MergeState.PAUSED)]
            assert len(running) <= 1, running
            await trio.sleep(0.01)
    assert [await say(daemon, f"getstatus,p{i}") for i in range(2)] == ["snapshot-merge-complete"] * 2
    for t in cows:
        assert t["base"].read_bytes() == t["target_bytes"]


async def test_a_device_gone_mid_merge_frees_its_slot(daemon, tmp_path, tables):
    state = snapuserd.state_of(daemon)
    state.merge_threads = 1
    first = await _started(daemon, tmp_path, "p0", 20, nblocks=1500)
    second = await _started(daemon, tmp_path, "p1", 21)
    h0 = state.handlers["p0"]
    assert await say(daemon, "initiate_merge,p0") == "success"
    assert await say(daemon, "initiate_merge,p1") == "success"
    with trio.fail_after(30):
        while h0.merge.state is not MergeState.MERGING:
            await trio.sleep(0.001)
    assert await say(daemon, "pause_merge") == "success"  # holds p0 mid-merge, in its slot
    with trio.fail_after(30):
        while not h0.merge.parked:
            await trio.sleep(0.001)
    assert h0.merge.state is MergeState.PAUSED and h0.merge.percent() < 100.0
    tables.remove("p0")  # libsnapshot would not, mid-merge; a reboot or a crash of the user does
    with trio.fail_after(60):
        await h0.gone.wait()
        while await say(daemon, "getstatus,p1") != "snapshot-merge-complete":
            await trio.sleep(0.01)
    assert second["base"].read_bytes() == second["target_bytes"]
    assert "p0" not in state.handlers and "p0" not in daemon.targets
    assert h0.merge.state is MergeState.PAUSED  # its task ended where the pause held it
    # p0's COW says how far it got: a new daemon's merge resumes it to the target
    from dmuserd.snapshot.merge import merge_cow

    await merge_cow(first["base"], first["cow"], offload="cpu")
    assert first["base"].read_bytes() == first["target_bytes"]


async def test_libsnapshot_sequence_in_process(daemon, tmp_path, tables):
    """init with <p>-src and <p>-base (two files here), start, update-verify, merge, getstatus, table gone, delete."""
    import shutil

    t = torture_cow(tmp_path, 30, nblocks=900, buffer_size=0)  # no scratch space: the journal carries it
    src, base = t["base"], tmp_path / "p-base.img"
    shutil.copyfile(src, base)
    pristine = src.read_bytes()
    sectors = len(pristine) // 512
    misc = "p-user-cow"
    assert await say(daemon, "supports,second_stage_socket_handoff") == "fail"
    assert await say(daemon, f"init,{misc},{t['cow']},{src},{base}") == f"success,{sectors}"
    assert await say(daemon, f"start,{misc}") == "success"
    assert await say(daemon, "update-verify") == "success"
    assert await say(daemon, f"initiate_merge,{misc}") == "success"
    with trio.fail_after(60):
        while (percent := await say(daemon, "merge_percent")) != "100.000000":
            assert 0.0 <= float(percent) < 100.0
            await trio.sleep(0.01)
    assert await say(daemon, f"getstatus,{misc}") == "snapshot-merge-complete"
    target = daemon.targets[misc]
    assert bytes(await target.dispatcher.backend.read(0, len(pristine))) == t["target_bytes"]
    tables.remove(misc)
    assert await say(daemon, f"delete,{misc}") == "success"
    assert base.read_bytes() == t["target_bytes"]  # merged into <p>-base
    assert src.read_bytes() == pristine  # <p>-src only read
    assert await say(daemon, "merge_percent") == "100.000000"  # the gone merged device counts 100
