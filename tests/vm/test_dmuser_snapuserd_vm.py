"""libsnapshot's real sequence against ``dmuserd dm snapuserd`` on a dm-user kernel, in the VM.

The old partition is a loop device over ``base.img``, mapped twice by
dm-linear as libsnapshot maps a partition that existed before the update:
``snapt-src`` (the snapshot reads it) and ``snapt-base`` (the merge writes
it). The guest (:mod:`snapuserd_guest`) sends ``init`` with both, creates the
dm-user table of the size it was told, ``start``, reads the device,
``update-verify``, ``initiate_merge``, polls ``merge_percent``, ``getstatus``,
``delete`` (answered once the table is removed, the device served till
then), then a second device and ``stop`` (the daemon ends once that table
is gone). One boot under TCG: about a minute.
"""

from __future__ import annotations

import json

import pytest

import dmuser_vm_lib as lib

pytestmark = [pytest.mark.vm, pytest.mark.root]

MARKER_BLOCK = 1  # no op of make_snapshot's COW writes it


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    work = tmp_path_factory.mktemp("snapuserd_vm")
    snap = lib.make_snapshot(work)
    base, target = (work / "base.img").read_bytes(), (work / "target.img").read_bytes()
    at = MARKER_BLOCK * 4096
    assert base[at : at + 4096] == target[at : at + 4096]
    snap.update(target=str(work / "target.img"), marker_block=MARKER_BLOCK)
    results = lib.run_guest("snapuserd_guest.py", work, {"snapuserd": snap}, timeout=600)
    results["plan"] = snap
    return results


def _explain(vm) -> str:
    return json.dumps({k: vm.get(k) for k in ("errors", "steps", "replies", "vm", "logs")}, indent=1,
                      default=str)[-6000:]


def test_libsnapshot_sequence_with_separate_source_and_merge_devices(vm):
    assert vm.get("done") and not vm.get("errors"), _explain(vm)
    plan = vm["plan"]
    sectors = plan["size"] // 512
    replies = [tuple(r) for r in vm["replies"]]
    misc = "snapt-user-cow"
    head = [
        ("query", "active"),
        ("supports,second_stage_socket_handoff", "fail"),
        (f"init,{misc},{plan['cow']},/dev/mapper/snapt-src,/dev/mapper/snapt-base", f"success,{sectors}"),
        (f"start,{misc}", "success"),
        ("update-verify", "success"),
        (f"initiate_merge,{misc}", "success"),
    ]
    assert replies[: len(head)] == head, _explain(vm)
    percents = vm["percents"]
    assert percents and percents[-1] == "100.000000", percents
    assert all(0.0 <= float(p) <= 100.0 for p in percents)
    tail = replies[len(head) + len(percents) :]
    assert sorted(tail[:3]) == sorted([  # the pending delete's reply is recorded when it comes
        (f"getstatus,{misc}", "snapshot-merge-complete"),
        (f"delete,{misc}", "success"),
        (f"delete,{misc}", "success"),
    ]), _explain(vm)
    assert tail[3:] == [
        (f"init,snapt2-user-cow,{plan['cow']},/dev/mapper/snapt-src,/dev/mapper/snapt-base", f"success,{sectors}"),
        ("start,snapt2-user-cow", "success"),
        ("stop", None),
    ], _explain(vm)
    assert vm["read_before_merge"] == {"result": "ok", "sha": plan["target_sha"], "head": vm["read_before_merge"]["head"]}
    assert vm["read_after_merge"]["sha"] == plan["target_sha"]
    # after the merge the device is served from <p>-base: what was written there reads back through it
    assert vm["marker_write"] == {"result": "ok"}
    assert vm["marker_read"]["head"] == "5a" * 16
    # delete sent while the table was there: it waited, the device was served, it answered once removed
    assert vm["delete_pending"] is True
    assert vm["read_during_delete"]["sha"] == plan["target_sha"]
    assert vm["dmsetup_remove"] == 0 and vm["delete_reply"] == "success"
    # the merge went through <p>-base into the partition
    assert vm["loop_after_merge"]["sha"] == plan["target_sha"]
    # stop: the second device is served until its table goes, then the daemon ends and lets go of -src/-base
    assert vm["read_after_stop"]["sha"] == plan["target_sha"]
    assert vm["alive_after_stop"] is True
    assert vm["dmsetup_remove2"] == 0 and vm["exit"] == 0
    assert (vm["remove_base"], vm["remove_src"]) == (0, 0)
