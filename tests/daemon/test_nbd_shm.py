"""The NBD export's shared-memory data plane, with real nbdkit, qemu-io and fio.

By default (``data=shm``) the plugin opens slotted channels on the daemon's
``shm.sock`` and maps the pool the daemon announces (a memfd): READ and
WRITE data up to a slot's size moves through it, larger requests go on the
socket of the same channel. ``data=socket`` keeps every byte on the
channel sockets. A peer naming a slot it may not use loses its channel,
and only that (a slot held by another channel's request: see
tests/protocol/test_protocol_slots.py); a kept nbdkit maps the next
daemon's pool after a restart.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from nbd_harness import fio_nbd, need_nbd_tools, qemu_io, read_answer

from dmuserd.daemon.nbd_shm import SLOT_SIZE, SLOTS
from dmuserd.protocol import HEADER_SIZE, RequestType, ResponseType

HEADER = struct.Struct("<5Q")  # the spec's layout, independent of the library
WORD = struct.Struct("<Q")
ANNOUNCEMENT = struct.Struct("<4Q")
NO_SLOT = (1 << 64) - 1
POOL = "memfd:dmuserd-nbd-pool"


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _pool_mappings(pid: int) -> set[str]:
    """The inodes of the pools process ``pid`` maps."""
    return {line.split()[4] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if POOL in line}


def _slotted(session) -> tuple[socket.socket, int]:
    """A slotted channel, its pool announcement read; (socket, slots)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(session.state_dir / "shm.sock"))
    data, fds, _flags, _addr = socket.recv_fds(sock, ANNOUNCEMENT.size, 1, socket.MSG_WAITALL)
    for fd in fds:
        os.close(fd)
    magic, version, slots, slot_size = ANNOUNCEMENT.unpack(data)
    assert (magic.to_bytes(8, "little"), version, slot_size, len(fds)) == (b"dmuserdP", 1, SLOT_SIZE, 1)
    return sock, slots


def test_data_moves_through_the_pool_both_ways(nbd_session):
    need_nbd_tools("qemu-io")
    daemon = nbd_session.start("memory:size=64M")
    nbdkit = nbd_session.nbdkit_pid()
    assert f"shm={nbd_session.state_dir / 'shm.sock'}" in _cmdline(nbdkit)
    # 4 KiB and a whole slot through slots; 3 MiB (over a slot) on the socket of a slotted channel.
    qemu_io(nbd_session.uri, "write -P 0x11 0 4k", "write -P 0x22 1M 1M", "write -P 0x33 4M 3M",
            "read -P 0x11 0 4k", "read -P 0x22 1M 1M", "read -P 0x33 4M 3M", "read -P 0 8M 64k")
    pools = _pool_mappings(nbdkit)
    assert len(pools) == 1, "nbdkit does not map the daemon's pool"
    assert pools == _pool_mappings(daemon.proc.pid)
    assert daemon.status()["targets"]["disk"]["errors"] == 0


def test_fio_verifies_through_the_pool_at_depth(nbd_session, tmp_path):
    """More requests at once than slots: the ones that find none go on the socket, all verify."""
    need_nbd_tools("fio")
    nbd_session.start("memory:size=64M", ",threads=128")
    job = fio_nbd(nbd_session.uri, tmp_path, "--rw=randwrite", "--bsrange=4k-2m", "--iodepth=96",
                  "--size=32M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randrepeat=0")
    assert job["_rc"] == 0 and job["error"] == 0, job["_stderr"]
    assert job["read"]["io_bytes"] >= 32 << 20


def test_data_socket_keeps_every_byte_on_the_socket(nbd_session):
    need_nbd_tools("qemu-io")
    nbd_session.start("memory:size=16M", ",data=socket")
    nbdkit = nbd_session.nbdkit_pid()
    assert not any(arg.startswith("shm=") for arg in _cmdline(nbdkit))
    qemu_io(nbd_session.uri, "write -P 0x44 0 1M", "read -P 0x44 0 1M")
    assert not _pool_mappings(nbdkit)


def test_a_bad_option_value_is_refused_by_name(nbd_session):
    daemon = nbd_session.start("memory:size=1M", ",data=pipe", wait=False)
    assert daemon.proc.wait(30) != 0
    assert "data" in daemon.log_text() and "pipe" in daemon.log_text()


