"""dmuserd's own FUSE session (daemon/_fuse_session.c, daemon/fuse.py's SessionLoop), on real mounts in process.

The callers are threads doing plain file system calls on the mount (a FUSE
call blocks until the session answers, so they cannot run in trio's thread).
What is checked: no caller ever hangs (a request dropped unanswered, or still
outstanding when the session closes, is answered EIO, and a late answer is
refused), a request that waits in its backend does not hold the others
back, and the metadata a block file needs.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest
import trio

from daemon_harness import need_root_tools

fs = pytest.importorskip("dmuserd.daemon._fuse_session", reason="the FUSE session extension was not built (libfuse3-dev)")

from dmuserd.backends.memory import MemoryBackend  # noqa: E402
from dmuserd.daemon.direct import DirectDevice, InProcessDevice  # noqa: E402
from dmuserd.daemon.dispatcher import Dispatcher  # noqa: E402
from dmuserd.daemon.fuse import FuseMount  # noqa: E402
from dmuserd.protocol import Response, ResponseType  # noqa: E402

SIZE = 1 << 20


def _pread(path, offset: int, size: int = 4096):
    """The bytes, or the errno the call failed with."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        return exc.errno
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # ENOTCONN: the mount stopped (its FLUSH finds no session)


async def _next_lookup(session, name: bytes):
    """The LOOKUP of ``name``; any other request on the way (the kernel's own) is answered ENOENT."""
    while True:
        while (event := session.next()) is None:
            await trio.lowlevel.wait_readable(session.fd)
        if event[0] == fs.LOOKUP and event[3] == name:
            return event
        event[1].error(errno.ENOENT)


async def _wait_for(predicate) -> None:
    with trio.fail_after(20):
        while not predicate():
            await trio.sleep(0.01)


async def test_requests_dropped_or_outstanding_at_close_answer_eio(tmp_path):
    need_root_tools()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    session = fs.Session(str(mountpoint), "fsname=dmuserd-test")
    results: list = []
    try:
        async with trio.open_nursery() as nursery:

            async def call(name):
                try:
                    results.append(await trio.to_thread.run_sync(os.stat, str(mountpoint / name)))
                except OSError as exc:
                    results.append((name, exc.errno))

            try:
                with trio.fail_after(20):
                    # A dropped request (a bug, a cancelled task): its caller gets EIO.
                    nursery.start_soon(call, "dropped")
                    event = await _next_lookup(session, b"dropped")
                    assert session.outstanding == 1
                    del event
                    assert session.outstanding == 0
                    # A request still outstanding when the session closes: EIO, then a late answer is refused.
                    nursery.start_soon(call, "outstanding")
                    request = (await _next_lookup(session, b"outstanding"))[1]
            finally:
                # (Also when the test fails: a caller blocked on the mount would hold the nursery forever.)
                trio.lowlevel.notify_closing(session.fd)
                session.close()
            assert request.answered
            assert request.error(0) is False
            assert session.fd == -1
    finally:
        session.close()  # idempotent
    # The second caller was answered EIO; it sees ENOENT in about half the runs
    # here, which we take to be its path walk meeting the lazy unmount (the name
    # does not exist in the directory below). Either way it did not hang.
    assert results[0] == ("dropped", errno.EIO)
    assert results[1] in {("outstanding", errno.EIO), ("outstanding", errno.ENOENT)}, results
    assert not os.path.ismount(mountpoint)


class _Gate(InProcessDevice):
    """Each read waits for the gate, counting how many wait at once."""

    def __init__(self) -> None:
        super().__init__("gate")
        self.waiting = 0
        self.gate = trio.Event()

    async def handle(self, request, views=False):
        self.waiting += 1
        await self.gate.wait()
        self.waiting -= 1
        return Response(request.seq, ResponseType.SUCCESS, [bytes([request.sector % 251]) * request.len])


