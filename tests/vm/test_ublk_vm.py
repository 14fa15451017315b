"""The ublk export on a real ublk kernel (the test kernel's ``CONFIG_BLK_DEV_UBLK=y``), in a VM.

One VM boot runs :mod:`ublk_guest`: ``dmuserd serve --export ublk:...``
with a ``file`` backend (ext4 made, mounted, a file written and read back
after a remount, ``e2fsck -fn``; fio randwrite + verify with two jobs of
QD 16 on a two-queue device; the same ID asked for twice; the device gone
after the stop), a ``snapshot`` backend (an ext4 image and a COW made here
on the host: read-only device, mounted, files compared, ``e2fsck -fn``) and
``recovery=1`` (the daemon killed with SIGKILL under fio verify, a new one
takes the device over, fio ends with no error; a stop keeps the device),
and a daemon killed without recovery (its I/O fails, the next daemon gets
the ID again). ``dmuserd ublk list`` / ``del`` on a served device (listed
with its daemon, not deleted) and on the one recovery kept (listed as
quiesced, deleted). The snapshot step's ``--export ublk`` leaves WHERE out.
Under TCG this takes a few minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess

import pytest

import dmuser_vm_lib as lib

pytestmark = [pytest.mark.vm, pytest.mark.root]

SNAP_SIZE = 16 * lib.MiB


def _ext4_image(path, files: dict[str, bytes], root) -> None:
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    with open(path, "wb") as f:
        f.truncate(SNAP_SIZE)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-U", "0b1e3c5d-0000-4000-8000-00000000ab1e",
                    "-E", "root_owner=0:0", "-d", str(root), str(path)], check=True, capture_output=True)


def make_snapshot(work) -> dict:
    """An ext4 base image and a COW that turns it into another ext4 image (a file changed, one added)."""
    from dmuserd.snapshot._cow_tools import create_cow

    rng = random.Random(24)
    old = {"kept": rng.randbytes(300_000), "changed": rng.randbytes(200_000)}
    new = {"kept": old["kept"], "changed": rng.randbytes(200_000), "added": rng.randbytes(500_000)}
    _ext4_image(work / "base.img", old, work / "old-root")
    _ext4_image(work / "target.img", new, work / "new-root")
    create_cow(work / "base.img", work / "target.img", work / "snap.cow", version=2, progress=False)
    return {"base.img": str(work / "base.img"), "snap.cow": str(work / "snap.cow"),
            "target_sha": lib.sha((work / "target.img").read_bytes()),
            "files": {name: hashlib.sha256(data).hexdigest() for name, data in new.items()}}


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    work = tmp_path_factory.mktemp("ublk_vm")
    snapshot = make_snapshot(work)
    plan = {"snapshot": snapshot}
    seconds = int(os.environ.get("DMUSERD_UBLK_BENCH_SECONDS", "0"))
    if seconds:  # a measurement (ublk against NBD, same VM, same target), not a check: results.json has it
        plan["bench"] = {"seconds": seconds}
    results = lib.run_guest("ublk_guest.py", work, plan, timeout=1500)
    results["plan"] = plan
    return results


def _explain(vm) -> str:
    return json.dumps({k: vm.get(k) for k in ("errors", "steps", "vm", "logs")}, indent=1, default=str)[-8000:]


def _fio_clean(fio: dict) -> None:
    assert fio["rc"] == 0, fio
    assert len(fio["jobs"]) == 2, fio
    for job in fio["jobs"]:
        assert job["error"] == 0, fio
        assert job["write_ios"] > 0 and job["read_ios"] == job["write_ios"], fio


def test_guest_ran_every_step(vm):
    assert vm["control_exists"]
    assert vm.get("done"), _explain(vm)
    assert not vm.get("errors"), _explain(vm)
    assert vm["vm"]["rc"] == 0, _explain(vm)


def test_device_and_parameters_from_the_file_backend(vm):
    out = vm["file"]
    assert out["status"]["exports"] == {"ublk": "/dev/ublkb0"}
    ublk = out["status"]["export_status"]["ublk"]
    assert ublk["device"] == "/dev/ublkb0" and ublk["state"] == "serving"
    assert [q["queue"] for q in ublk["queues"]] == [0, 1] and {q["depth"] for q in ublk["queues"]} == {16}
    params = out["params"]
    assert params["size"] == 128 * lib.MiB and params["ro"] == "0"
    assert params["mq"] == ["0", "1"] and params["nr_requests"] == "16"
    assert (params["logical_block_size"], params["physical_block_size"]) == ("512", "512")
    assert params["max_sectors_kb"] == "512"
    # the file backend flushes (FUA too), discards and writes zeroes
    assert (params["write_cache"], params["fua"]) == ("write back", "1")
    assert int(params["discard_max_bytes"]) > 0 and int(params["write_zeroes_max_bytes"]) > 0


def test_an_id_in_use_is_a_clear_error(vm):
    rc, last = vm["file"]["id_in_use"]
    assert rc != 0
    assert last and "ublk device 0 exists already" in last[0], last


def test_ublk_list_and_del_while_a_daemon_serves(vm):
    out = vm["file"]
    assert out["list"]["rc"] == 0, out["list"]
    [device] = [d for d in out["list"]["devices"] if d["id"] == 0]
    assert (device["state"], device["queues"], device["depth"], device["block"]) == ("live", 2, 16, "/dev/ublkb0")
    assert device["pid"] == out["pid"] and device["pid_alive"] and device["served_by"] == out["pid"]
    assert device["holders"] == [out["pid"]] and device["recovery"] is False
    header, *rows = out["list_text"].splitlines()
    assert header.split() == ["ID", "DEVICE", "STATE", "QUEUES", "DEPTH", "PID", "SERVED", "BY", "RECOVERY"]
    assert [f"0 /dev/ublkb0 live 2 16 {out['pid']} pid {out['pid']} no".split()] == \
        [row.split() for row in rows if row.startswith("0 ")], out["list_text"]
    refused = out["del_served"]
    assert refused["rc"] == 1 and refused["error"] == [
        f"dmuserd: error: ublk device 0 (live) is served by pid {out['pid']}, which runs: stop that daemon instead "
        "(a stop deletes its device; with recovery=1 delete it after the stop)"], refused


def test_ext4_round_trip_and_fsck_on_the_file_backend(vm):
    fs = vm["file"]["fs"]
    assert fs["mkfs"][0] == 0, fs
    assert fs["mount"] == 0 and fs["umount"] == 0 and fs["remount"] == 0 and fs["umount2"] == 0, fs
    assert fs["read_back"] == fs["written"]
    assert fs["fsck"][0] == 0, fs["fsck"][1]


def test_fio_verify_on_two_queues(vm):
    _fio_clean(vm["file"]["fio"])
    queues = vm["file"]["status_after"]["export_status"]["ublk"]["queues"]
    assert all(q["requests"] > 0 for q in queues), queues  # one fio job per CPU: both queues served
    assert sum(q["errors"] + q["malformed"] for q in queues) == 0, queues
    # dmuserd status: the device, its queues and counters on one line
    line = next(x for x in vm["file"]["status_text"].splitlines() if x.strip().startswith("ublk:"))
    requests = "/".join(str(q["requests"]) for q in queues)
    assert line.strip() == (f"ublk: /dev/ublkb0 serving, 2 queue(s) of depth 16: requests {requests}, "
                            "in flight 0, errors 0, malformed 0"), line


def test_stop_deletes_the_device(vm):
    assert vm["file"]["exit"] == 0, _explain(vm)
    assert all(vm["file"]["gone_after_stop"].values()), vm["file"]["gone_after_stop"]


def test_snapshot_backend_serves_the_new_filesystem_read_only(vm):
    out, plan = vm["snapshot"], vm["plan"]["snapshot"]
    assert out["params"]["ro"] == "1" and out["params"]["size"] == SNAP_SIZE
    assert out["params"]["write_cache"] == "write through"  # nothing to flush on a read-only backend
    assert out["device_sha"] == plan["target_sha"]
    assert out["mount"] == 0 and out["umount"] == 0
    assert out["files"] == plan["files"]
    assert out["fsck"][0] == 0, out["fsck"][1]
    assert out["exit"] == 0 and out["gone_after_stop"]


def test_kill_9_under_fio_and_restart_with_recovery(vm):
    out = vm["recovery"]
    assert out["status"]["export_status"]["ublk"]["recovery"] is True
    assert out["written_before_kill"] >= 4 * lib.MiB
    assert out["fio_alive_after_kill"], out  # fio was still running when the daemon died
    new = out["status_after"]["export_status"]["ublk"]
    assert new["recovered"] is True and new["device"] == "/dev/ublkb1"
    _fio_clean(out["fio"])
    assert out["served_by_new"]["total_requests"] > 0  # the rest of fio went to the new daemon
    assert out["exit"] == 0 and out["kept_after_stop"]  # recovery=1: a stop leaves the device for the next daemon


def test_ublk_del_removes_a_device_kept_by_recovery(vm):
    out = vm["recovery"]
    [kept] = [d for d in out["list_kept"]["devices"] if d["id"] == 1]
    assert (kept["state"], kept["recovery"], kept["queues"], kept["depth"]) == ("quiesced", True, 2, 16), kept
    # the last daemon's pid, gone; nobody holds the channel
    assert kept["pid"] == out["pid"] and not kept["pid_alive"] and kept["served_by"] is None and not kept["holders"]
    assert out["del_kept"]["rc"] == 0, out["del_kept"]
    assert out["del_kept"]["stdout"].strip() == f"deleted ublk device 1 (quiesced, left by pid {out['pid']})"
    assert all(out["gone_after_del"].values()), out["gone_after_del"]
    assert 1 not in [d["id"] for d in out["list_after_del"]["devices"]]
    again = out["del_again"]
    assert again["rc"] == 1 and again["error"] == [
        "dmuserd: error: there is no ublk device 1 (`dmuserd ublk list` shows those there are)"], again



def test_kill_9_without_recovery_fails_io_and_frees_the_id(vm):
    out = vm["crash"]
    assert out["write"] == {"result": "ok"}
    # the kernel fails the I/O of a dying daemon (EIO), or the device is gone already: nothing hangs
    assert out["read_after_kill"]["result"] in ("EIO", "ENXIO", "ENOENT"), out
    assert out["endpoint"] == {"ublk": "/dev/ublkb2"}  # the stopped device left behind was removed and made again
    assert out["read_back"] == {"result": "ok", "sha": out["want"]}  # the data was in the backing file
    assert out["exit"] == 0
