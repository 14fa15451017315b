"""dm-user edge cases found by review (issue #21), on the host.

Through the real channel paths of the in-process model
(:class:`~dmuserd.daemon.emulated.EmulatedDmUser`: its inline channel and
its background channels served by ``serve_channel``), through the dm-user
export's own pieces (the reader thread of :class:`~dmuserd.daemon.dmuser.DevChannel`
on a FIFO, ``_writev_all``, the checks of :class:`~dmuserd.daemon.dmuser.DmUserExport`), and through
sysfs as the daemon reads it. What needs the real driver is checked in the
VM by ``tests/vm/test_dmuser_edge_vm.py``.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from pathlib import Path
from array import array

import pytest
import trio
from peak_backend import PeakReads

from dmuserd.backends import Backend, Op, create
from dmuserd.backends.memory import MemoryBackend
from dmuserd.daemon import dmsetup
from dmuserd.daemon.config import ConfigError, ExportSpec, TargetSpec
from dmuserd.daemon.dispatcher import Dispatcher
from dmuserd.daemon.dmuser import PAYLOAD_PIECE, DevChannel, DmUserExport, _writev_all, install_wake_handler
from dmuserd.daemon.emulated import EmulatedDmUser
from dmuserd.daemon.runtime import Target
from dmuserd.protocol import DEFAULT_MAX_IO, Flag, RequestType

MiB = 1 << 20
R, W = RequestType.READ, RequestType.WRITE
HEADER = struct.Struct("<5Q")


async def _device(nursery, backend, **kwargs) -> EmulatedDmUser:
    device = EmulatedDmUser(Dispatcher(backend, name="t", **kwargs), channels=2)
    await nursery.start(device.run)
    return device


async def _through_background(nursery, device: EmulatedDmUser, *args):
    """Submit with every slot of the dispatcher taken, so a background channel (serve_channel) reads the
    message (and waits for a slot); then free them."""
    dispatcher = device.dispatcher
    held = dispatcher.max_in_flight - dispatcher.stats.in_flight
    dispatcher.stats.in_flight += held  # as if that many requests were running
    out: dict = {}
    done = trio.Event()

    async def submit():
        try:
            out["data"] = await device.submit(*args)
        except OSError as exc:
            out["errno"] = exc.errno
        done.set()

    nursery.start_soon(submit)
    with trio.fail_after(10):
        while not done.is_set() and (device.target.queued or not device.target.outstanding):  # until taken
            await trio.sleep(0.001)
    for _ in range(held):
        dispatcher._release()  # each ends: its slot goes to a waiter, if any
    with trio.fail_after(10):
        await done.wait()
    return out


def _no_leaks(device: EmulatedDmUser) -> None:
    assert device.target.outstanding == 0
    assert device._inline_conn.outstanding == 0
    assert all(channel.awaiting == 0 for channel in device.target.channels)


# -- 1. a READ or WRITE longer than the daemon's buffers -------------------------------------------------


async def test_oversized_io_fails_alone_inline_and_in_background(nursery):
    backend = MemoryBackend(64 * MiB)
    device = await _device(nursery, backend)
    big = DEFAULT_MAX_IO + 4096
    with pytest.raises(OSError) as info, trio.fail_after(30):
        await device.submit(W, 0, big, data=b"\x01" * big)
    assert info.value.errno == errno.EIO
    with pytest.raises(OSError), trio.fail_after(30):
        await device.submit(R, 0, big)
    assert await _through_background(nursery, device, W, 4096, big, b"\x02" * big) == {"errno": errno.EIO}
    assert await _through_background(nursery, device, R, 4096, big) == {"errno": errno.EIO}
    # Counted, the data untouched, and the channels still serve.
    assert device.dispatcher.guard.as_dict() == {"dm-user-model": {"io-too-large": 4}}
    assert await backend.read(0, 8192) == bytes(8192)
    await device.submit(W, 0, 4096, data=b"\x03" * 4096)
    assert bytes(await device.submit(R, 0, 4096)) == b"\x03" * 4096
    assert (await _through_background(nursery, device, R, 0, 4096))["data"] == b"\x03" * 4096
    _no_leaks(device)


async def test_a_channel_broken_by_bytes_no_kernel_sends_is_replaced(nursery):
    device = await _device(nursery, MemoryBackend(1 * MiB))
    channels = len(device.target.channels)
    with pytest.raises(OSError) as info, trio.fail_after(10):
        await device.submit(RequestType.DISCARD, 0, 1)  # len not a multiple of 512: no block layer builds it
    assert info.value.errno == errno.EIO
    assert await _through_background(nursery, device, RequestType.DISCARD, 0, 1) == {"errno": errno.EIO}
    assert len(device.target.channels) == channels  # closed (failing what they held) and replaced
    assert device.dispatcher.guard.as_dict() == {"dm-user-model": {"protocol-len": 2}}
    await device.submit(W, 0, 4096, data=b"\x05" * 4096)
    assert (await _through_background(nursery, device, R, 0, 4096))["data"] == b"\x05" * 4096
    _no_leaks(device)


# -- 3. READ answers whose len() is not their size in bytes ------------------------------------------------


class ItemsBackend(MemoryBackend):
    """Reads come back as buffers of 4-byte or 2-byte items.

    Below :attr:`WRONG` the byte size is right (``len()`` is a quarter of
    it); from there on ``len()`` equals the length asked for but the byte
    size is twice that: a daemon counting items would send it.
    """

    WRONG = 1 * MiB

    async def read(self, offset, length):
        data = await super().read(offset, length)
        if offset < self.WRONG:
            return array("I", bytes(data))
        return memoryview(bytes(2 * length)).cast("H")


@pytest.mark.parametrize("path", ["inline", "background"])
async def test_item_buffers_served_by_their_byte_size(nursery, path):
    backend = ItemsBackend(2 * MiB)
    device = await _device(nursery, backend)
    pattern = bytes(range(256)) * 64
    await backend.write(8192, pattern)
    if path == "inline":
        assert bytes(await device.submit(R, 8192, len(pattern))) == pattern
        with pytest.raises(OSError) as info:
            await device.submit(R, ItemsBackend.WRONG, 4096)
        assert info.value.errno == errno.EIO
    else:
        assert (await _through_background(nursery, device, R, 8192, len(pattern)))["data"] == pattern
        assert await _through_background(nursery, device, R, ItemsBackend.WRONG, 4096) == {"errno": errno.EIO}
    # The channel goes on, nothing stays outstanding, nothing counted as a channel failure.
    assert bytes(await device.submit(R, 8192, 4096)) == pattern[:4096]
    _no_leaks(device)
    assert device.dispatcher.stats.errors == 1
    assert device.dispatcher.guard.total == 0


async def test_write_bio_payload_counted_in_bytes(nursery):
    backend = MemoryBackend(1 * MiB)
    device = await _device(nursery, backend)
    data = array("I", range(1024))  # 1024 items, 4096 bytes
    await device.submit(W, 0, 4096, data=data)
    assert await backend.read(0, 4096) == data.tobytes()


def test_writev_all_counts_bytes_not_items():
    read_end, write_end = os.pipe()
    try:
        header = HEADER.pack(1, 0, 0, 0, 8192)
        items = array("I", range(1024))
        halves = memoryview(bytes(range(256)) * 16).cast("H")
        _writev_all(write_end, [header, items, halves])
        got = os.read(read_end, 1 << 16)
        assert got == header + items.tobytes() + halves.tobytes()
    finally:
        os.close(read_end)
        os.close(write_end)


# -- 4. flushes of a backend that takes no writes -----------------------------------------------------------


class ReadOnly(Backend):
    """Reads only: no write(), no flush() (nothing it serves can be pending)."""

    async def read(self, offset, length):
        return bytes(length)


def _snapshot(tmp_path):
    from dmuserd.snapshot._cow_tools import create_cow

    (tmp_path / "base.img").write_bytes(bytes(1 * MiB))
    (tmp_path / "target.img").write_bytes(b"\x07" * 4096 + bytes(1 * MiB - 4096))
    create_cow(tmp_path / "base.img", tmp_path / "target.img", tmp_path / "s.cow", version=2, progress=False)
    return create("snapshot", {"base": str(tmp_path / "base.img"), "cow": str(tmp_path / "s.cow")})


async def _flushes_succeed(device: EmulatedDmUser) -> None:
    with trio.fail_after(30):
        await device.submit(W, 0, 0, data=b"", flags=int(Flag.PREFLUSH))  # how the 6.1 kernel flushes
        await device.submit(RequestType.FLUSH, 0, 0)
        with pytest.raises(OSError):
            await device.submit(W, 0, 4096, data=bytes(4096))  # a write is still refused


async def test_flush_of_a_backend_that_takes_no_writes_succeeds(nursery):
    backend = ReadOnly(size=1 * MiB)
    assert backend.capabilities == {Op.READ}
    await _flushes_succeed(await _device(nursery, backend))


async def test_flush_of_a_snapshot_target_succeeds(nursery, tmp_path):
    backend = _snapshot(tmp_path)
    try:
        await _flushes_succeed(await _device(nursery, backend))
    finally:
        await backend.close()


# -- 7. the kernel has no cap: the daemon bounds itself -----------------------------------------------------


async def test_the_daemon_bounds_requests_in_the_dispatcher_not_the_kernel(nursery):
    backend = PeakReads(1 * MiB)
    device = await _device(nursery, backend, max_in_flight=4)
    most_outstanding = 0

    async def watch():
        nonlocal most_outstanding
        while True:
            most_outstanding = max(most_outstanding, device.target.outstanding)
            await trio.sleep(0)

    nursery.start_soon(watch)
    async with trio.open_nursery() as readers:
        for i in range(200):
            readers.start_soon(device.submit, R, i * 512, 512)
    assert backend.peak == 4
    assert most_outstanding > 128  # beyond dm-user.c's reserve: messages wait in the kernel, not refused
    _no_leaks(device)


# -- 1 and 2: the reader thread of a real channel, on a FIFO --------------------------------------------------


@pytest.fixture
def fifo(tmp_path):
    """A FIFO standing in for ``/dev/dm-user/NAME`` (no poll either way: the reader thread blocks in read())."""
    assert install_wake_handler()  # as DmUserDevice.run does: giving a channel up can wake its reader
    path = tmp_path / "channel"
    os.mkfifo(path)
    return str(path)


def _has_reader(path: str) -> bool:
    """Whether some file still has the FIFO open (an O_NONBLOCK writer's open fails with ENXIO if none)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        assert exc.errno == errno.ENXIO
        return False
    os.close(fd)
    return True


async def test_giving_up_a_channel_releases_its_file_while_the_reader_is_blocked(fifo):
    channel = DevChannel(fifo, "fifo")
    wchan = f"/proc/self/task/{channel._thread.native_id}/wchan"
    with trio.fail_after(10):
        while "pipe_read" not in Path(wchan).read_text():  # until the thread sleeps in the FIFO's read()
            await trio.sleep(0.001)
    assert _has_reader(fifo)
    channel.close()
    with trio.fail_after(10):
        while channel._thread.is_alive():
            await trio.sleep(0.001)
    assert not _has_reader(fifo)  # released at once, not at the next message


async def test_oversized_write_payload_reaches_trio_in_bounded_pieces(fifo):
    channel = DevChannel(fifo, "fifo")
    length = DEFAULT_MAX_IO + 3 * 512
    writer_fd = os.open(fifo, os.O_WRONLY)

    def write():
        os.write(writer_fd, HEADER.pack(5, int(W), 0, 0, length))
        chunk = bytes(MiB)
        left = length
        while left:
            left -= os.write(writer_fd, chunk[: min(left, len(chunk))])
        os.write(writer_fd, HEADER.pack(6, int(R), 0, 0, 512))

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    sizes = []
    total = 0
    with trio.fail_after(60):
        while total < HEADER.size + length + HEADER.size:
            data = await channel.receive_some(1 << 30)
            sizes.append(len(data))
            total += len(data)
    assert sizes[0] == HEADER.size and sizes[-1] == HEADER.size
    assert max(sizes[1:-1]) <= PAYLOAD_PIECE and sum(sizes[1:-1]) == length
    thread.join(10)
    os.close(writer_fd)
    channel.close()


# -- 5 and 6: refused configurations; the table's size without dmsetup -----------------------------------------


def _target(backend_spec: dict) -> Target:
    return Target(TargetSpec("t", "memory", backend_spec, []), create("memory", backend_spec))


async def test_backend_block_size_other_than_512_is_refused_before_touching_a_device(nursery):
    target = _target({"size": "4M", "block_size": "4K"})
    name = "dmuserd-test-no-such-device"
    with pytest.raises(ConfigError, match="block size is 4096 bytes.*512-byte logical blocks"):
        await DmUserExport.from_spec(ExportSpec("dm-user", name, {}), None).start(target, nursery)
    assert target.endpoints == {}


def _fake_sysfs(root, devices: dict[str, int]) -> str:
    for index, (name, sectors) in enumerate(devices.items()):
        node = root / f"dm-{index}"
        (node / "dm").mkdir(parents=True)
        (node / "dm" / "name").write_text(name + "\n")
        (node / "size").write_text(f"{sectors}\n")
    (root / "loop0").mkdir()
    (root / "loop0" / "size").write_text("8\n")
    return str(root)


def test_table_size_from_sysfs(tmp_path):
    sys_block = _fake_sysfs(tmp_path, {"other": 16, "disk": 8192})
    assert dmsetup.table_size("disk", sys_block) == 8192 * 512
    assert dmsetup.table_size("other", sys_block) == 16 * 512
    assert dmsetup.table_size("absent", sys_block) is None
    assert dmsetup.table_size("disk", str(tmp_path / "no-sysfs")) is None


async def test_existing_table_larger_than_the_backend_is_refused(nursery, tmp_path, monkeypatch):
    monkeypatch.setattr(dmsetup, "SYS_BLOCK", _fake_sysfs(tmp_path, {"dmuserd-test-big": 16384}))
    monkeypatch.setenv("PATH", str(tmp_path))  # no dmsetup: sysfs is enough
    target = _target({"size": "4M"})
    with pytest.raises(ConfigError, match="8388608 bytes, larger than the backend \\(4194304 bytes\\)"):
        await DmUserExport.from_spec(ExportSpec("dm-user", "dmuserd-test-big", {}), None).start(target, nursery)
    assert target.endpoints == {}
