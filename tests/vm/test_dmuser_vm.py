"""A real dm-user device on a real dm-user kernel, in a VM; and the same cases on the model.

One VM boot runs :mod:`dmuser_guest` (tables made with ``dmsetup``, daemons
started with ``python -m dmuserd``, I/O with dd, fio, mkfs, direct I/O from
Python) and records what happened; the tests below check those records.
The differential test runs the same cases against the in-process model
(:class:`~dmuserd.daemon.emulated.EmulatedDmUser`) and requires the same
outcomes. Under TCG the boot plus ~4 daemon starts take about 2-3 minutes.
"""

from __future__ import annotations

import json

import pytest

import dmuser_vm_lib as lib
from dmuser_model_cases import run_model_cases

pytestmark = [pytest.mark.vm, pytest.mark.root]


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    work = tmp_path_factory.mktemp("dmuser_vm")
    snap = lib.make_snapshot(work)
    plan = {"fio": {"bs": "8k", "size": "2M", "jobs": 4, "timeout": 300}, "snapuserd": snap}
    results = lib.run_guest("dmuser_guest.py", work, plan, timeout=900)
    results["snap_plan"] = snap
    results["work"] = work
    return results


def _explain(vm) -> str:
    return json.dumps({k: vm.get(k) for k in ("errors", "steps", "vm", "logs")}, indent=1, default=str)[-6000:]


def test_guest_ran_every_step(vm):
    assert vm.get("done"), _explain(vm)
    assert not vm.get("errors"), _explain(vm)
    assert vm["vm"]["rc"] == 0, _explain(vm)


def test_daemon_attaches_to_existing_tables(vm):
    assert {"t1", "t2", "t3"} <= set(vm["misc_devices"])
    target = vm["d1_status"]["targets"]["t1"]
    assert target["exports"] == {"dm-user": "/dev/mapper/t1"}


def test_ext4_on_the_device(vm):
    fs = vm["fs"]
    assert fs["mkfs"][0] == 0, fs
    assert fs["mount"][0] == 0, fs
    assert fs["umount"] == 0
    assert fs["read_back"] == fs["written"]
    assert fs["fsck"][0] == 0, fs["fsck"][1]


def test_fio_verify_with_several_jobs(vm):
    fio = vm["fio"]
    assert fio["rc"] == 0, fio
    assert len(fio["jobs"]) == 4
    for job in fio["jobs"]:
        assert job["error"] == 0, fio
        assert job["write_ios"] > 0 and job["read_ios"] > 0, fio


def test_direct_io_patterns(vm):
    case = vm["cases"]["pattern_rw"]
    assert case == {"result": "ok", "sha": lib.sha(lib.pattern(lib.PATTERN_SEED, lib.PATTERN_LEN))}


def test_dsync_write_is_in_the_backing_file_when_it_returns(vm):
    case = vm["cases"]["dsync_durable"]
    assert case == {"result": "ok", "sha": lib.sha(lib.pattern(lib.DSYNC_SEED, lib.DSYNC_LEN))}
    # the kernel asked for durability: a flush (zero-length PREFLUSH write) reached the dispatcher
    assert vm["dsync_requests"]["flush"] >= 1, vm["dsync_requests"]


def test_killed_daemon_fails_its_io_and_nothing_hangs(vm):
    assert vm["stall_reached"], _explain(vm)
    assert vm["cases"]["killed_in_flight"] == {"result": "EIO"}
    assert vm["cases"]["after_kill_new_io"] == {"result": "EIO"}


def test_io_queued_before_the_daemon_attached_completes(vm):
    assert vm["queued_before_attach"]
    assert vm["cases"]["before_attach"] == {"result": "ok", "sha": lib.sha(lib.pattern(lib.EARLY_SEED, lib.EARLY_LEN))}
    assert vm["cases"]["no_daemon_timeout"] == {"result": "EIO"}


def test_no_cap_on_outstanding_messages(vm):
    # dm-user.c's 128 messages are a mempool reserve: all 200 reads reach the
    # channel before one is answered.
    assert vm["cases"]["beyond_reserve"] == {"result": "ok", "taken": lib.BEYOND_RESERVE}


def test_daemon_timeout_counts_per_message_and_fires_once(vm):
    # Each message's timer runs from its mapping: the later read outlives the first.
    assert vm["cases"]["timer_per_message"] == {"first": "EIO", "second_pending_then": True, "second": "EIO"}
    # A timer that fired while a channel was open is spent: closing that
    # channel later does not fail the read, a daemon attaching after serves it.
    assert vm["cases"]["spent_timer_not_rearmed"] == {
        "pending_after_close": True, "result": "ok", "sha": lib.sha(lib.pattern(lib.RAW_SEED, lib.PROBE_LEN))}


def test_swap_out_bios_are_killed_never_forwarded(vm):
    # REQ_SWAP is not among the flags bio_flags_to_user_flags() maps: every
    # swap-out to a dm-user swap device is killed; the memory-bound process
    # is killed instead of swapping.
    assert vm["swap"]["mkswap"] == 0 and vm["swap"]["swapon"] == 0, vm["swap"]
    assert vm["cases"]["swap_write_killed"] == {"result": "killed", "forwarded": 0}, vm["swap"]
    assert vm["swap"]["hog_exit"] == -9 and vm["swap"]["swapoff"] == 0, vm["swap"]