async def test_a_request_waiting_in_its_backend_does_not_hold_the_others_back(tmp_path):
    need_root_tools()
    device = _Gate()
    mount = FuseMount(str(tmp_path / "mnt"))
    path = mount.add("disk", device, SIZE, 4096)
    callers = 12
    async with trio.open_nursery() as nursery:
        await nursery.start(mount.run)
        answers: dict[int, object] = {}

        async def read(i):
            answers[i] = await trio.to_thread.run_sync(_pread, path, i * 4096)

        for i in range(callers):
            nursery.start_soon(read, i)
        await _wait_for(lambda: device.waiting == callers)  # all in the backend at once
        device.gate.set()
        await _wait_for(lambda: len(answers) == callers)
        nursery.cancel_scope.cancel()
    assert answers == {i: bytes([i * 8 % 251]) * 4096 for i in range(callers)}
    assert not os.path.ismount(tmp_path / "mnt")


async def test_cancelled_requests_answer_eio_when_the_mount_stops(tmp_path):
    need_root_tools()
    device = _Gate()
    mount = FuseMount(str(tmp_path / "mnt"))
    path = mount.add("disk", device, SIZE, 4096)
    answers: list = []
    async with trio.open_nursery() as outer:

        async def read(i):
            answers.append(await trio.to_thread.run_sync(_pread, path, i * 4096))

        async with trio.open_nursery() as nursery:
            await nursery.start(mount.run)
            for i in range(3):
                outer.start_soon(read, i)
            await _wait_for(lambda: device.waiting == 3)
            nursery.cancel_scope.cancel()  # the daemon stops with the reads in its backend
        await _wait_for(lambda: len(answers) == 3)
    assert answers == [errno.EIO] * 3
    assert not mount.mounted


async def test_what_a_block_file_answers_through_the_mount(tmp_path):
    need_root_tools()
    backend = MemoryBackend(SIZE, 512)
    mount = FuseMount(str(tmp_path / "mnt"))
    path = mount.add("disk", DirectDevice(Dispatcher(backend)), SIZE, 512)
    mount.add("other", DirectDevice(Dispatcher(MemoryBackend(2 * SIZE, 512))), 2 * SIZE, 512)

    def calls():
        got = {"listdir": sorted(os.listdir(tmp_path / "mnt"))}
        st = os.stat(path)
        got["stat"] = (stat.S_ISREG(st.st_mode), st.st_size, st.st_blocks)
        got["statvfs"] = os.statvfs(tmp_path / "mnt").f_blocks * 4096
        for name, call in [
            ("missing", lambda: os.stat(tmp_path / "mnt" / "nope")),
            ("trunc", lambda: os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))),
            ("truncate", lambda: os.truncate(path, 4096)),
            ("mkdir", lambda: os.mkdir(tmp_path / "mnt" / "d")),
            ("fallocate", lambda: _fallocate(path, 0x08, 0, 4096)),  # COLLAPSE_RANGE
        ]:
            try:
                call()
                got[name] = 0
            except OSError as exc:
                got[name] = exc.errno
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"x" * 100, 1000)  # partial blocks: read, patch, write
            os.fsync(fd)
            got["read"] = os.pread(fd, 102, 999)
        finally:
            os.close(fd)
        return got

    async with trio.open_nursery() as nursery:
        await nursery.start(mount.run)
        got = await trio.to_thread.run_sync(calls)
        nursery.cancel_scope.cancel()
    assert got == {
        "listdir": ["disk", "other"],
        "stat": (True, SIZE, SIZE // 512),
        "statvfs": 3 * SIZE,
        "missing": errno.ENOENT,
        "trunc": errno.EPERM,
        "truncate": errno.EPERM,
        "mkdir": errno.ENOSYS,
        "fallocate": errno.EOPNOTSUPP,
        "read": b"\0" + b"x" * 100 + b"\0",
    }
    assert await backend.read(1000, 100) == b"x" * 100


def _fallocate(path, mode: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)
