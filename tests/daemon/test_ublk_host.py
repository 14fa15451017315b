"""The ublk export on a host without ublk, and its parts that need no kernel.

What needs the ublk kernel (devices, fio, recovery, ``dmuserd ublk
list|del``) is in ``tests/vm/test_ublk_vm.py``. Here: ``dmuserd serve
--export ublk`` and ``dmuserd ublk list|del`` on a kernel without ublk fail
with one line naming the alternatives, ``--export ublk`` may leave the ID
out (not so the kinds that need a WHERE), who serves a device follows its
state and pid, options are checked before anything starts, the UAPI structs have the kernel's
layout, descriptors become typed requests (and a malformed one is refused
on its own), and the block parameters follow the backend.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import trio

from dmuserd.backends import create
from dmuserd.daemon.config import ConfigError, ExportSpec, load_toml, parse_export
from dmuserd.daemon.guard import Guard
from dmuserd.daemon.ublk import uapi
from dmuserd.daemon.ublk.devices import Device
from dmuserd.daemon.ublk.export import NO_UBLK, UblkExport, params_for
from dmuserd.daemon.ublk.queue import Malformed, to_request
from dmuserd.protocol import Flag, RequestType

HAS_UBLK = os.path.exists(uapi.CONTROL_PATH)


class Host:
    def __init__(self) -> None:
        self.guard = Guard()
        self.stopping = False
        self.shared: dict = {}
        self.nursery = None


@pytest.mark.skipif(HAS_UBLK, reason="this kernel has ublk: the no-ublk error cannot happen here "
                                     "(tests/vm/test_ublk_vm.py serves real devices)")
def test_serve_without_ublk_is_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dmuserd", "serve", "--backend", "memory:size=16M",
                           "--export", "ublk:0", "--control-socket", str(tmp_path / "c.sock")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"dmuserd: error: {NO_UBLK}"], proc.stderr
    assert "--export nbd:" in lines[0] and "--export fuse:" in lines[0] and "/dev/ublk-control" in lines[0]
    assert not (tmp_path / "c.sock").exists()  # nothing started


@pytest.mark.skipif(HAS_UBLK, reason="this kernel has ublk: the no-ublk error cannot happen here")
def test_from_spec_without_ublk_raises_config_error():
    with pytest.raises(ConfigError, match="this kernel has no ublk"):
        UblkExport.from_spec(ExportSpec("ublk", "0", {}), Host())


@pytest.mark.skipif(HAS_UBLK, reason="this kernel has ublk: the no-ublk error cannot happen here "
                                     "(tests/vm/test_ublk_vm.py lists and deletes real devices)")
@pytest.mark.parametrize("argv", [["list"], ["list", "--json"], ["del", "0"]])
def test_ublk_commands_without_ublk_are_one_clear_line(argv):
    proc = subprocess.run([sys.executable, "-m", "dmuserd", "ublk", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"dmuserd: error: {NO_UBLK}"], proc.stderr


def test_ublk_del_needs_a_device_number():
    proc = subprocess.run([sys.executable, "-m", "dmuserd", "ublk", "del", "ublkb0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "invalid int value: 'ublkb0'" in proc.stderr


@pytest.mark.parametrize("text,where,options", [
    ("ublk", "auto", {}),
    ("ublk,queues=2", "auto", {"queues": "2"}),
    ("ublk:,queues=2,recovery=0", "auto", {"queues": "2", "recovery": "0"}),
    ("ublk:3,depth=8", "3", {"depth": "8"}),
])
def test_the_ublk_id_may_be_left_out(text, where, options):
    assert parse_export(text) == ExportSpec("ublk", where, options)


def test_the_ublk_id_may_be_left_out_in_toml(tmp_path):
    config = tmp_path / "d.toml"
    config.write_text('[targets.disk]\nbackend = "memory:size=16M"\nexports = ["ublk,queues=2"]\n')
    [target] = load_toml(str(config)).targets
    assert target.exports == [ExportSpec("ublk", "auto", {"queues": "2"})]


@pytest.mark.parametrize("text", ["fuse", "nbd,on-stop=stop", "dm-user:", "dm-user:,channels=2"])
def test_kinds_that_need_a_where_still_say_so_with_an_example(text):
    with pytest.raises(ConfigError) as info:
        parse_export(text)
    assert str(info.value).startswith(f"export {text!r}: use KIND:WHERE") and "e.g. fuse:/run/dmuserd/fuse" in \
        str(info.value)


def _device(state: uapi.DevState, pid: int, holders=()) -> Device:
    info = uapi.DevInfo(2, 16, 512 << 10, dev_id=4094, flags=uapi.Feature.USER_RECOVERY, state=state,
                        ublksrv_pid=pid)
    return Device.from_info(info, list(holders))


def test_who_serves_a_device():
    me, gone = os.getpid(), _dead_pid()
    live = _device(uapi.DevState.LIVE, me, [me])
    assert (live.state, live.pid_alive, live.served_by, live.recovery) == ("live", True, me, True)
    assert _device(uapi.DevState.DEAD, me).served_by == me  # being set up: ADD_DEV carried its pid
    assert _device(uapi.DevState.DEAD, -1).served_by is None  # stopped by the kernel, its daemon gone
    assert _device(uapi.DevState.LIVE, gone).served_by is None  # its daemon died, the kernel has not noticed yet
    # recovery=1, its daemon gone: nobody, unless a new daemon has the channel open (taking it over)
    assert _device(uapi.DevState.QUIESCED, gone).served_by is None
    assert _device(uapi.DevState.QUIESCED, me).served_by is None  # a live pid alone is not a holder
    assert _device(uapi.DevState.QUIESCED, gone, [me]).served_by == me
    view = _device(uapi.DevState.QUIESCED, gone).as_dict()
    assert view == {"id": 4094, "state": "quiesced", "queues": 2, "depth": 16, "max_io": 512 << 10, "pid": gone,
                    "pid_alive": False, "holders": [], "recovery": True, "block": None, "served_by": None}


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("where,options,message", [
    ("0", {"recovery": "maybe"}, "is not a boolean"),
    ("0", {"queues": "0"}, "out of range"),
    ("0", {"depth": "5000"}, "out of range"),
    ("0", {"colour": "red"}, "colour"),
    ("x", {}, "the ublk device ID is a number"),
    ("auto", {"recovery": "1"}, "recovery=1 needs a device ID"),
])
def test_options_are_checked_before_anything_starts(where, options, message):
    with pytest.raises(ConfigError, match=message):
        UblkExport.from_spec(ExportSpec("ublk", where, options), Host())


def test_uapi_layouts_match_the_kernel_header():
    info = uapi.DevInfo(nr_hw_queues=2, queue_depth=64, max_io_buf_bytes=512 << 10, dev_id=7,
                        flags=uapi.Feature.USER_RECOVERY, state=uapi.DevState.QUIESCED, ublksrv_pid=1234)
    raw = info.encode()
    assert len(raw) == 64
    # nr_hw_queues u16, queue_depth u16, state u16, pad, max_io_buf_bytes u32, dev_id u32, pid s32
    assert raw[:20] == bytes.fromhex("0200" "4000" "0200" "0000" "00000800" "07000000" "d2040000")
    assert raw[24:32] == (1 << 3).to_bytes(8, "little")
    assert uapi.DevInfo.decode(raw) == info
    params = uapi.Params(dev_sectors=2048, max_discard_sectors=8, discard_granularity=4096)
    raw = params.encode()
    assert len(raw) == 64 and raw[:8] == bytes.fromhex("40000000" "03000000")  # len 64, basic | discard
    assert uapi.Params.decode(raw) == params
    assert uapi.ctrl_cmd(3, addr=0x1000, length=64, data0=99) == bytes.fromhex(
        "03000000" "ffff" "4000" "0010000000000000" "6300000000000000" "0000000000000000")
    assert uapi.io_cmd(1, 5, -errno.EIO, 0xABC) == bytes.fromhex("0100" "0500" "fbffffff" "bc0a000000000000")
    # queue 1's descriptors start after room for the maximum depth (4096 x 24 bytes)
    assert uapi.descriptor_array_offset(1, 4096) == 4096 * 24
    assert uapi.descriptor_array_size(16, 4096) == 4096 and uapi.descriptor_array_size(200, 4096) == 8192


def _descriptor(op: int, flags: int, sectors: int, start: int) -> bytes:
    return (op | flags).to_bytes(4, "little") + sectors.to_bytes(4, "little") + start.to_bytes(8, "little") + \
        (0x7000).to_bytes(8, "little")


def test_descriptors_become_typed_requests():
    array = bytearray(3 * uapi.DESCRIPTOR_SIZE)
    array[24:48] = _descriptor(uapi.Op.WRITE, uapi.IoFlag.FUA, 8, 100)
    array[48:72] = _descriptor(uapi.Op.WRITE_ZEROES, uapi.IoFlag.NOUNMAP, 16, 0)
    buffer = memoryview(bytearray(b"\xab" * 4096 + b"\xcd" * 4096))
    write = to_request(uapi.decode_descriptor(array, 1), 1, buffer)
    assert (write.type, write.flags, write.sector, write.len) == (RequestType.WRITE, Flag.FUA, 100, 4096)
    assert write.payload == b"\xab" * 4096 and isinstance(write.payload, bytes)  # a copy: the tag's buffer is reused
    zeroes = to_request(uapi.decode_descriptor(array, 2), 2, buffer)
    assert (zeroes.type, zeroes.flags, zeroes.len, zeroes.payload) == (RequestType.WRITE_ZEROES, Flag.NOUNMAP,
                                                                        8192, None)
    flush = to_request(uapi.Descriptor(uapi.Op.FLUSH, 0, 0, 0, 0), 0, buffer)
    assert (flush.type, flush.len) == (RequestType.FLUSH, 0)


def test_every_combination_of_ublk_flags_maps_bit_by_bit():
    """ublk's FUA, NOUNMAP, META and FAILFAST_* become ours by name; SWAP and unknown bits are dropped."""
    bits = list(uapi.IoFlag) + [1 << 30]
    for combination in range(1 << len(bits)):
        theirs = [bit for i, bit in enumerate(bits) if combination >> i & 1]
        expected = Flag(0)
        for bit in theirs:
            if isinstance(bit, uapi.IoFlag) and bit is not uapi.IoFlag.SWAP:
                expected |= Flag[bit.name]
        value = sum(int(bit) for bit in theirs)
        request = to_request(uapi.Descriptor(uapi.Op.READ, value, 8, 0, 0), 0, memoryview(bytearray(4096)))
        assert request.flags == expected and isinstance(request.flags, Flag), (hex(value), request.flags)


