"""Work-queue discovery from a fake sysfs tree: usable or not, and why."""

import pytest

from dmuserd.dsa_offload import DsaUnavailable, Opcode, auto_choice, discover, open_mover

from fake_sysfs import build


@pytest.fixture
def tree(tmp_path, ext):
    return build(
        tmp_path,
        {
            "wq0.0": {},
            "wq0.1": {"state": "disabled"},
            "wq0.2": {"type": "kernel", "name": "dmaengine"},
            "wq1.0": {"max_transfer_size": "65536"},
            "wq0.3": {},  # no character device
        },
        devices={"dsa1": {"pasid_enabled": "0", "max_transfer_size": "32768"}},
        cdevs=("wq0.0", "wq0.1", "wq0.2", "wq1.0"),
    )


def test_each_queue_reports_why(tree):
    sysfs, devdir = tree
    queues = {q.name: q for q in discover(str(sysfs), str(devdir))}
    assert sorted(queues) == ["wq0.0", "wq0.1", "wq0.2", "wq0.3", "wq1.0"]
    assert queues["wq0.0"].usable and queues["wq0.0"].reasons == ()
    assert not queues["wq0.1"].usable and any("not enabled (state=disabled)" in r for r in queues["wq0.1"].reasons)
    assert not queues["wq0.2"].usable and any("type is kernel" in r for r in queues["wq0.2"].reasons)
    assert not queues["wq1.0"].usable and any("no PASID" in r for r in queues["wq1.0"].reasons)
    assert not queues["wq0.3"].usable and any("no character device" in r for r in queues["wq0.3"].reasons)


def test_attributes_are_parsed(tree):
    sysfs, devdir = tree
    queues = {q.name: q for q in discover(str(sysfs), str(devdir))}
    q = queues["wq0.0"]
    assert (q.mode, q.state, q.type, q.size, q.block_on_fault, q.device) == ("dedicated", "enabled", "user", 16, 0, "dsa0")
    assert q.path == f"{devdir}/wq0.0"
    assert q.max_transfer_size == 2097152  # the queue's limit, under the device's
    assert queues["wq1.0"].max_transfer_size == 32768  # the device's limit, under the queue's
    for op in (Opcode.MEMMOVE, Opcode.CRCGEN, Opcode.CACHE_FLUSH):
        assert q.op_cap >> op & 1
    assert not q.op_cap >> 0x12 & 1


def test_old_op_cap_format(tmp_path, ext):
    sysfs, devdir = build(tmp_path, {"wq0.0": {}}, devices={"dsa0": {"op_cap": "0x303ff 0x0 0x1 0x0"}}, cdevs=("wq0.0",))
    (q,) = discover(str(sysfs), str(devdir))
    assert q.op_cap == 0x303FF | 1 << 128


def test_shared_queue_needs_enqcmd(tmp_path, ext):
    sysfs, devdir = build(tmp_path, {"wq0.0": {"mode": "shared"}}, cdevs=("wq0.0",))
    (q,) = discover(str(sysfs), str(devdir))
    if ext.cpu_features()["enqcmd"]:
        assert q.usable and q.submission == "enqcmd"
    else:
        assert not q.usable and any("ENQCMD" in r for r in q.reasons)


def test_auto_choice(tree, tmp_path):
    sysfs, devdir = tree
    assert auto_choice(discover(str(sysfs), str(devdir)))[0] == "dsa"
    engine, reason = auto_choice([])
    assert engine == "cpu" and "no DSA work queues" in reason


def test_auto_falls_back_to_cpu_and_dsa_says_why(tmp_path, ext):
    sysfs, devdir = build(tmp_path, {"wq0.0": {"state": "disabled"}}, cdevs=("wq0.0",))
    mover = open_mover("auto", sysfs=str(sysfs), devdir=str(devdir))
    assert mover.engine == "cpu" and mover.queue is None
    with pytest.raises(DsaUnavailable, match="wq0.0: queue is not enabled"):
        open_mover("dsa", sysfs=str(sysfs), devdir=str(devdir))
