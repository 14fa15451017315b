"""Capability gating: gen_cap, op_cap and op_config decide flags, operations and batches.

A device without cache control answers CACHE_CONTROL with "invalid flags";
a queue whose op_config leaves an operation out answers it with
"unsupported operation"; on a part where user submission is not safe the
kernel hides BATCH from op_cap and its write() answers a BATCH with EINVAL.
None of that may turn offload off or cost a device round trip per request.
"""

import random

import crc32c
import pytest

from dmuserd.dsa_offload import Flag, GenCap, Opcode, _discovery, discover
from dmuserd.dsa_offload._caps import Capabilities
from dmuserd.dsa_offload._device import Device
from dmuserd.dsa_offload._mover import Mover

from fake_sysfs import build

EVERY_GEN_CAP = int(GenCap.BLOCK_ON_FAULT | GenCap.OVERLAP_COPY | GenCap.CACHE_CONTROL_MEMORY
                    | GenCap.CACHE_CONTROL_CACHE)


def ops_bitmap(*opcodes) -> int:
    return sum(1 << int(op) for op in opcodes)


ALL_OPS = ops_bitmap(*Opcode.members().values())


async def test_cache_control_only_where_gen_cap_has_it(make_mover):
    mover = make_mover(threshold=4096, gen_cap=int(GenCap.BLOCK_ON_FAULT | GenCap.OVERLAP_COPY))
    src = random.Random(1).randbytes(100_000)
    dst = bytearray(len(src))
    for _ in range(3):
        await mover.copy(dst, src)
        await mover.fill(dst, 7)
    assert dst == bytes([7]) * len(src)
    stats = mover.stats()
    assert stats["fallbacks"] == {} and stats["offloaded_ops"] == 6 and stats["cpu_ops"] == 0
    assert not mover._device.flags(Opcode.MEMMOVE) & Flag.CACHE_CONTROL


async def test_cache_control_is_set_on_writes_where_available(make_mover):
    mover = make_mover(threshold=4096)
    assert mover._device.flags(Opcode.MEMMOVE) & Flag.CACHE_CONTROL
    assert not mover._device.flags(Opcode.CRCGEN) & Flag.CACHE_CONTROL  # writes nothing: no flag
    assert not mover._device.flags(Opcode.COMPARE) & Flag.CACHE_CONTROL


async def test_no_batch_where_op_cap_hides_it(make_mover):
    # user_submission_safe=False: the kernel shows op_cap without BATCH.
    mover = make_mover(threshold=8192, user_submission_safe=False)
    assert not mover.emulator.op_cap >> Opcode.BATCH & 1
    srcs = [bytes([i]) * 3000 for i in range(6)]
    dsts = [bytearray(3000) for _ in srcs]
    assert await mover.batch([("copy", d, s) for d, s in zip(dsts, srcs)]) == [None] * 6
    assert [bytes(d) for d in dsts] == srcs
    stats = mover.stats()
    assert stats["emulator"]["batches"] == 0 and stats["batches"] == 0 and stats["submitted"] == 0
    assert stats["fallbacks"] == {"below_threshold": 6}  # not packed: each stays on the CPU, none refused


async def test_a_refused_batch_turns_off_batches_not_the_device(ext):
    """A write() queue that answers EINVAL to BATCH (sysfs claimed it: an older kernel)."""
    emu = ext.Emulator(user_submission_safe=False, size=8)
    queue = ext.Queue(emulator=emu, portal="write")
    assert queue.kind == "write"
    caps = Capabilities(gen_cap=EVERY_GEN_CAP, op_cap=ALL_OPS, source="emulator")  # BATCH claimed
    mover = Mover(Device(queue, engine="emulated", caps=caps), engine="emulated", emulator=emu, threshold=8192)
    try:
        srcs = [bytes([i]) * 3000 for i in range(4)]
        dsts = [bytearray(3000) for _ in srcs]
        assert await mover.batch([("copy", d, s) for d, s in zip(dsts, srcs)]) == [None] * 4
        assert [bytes(d) for d in dsts] == srcs
        stats = mover.stats()
        assert stats["queue"]["broken"] is None
        assert "EINVAL" in stats["queue"]["batch_refused"] or "Invalid argument" in stats["queue"]["batch_refused"]
        assert stats["emulator"]["write_errors"] == 1 and stats["emulator"]["batches"] == 0
        assert stats["fallbacks"] == {} and stats["offloaded_ops"] == 4
        # The queue goes on offloading; later batches are not even tried.
        big_src, big_dst = random.Random(2).randbytes(200_000), bytearray(200_000)
        await mover.copy(big_dst, big_src)
        assert big_dst == big_src and mover.stats()["fallbacks"] == {}
        await mover.batch([("copy", d, s) for d, s in zip(dsts, srcs)])
        assert mover.stats()["emulator"]["write_errors"] == 1
    finally:
        mover.close()