@pytest.mark.parametrize(("slot", "kind", "length", "reason"), [
    (SLOTS, RequestType.READ, 4096, "protocol-slot"),
    (NO_SLOT - 1, RequestType.WRITE, 4096, "protocol-slot"),
    (0, RequestType.FLUSH, 0, "protocol-slot"),
    (0, RequestType.READ, SLOT_SIZE + 4096, "protocol-len"),
], ids=["past-the-pool", "huge", "flush-with-a-slot", "longer-than-a-slot"])
def test_a_bad_slot_ends_that_channel_alone(nbd_session, slot, kind, length, reason):
    need_nbd_tools("qemu-io")
    daemon = nbd_session.start("memory:size=4M")
    qemu_io(nbd_session.uri, "write -P 0x5a 0 64k")
    bad, slots = _slotted(nbd_session)
    good, _ = _slotted(nbd_session)
    with bad, good:
        assert slots == SLOTS
        bad.sendall(HEADER.pack(1, kind, 0, 0, length) + WORD.pack(slot))
        assert bad.recv(HEADER_SIZE) == b""  # closed, unanswered
        good.sendall(HEADER.pack(2, RequestType.READ, 0, 0, 512) + WORD.pack(NO_SLOT))
        assert read_answer(good)[:2] == (2, ResponseType.SUCCESS)
        assert good.recv(512, socket.MSG_WAITALL) == b"\x5a" * 512
    assert daemon.status()["rejected_inputs"]["nbd-channel"][reason] == 1
    qemu_io(nbd_session.uri, "read -P 0x5a 0 64k")  # nbdkit's own slotted channels are served on
    assert daemon.proc.poll() is None and "Traceback" not in daemon.log_text()


def test_a_kept_nbdkit_maps_the_next_daemons_pool(nbd_session, tmp_path):
    need_nbd_tools("qemu-io")
    backend = f"file:path={tmp_path / 'disk.img'},size=8M,create=1"
    first = nbd_session.start(backend, ",timeout=10")
    nbdkit = nbd_session.nbdkit_pid()
    qemu_io(nbd_session.uri, "write -P 0x61 0 1M")
    before = _pool_mappings(nbdkit)
    first.kill()
    second = nbd_session.start(backend, ",timeout=10")
    qemu_io(nbd_session.uri, "read -P 0x61 0 1M", "write -P 0x62 1M 1M", "read -P 0x62 1M 1M")
    assert nbd_session.nbdkit_pid() == nbdkit
    after = _pool_mappings(nbdkit)
    assert _pool_mappings(second.proc.pid) <= after and not _pool_mappings(second.proc.pid) <= before
    assert second.requests()["read"] > 0


def test_the_plugin_falls_back_to_plain_channels_without_a_slotted_socket(tmp_path):
    """A plugin started with shm= meets a peer with no slotted socket (an older daemon; here the C
    responder of the bench): every request goes on plain channels, and the data is right."""
    need_nbd_tools("qemu-io", "cc")
    repo = Path(__file__).resolve().parents[2]
    responder = tmp_path / "responder"
    subprocess.run(["cc", "-O2", "-o", str(responder), str(repo / "bench/anchors/dmuser_memory_responder.c")],
                   check=True, capture_output=True)
    channel, nbd = tmp_path / "ch.sock", tmp_path / "nbd.sock"
    peer = subprocess.Popen([str(responder), str(channel), str(16 << 20)], stderr=subprocess.DEVNULL)
    nbdkit = None
    try:
        while not channel.exists():
            assert peer.poll() is None, "the responder exited"
            time.sleep(0.02)
        nbdkit = subprocess.Popen(["nbdkit", "--foreground", "--unix", str(nbd), "python",
                                   str(repo / "daemon/nbdkit_plugin.py"), f"channel={channel}",
                                   f"shm={tmp_path / 'shm.sock'}", f"size={16 << 20}", "caps=read,write,flush"],
                                  stderr=subprocess.PIPE, text=True)
        while not nbd.exists():
            assert nbdkit.poll() is None, nbdkit.stderr.read()
            time.sleep(0.02)
        uri = f"nbd+unix:///?socket={nbd}"
        qemu_io(uri, "write -P 0x71 0 1M", "write -P 0x72 2M 4k", "read -P 0x71 0 1M", "read -P 0x72 2M 4k")
        assert not _pool_mappings(nbdkit.pid)
    finally:
        for proc in (nbdkit, peer):
            if proc is not None:
                proc.kill()
                proc.wait()
