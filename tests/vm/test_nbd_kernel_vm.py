"""The NBD export under the Linux kernel's NBD client (the test kernel's ``CONFIG_BLK_DEV_NBD=y``), in a VM.

One VM boot runs :mod:`nbd_kernel_guest` for both NBD fronts,
``server=dmuserd`` (the daemon's own server) and ``server=nbdkit``: a
memory backend served on a Unix socket, ``/dev/nbdN`` attached with
``nbd-client -unix`` (block size 4096; two connections where the export
advertises CAN_MULTI_CONN), ext4 made, written, read back after a remount
and ``e2fsck -fn`` clean, fio randwrite + crc32c verify on the raw device,
``blkdiscard -z`` and ``blkdiscard`` (the daemon counts the discards: the
6.1 kernel sends NBD_CMD_TRIM but not NBD_CMD_WRITE_ZEROES, so ``-z`` comes
as written zeros), ``nbd-client -d`` and the daemon's stop. A couple of
minutes under TCG.
"""

from __future__ import annotations

import json

import pytest

import dmuser_vm_lib as lib

pytestmark = [pytest.mark.vm, pytest.mark.root]

FRONTS = ("dmuserd", "nbdkit")


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    work = tmp_path_factory.mktemp("nbd_kernel_vm")
    return lib.run_guest("nbd_kernel_guest.py", work, {}, timeout=900)


def _explain(vm, server=None) -> str:
    keys = ("errors", "steps", "vm", "logs", *([server] if server else []))
    return json.dumps({k: vm.get(k) for k in keys}, indent=1, default=str)[-8000:]


def test_guest_ran_every_step(vm):
    assert vm.get("done"), _explain(vm)
    assert not vm.get("errors"), _explain(vm)
    assert vm["vm"]["rc"] == 0, _explain(vm)


@pytest.mark.parametrize("server", FRONTS)
def test_nbd_client_attaches_over_the_unix_socket(vm, server):
    out = vm[server]
    assert out["status"]["exports"]["nbd"] == f"nbd+unix:///?socket=/tmp/nbd-{server}.sock"
    assert out["attach"][0] == 0, _explain(vm, server)
    assert out["nbdinfo"]["export-size"] == 64 * lib.MiB and not out["nbdinfo"]["is_read_only"]
    if out["nbdinfo"]["can_multi_conn"]:
        assert out["connections"] == 2 and out["params"]["mq"] == ["0", "1"]  # one hardware queue per connection
    if server == "dmuserd":
        assert out["nbdinfo"]["can_multi_conn"]  # a memory backend flushes: a flush covers every connection
        assert out["export_status"]["connections"] == out["connections"]
    params = out["params"]
    assert params["size"] == 64 * lib.MiB and params["logical_block_size"] == "4096"
    assert (params["write_cache"], params["fua"]) == ("write back", "1")  # the backend flushes, FUA too
    assert int(params["discard_max_bytes"]) > 0


@pytest.mark.parametrize("server", FRONTS)
def test_ext4_round_trip_and_fsck(vm, server):
    fs = vm[server]["fs"]
    assert fs["mkfs"][0] == 0, fs
    assert fs["mount"] == 0 and fs["umount"] == 0 and fs["remount"] == 0 and fs["umount2"] == 0, fs
    assert fs["read_back"] == fs["written"]
    assert fs["fsck"][0] == 0, fs["fsck"][1]


@pytest.mark.parametrize("server", FRONTS)
def test_fio_verify_on_the_raw_device(vm, server):
    fio = vm[server]["fio"]
    assert fio["rc"] == 0, fio
    assert len(fio["jobs"]) == 2, fio
    for job in fio["jobs"]:
        assert job["error"] == 0, fio
        assert job["write_ios"] > 0 and job["read_ios"] == job["write_ios"], fio
    assert vm[server]["errors"] == 0


@pytest.mark.parametrize("server", FRONTS)
def test_zeroing_and_discard_reach_the_backend(vm, server):
    out = vm[server]
    assert out["pattern"] == {"result": "ok"}
    assert out["zero"][0] == 0, out["zero"]
    assert out["zeroed_read"] == {"result": "ok", "sha": lib.sha(bytes(2 ** 20))}
    assert out["discard"][0] == 0, out["discard"]
    before, after = out["requests_before"], out["requests_after"]
    assert after["discard"] > before["discard"], (before, after)  # NBD_CMD_TRIM arrived
    # the zeroing arrived as WRITE_ZEROES or (6.1 does not send it) as written zeros
    assert after["write_zeroes"] > before["write_zeroes"] or after["write"] > before["write"], (before, after)
    assert out["allocated"][1] < out["allocated"][0], out["allocated"]  # and freed the memory backend's chunks


@pytest.mark.parametrize("server", FRONTS)
def test_disconnect_and_stop(vm, server):
    out = vm[server]
    assert out["check_before"] == 0  # attached until nbd-client -d
    assert out["detach"][0] == 0, out["detach"]
    assert out["check_after"] != 0 and out["size_after"] == 0, out
    if server == "dmuserd":
        assert out["connections_after"] == 0  # the kernel closed its connections
        assert out["memory_held_after"] == 0  # and they gave their share of the memory budget back
    assert out["exit"] == 0, _explain(vm, server)