async def test_op_config_narrows_the_operations(make_mover):
    mover = make_mover(threshold=4096, op_config=ALL_OPS & ~ops_bitmap(Opcode.CRCGEN))
    data = random.Random(3).randbytes(50_000)
    assert await mover.crc32c(data, 5) == crc32c.crc32c(data, 5)
    dst = bytearray(len(data))
    await mover.copy(dst, data)
    stats = mover.stats()
    assert stats["fallbacks"] == {"unsupported_op": 1}  # decided up front, not by a device error
    assert stats["submitted"] == 1 and stats["offloaded_ops"] == 1


async def test_block_on_fault_only_where_the_device_allows_it(ext, make_mover):
    # Asked for, configured on the queue, but the device's gen_cap lacks it.
    mover = make_mover(threshold=1, block_on_fault=True, gen_cap=int(GenCap.OVERLAP_COPY | GenCap.CACHE_CONTROL_MEMORY))
    src, dst = random.Random(4).randbytes(30_000), bytearray(30_000)
    mover.emulator.set_fault(ext.address_of(dst) + 10_000, 1)
    await mover.copy(dst, src)
    assert dst == src
    stats = mover.stats()
    assert stats["fallbacks"] == {} and stats["faults"] == 1  # touched and resubmitted instead
    assert not mover._device.flags(Opcode.MEMMOVE) & Flag.BLOCK_ON_FAULT


def test_sysfs_capabilities_are_read_per_queue(tmp_path, ext):
    op_config = "00000000,00000000,00000000,00000000,00000000,00000000,00000000,0000000b"  # noop, batch, memmove
    sysfs, devdir = build(tmp_path, {"wq0.0": {"op_config": op_config, "block_on_fault": "1"}, "wq0.1": {}},
                          devices={"dsa0": {"gen_cap": "0x40915f0106"}}, cdevs=("wq0.0", "wq0.1"))
    queues = {q.name: q for q in discover(str(sysfs), str(devdir))}
    restricted, plain = queues["wq0.0"].capabilities, queues["wq0.1"].capabilities
    assert restricted.gen_cap == plain.gen_cap == 0x40915F0106
    assert restricted.op_config == 0xB and plain.op_config is None
    assert restricted.supports(Opcode.MEMMOVE) and not restricted.supports(Opcode.CRCGEN)
    assert plain.supports(Opcode.CRCGEN)
    assert restricted.cache_control and restricted.overlap_copy
    assert not restricted.block_on_fault  # configured on the queue, but gen_cap bit 0 is clear
    assert restricted.batch  # op_cap has it, and so does op_config


def test_a_queue_whose_op_config_lacks_memmove_is_unusable(tmp_path, ext):
    op_config = "00000000,00000000,00000000,00000000,00000000,00000000,00000000,00010000"  # crcgen only
    sysfs, devdir = build(tmp_path, {"wq0.0": {"op_config": op_config}}, cdevs=("wq0.0",))
    (q,) = discover(str(sysfs), str(devdir))
    assert not q.usable and any("op_config does not allow MEMMOVE" in r for r in q.reasons)


def test_hidden_batch_without_rawio_predicts_write(tmp_path, ext, monkeypatch):
    # op_cap as the kernel shows it on a part where user submission is not safe: no BATCH (bit 1).
    hidden = "00000000,00000000,00000000,00000000,00000000,00000000,00000001,000303fd"
    sysfs, devdir = build(tmp_path, {"wq0.0": {}}, devices={"dsa0": {"op_cap": hidden}}, cdevs=("wq0.0",))
    monkeypatch.setattr(_discovery, "has_sys_rawio", lambda: False)
    (q,) = discover(str(sysfs), str(devdir))
    if ext.cpu_features()["movdir64b"]:
        assert q.submission == "write"
    caps = q.capabilities
    assert not caps.batch
    text = " ".join(caps.implications(rawio=False))
    assert "INTEL-SA-01084" in text and "write()" in text and "CAP_SYS_RAWIO" in text


@pytest.mark.parametrize("gen_cap,expect", [(None, "gen_cap not readable"), (0, "no cache control"),
                                            (int(GenCap.CACHE_CONTROL_MEMORY), "no block on fault (the device lacks it)")])
def test_implications_say_why(gen_cap, expect):
    caps = Capabilities(gen_cap=gen_cap, op_cap=ALL_OPS)
    assert any(expect in line for line in caps.implications())
