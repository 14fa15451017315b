"""dm-user edge cases on the real driver (issue #21), in one VM boot.

:mod:`dmuser_edge_guest` runs them and records what happened; these tests
check the records. The same behaviours on the model and the daemon's pieces
are tested on the host by ``tests/daemon/test_dmuser_edge_cases.py``.
Under TCG the run takes about a minute.
"""

from __future__ import annotations

import json

import pytest

import dmuser_vm_lib as lib
from dmuser_edge_guest import BIG, ITEMS_SEED, ITEMS_WRONG, SMALL, TABLES

pytestmark = [pytest.mark.vm, pytest.mark.root]


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    work = tmp_path_factory.mktemp("dmuser_edge_vm")
    return lib.run_guest("dmuser_edge_guest.py", work, {"snapshot": lib.make_snapshot(work)}, timeout=600)


def _explain(vm) -> str:
    return json.dumps({k: vm.get(k) for k in ("errors", "steps", "vm", "logs")}, indent=1, default=str)[-6000:]


def test_guest_ran_every_step(vm):
    assert vm.get("done") and not vm.get("errors"), _explain(vm)
    assert vm["vm"]["rc"] == 0, _explain(vm)


# -- 6. attaching to existing tables needs no dmsetup -------------------------------------------------------------


def test_daemon_without_dmsetup_attaches_to_existing_tables(vm):
    assert vm["dmsetup_on_daemon_path"] is None
    assert vm["attached"] == {name: {"dm-user": f"/dev/mapper/{name}"} for name in ("e_big", "e_items", "e_ro", "e_snap")}
    assert vm["de_exit"] == 0
    assert vm["de_log"]["errors"] == [], vm["de_log"]


def test_table_size_read_from_sysfs(vm):
    assert vm["in_process"]["table_size_e_large"] == TABLES["e_large"]


# -- 1. a READ or WRITE larger than the daemon's buffers ------------------------------------------------------------


def test_oversized_read_and_write_fail_alone_and_keep_the_channel(vm):
    out = vm["oversized"]
    assert out["read"] == {"result": "EIO"} and out["write"] == {"result": "EIO"}, out
    # each was one 40 MiB message: counted as such, not as a protocol error
    assert out["rejected"] == {"dm-user-channel": {"io-too-large": 2}}, (out["runs"], out["rejected"])
    assert out["untouched"] == {"result": "ok", "sha": lib.sha(bytes(SMALL))}  # the dropped write wrote nothing
    assert out["small_write"] == {"result": "ok"}
    assert out["small_read"] == {"result": "ok", "sha": lib.sha(lib.pattern(12, SMALL))}
    assert vm["de_log"]["channel_failed"] == 0  # no channel was reset
    assert BIG > 32 * lib.MiB


# -- 3. READ answers whose len() is not their size in bytes -------------------------------------------------------------


def test_item_buffers_served_by_their_byte_size(vm):
    out = vm["items"]
    data = lib.pattern(ITEMS_SEED, TABLES["e_items"])
    assert out["right"] == {"result": "ok", "sha": lib.sha(data[:SMALL])}
    assert out["wrong"] == {"result": "EIO"}
    assert out["after"] == {"result": "ok", "sha": lib.sha(data[SMALL : 2 * SMALL])}
    assert out["errors"] == 1 and out["in_flight"] == 0
    assert ITEMS_WRONG < TABLES["e_items"]


# -- 4. fsync of a device whose backend takes no writes -------------------------------------------------------------


def test_fsync_of_a_backend_without_writes_or_flush_succeeds(vm):
    out = vm["fsync"]
    assert out["e_ro"] == {"result": "ok"}, out
    assert out["e_ro_requests"]["flush"] >= 1  # the flush reached the daemon and was answered SUCCESS


def test_fsync_of_a_snapshot_target_succeeds(vm):
    out = vm["fsync"]
    assert out["e_snap_requests"]["flush"] >= 1
    assert out["e_snap"] == {"result": "ok"}, out


# -- 5. configurations that make READ errors routine are refused ------------------------------------------------------


def test_table_larger_than_the_backend_is_refused(vm):
    message = vm["in_process"]["larger_table"]
    assert f"is {8 * lib.MiB} bytes, larger than the backend ({4 * lib.MiB} bytes)" in message, message


def test_backend_block_size_other_than_512_is_refused(vm):
    message = vm["in_process"]["block_size"]
    assert "block size is 4096 bytes" in message and "512-byte logical blocks" in message, message


# -- 2. a channel given up lets go of its file at once ------------------------------------------------------------------


def test_what_a_failed_channel_held_fails_at_once_and_its_thread_takes_nothing(vm):
    out = vm["in_process"]
    # The READ the kernel still counted as the poisoned channel's fails with
    # EIO when the channel is given up, without waiting for another request.
    assert out["poisoned"] == {"result": "EIO"}, out
    # The old reader thread is gone: the next requests reach the new channel.
    assert out["after_write"] == {"result": "ok"}, out
    assert out["after_read"] == {"result": "ok", "sha": lib.sha(lib.pattern(13, SMALL))}, out
    assert out["reopened"] == 1 and out["reader_threads"] == 1, out