def test_new_daemon_serves_what_the_killed_one_wrote(vm):
    assert vm["cases"]["restart_read"] == {"result": "ok", "sha": lib.sha(lib.pattern(lib.PATTERN_SEED, lib.PATTERN_LEN))}
    assert vm["d2_exit"] == 0
    assert vm["cases"]["after_stop"] == {"result": "EIO"}


def test_dm_create_and_remove_commands(vm):
    assert vm["dm_create"][:2] == [0, "/dev/mapper/t2 (served through /dev/dm-user/t2)"], vm["dm_create"]
    assert vm["dm_remove"] == [0, "", False], vm["dm_remove"]


def test_create_option_makes_and_removes_the_table(vm):
    created = vm["created"]
    assert created["exists"]
    assert created["write"] == {"result": "ok"}
    assert created["read"] == {"result": "ok", "sha": lib.sha(lib.pattern(9, 64 * 1024))}
    assert created["table_after_stop"] != 0  # dmsetup info: no such device


def test_table_removed_under_the_daemon_ends_that_export_only(vm):
    removed = vm["removed_under_daemon"]
    assert removed["dmsetup"] == 0
    assert "dm-user" not in removed["endpoints_after"]
    assert removed["daemon_alive"]


async def test_differential_model_matches_the_kernel(vm, tmp_path):
    model, facts = await run_model_cases(tmp_path)
    real = vm["cases"]
    assert list(model) == list(lib.CASES)
    for case in lib.CASES:
        assert model[case] == real.get(case), f"{case}: model {model[case]} != kernel {real.get(case)}"
    assert facts["queued_before_attach"] == vm["queued_before_attach"]


def test_snapuserd_protocol_drives_a_real_device(vm):
    snap = vm["snapuserd"]
    plan = vm["snap_plan"]
    sequence = [message for message, _ in snap["replies"]]
    answers = [answer for _, answer in snap["replies"]]
    sectors = plan["size"] // 512
    expected_head = [
        ("query", "active"),
        ("supports,second_stage_socket_handoff", "fail"),  # no handoff (yet): as snapuserd without it
        ("supports,no_such_feature", "fail"),
        (f"init,snapt,{plan['cow']},{plan['base']},{plan['base']}", f"success,{sectors}"),
        (f"init,snapt,{plan['cow']},{plan['base']},{plan['base']}", "fail"),
        ("getstatus,snapt", "snapshot"),
        ("start,snapt", "success"),
        ("start,snapt", "fail"),
        ("initiate_merge,snapt", "success"),
    ]
    assert list(zip(sequence, answers))[: len(expected_head)] == expected_head
    assert snap["read_before_merge"] == {"result": "ok", "sha": plan["target_sha"]}
    assert snap["percents"][-1] == "100.000000", snap["percents"]
    for percent in snap["percents"]:
        assert percent.count(".") == 1 and len(percent.split(".")[1]) == 6
        assert 0.0 <= float(percent) <= 100.0
    tail = list(zip(sequence, answers))[len(expected_head) + len(snap["percents"]) :]
    assert tail == [
        ("getstatus,snapt", "snapshot-merge-complete"),
        ("pause_merge", "success"),
        ("resume_merge", "success"),
        ("delete,snapt", "success"),
        ("delete,snapt", "success"),
        ("frobnicate", "fail"),
        ("detach", None),
        ("query", "passive"),
        ("stop", None),
    ], snap["replies"]
    assert snap["read_after_merge"] == {"result": "ok", "sha": plan["target_sha"]}
    assert snap["base_after_merge"] == plan["target_sha"]
    assert snap["dmsetup_remove"] == 0
    assert snap["exit"] == 0


@pytest.mark.slow
def test_slow_longer_fio_verify_and_filesystem(tmp_path):
    """The same guest run with 64 MiB of fio verify over 4 jobs (~5 minutes under TCG)."""
    results = lib.run_guest("dmuser_guest.py", tmp_path, {"fio": {"bs": "4k", "size": "16M", "jobs": 4, "timeout": 1200}},
                            timeout=1800)
    assert results.get("done") and not results.get("errors"), _explain(results)
    assert results["fio"]["rc"] == 0 and all(j["error"] == 0 for j in results["fio"]["jobs"]), results["fio"]
    assert sum(j["write_ios"] for j in results["fio"]["jobs"]) == 4 * 16 * 256
    assert results["fs"]["fsck"][0] == 0 and results["fs"]["read_back"] == results["fs"]["written"]
    for case in ("pattern_rw", "before_attach", "restart_read"):
        assert results["cases"][case]["result"] == "ok", results["cases"]
    for case in ("killed_in_flight", "after_kill_new_io", "no_daemon_timeout", "after_stop"):
        assert results["cases"][case] == {"result": "EIO"}, results["cases"]