@pytest.mark.parametrize("desc,message", [
    (uapi.Descriptor(uapi.Op.WRITE_SAME, 0, 8, 0, 0), "unknown operation 4"),
    (uapi.Descriptor(0x7F, 0, 8, 0, 0), "unknown operation 127"),
    (uapi.Descriptor(uapi.Op.READ, 0, 17, 0, 0), "larger than the tag's 8192-byte buffer"),
])
def test_a_malformed_descriptor_is_refused(desc, message):
    with pytest.raises(Malformed, match=message):
        to_request(desc, 0, memoryview(bytearray(8192)))


async def test_block_parameters_follow_the_backend(tmp_path):
    memory = create("memory", {"size": "64M", "block_size": "4096"})
    p = params_for(memory)
    assert (p.dev_sectors, p.logical_bs_shift, p.physical_bs_shift, p.max_sectors) == (131072, 12, 12, 1024)
    assert p.attrs & uapi.Attr.VOLATILE_CACHE and p.attrs & uapi.Attr.FUA and not p.attrs & uapi.Attr.READ_ONLY
    image = tmp_path / "ro.img"
    image.write_bytes(bytes(1 << 20))
    read_only = create("file", {"path": str(image), "readonly": "1"})
    q = params_for(read_only)
    assert q.attrs & uapi.Attr.READ_ONLY and not q.attrs & uapi.Attr.VOLATILE_CACHE
    assert q.max_discard_sectors == q.max_write_zeroes_sectors == 0 and q.types == uapi.PARAM_TYPE_BASIC
    big = create("memory", {"size": "1M", "block_size": "8192"})
    with pytest.raises(ConfigError, match="512 to 4096 bytes"):
        params_for(big)
    for backend in (memory, read_only, big):
        await backend.close()
    await trio.lowlevel.checkpoint()
