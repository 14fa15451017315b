"""The FUSE fallocate shim (dmuserd.daemon.fuse_fallocate), on a real FUSE mount.

Each scenario runs a tiny pyfuse3 file system in a subprocess (pyfuse3 allows
one mount per process, and the shim must be loaded before pyfuse3). The file
system exposes one 16 MiB file, ``disk``; its fallocate handler records every
call in a JSON-lines log and answers from a separate trio task. The answer
depends on the length asked for, so one mount covers several cases:

* ``EOPNOTSUPP_LEN``: answered EOPNOTSUPP;
* ``RAISE_LEN``: the handler raises (the shim answers EIO);
* ``HANG_LEN``: never answered; the server terminates its FUSE loop, and the
  session's destruction must answer it;
* anything else: the range is zeroed and answered 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.root

MiB = 1 << 20
SIZE = 16 * MiB
EOPNOTSUPP_LEN = 4096 + 1
RAISE_LEN = 4096 + 3
HANG_LEN = 4096 + 5

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

SERVER = r'''
import errno, json, os, stat, sys
import trio

from dmuserd.daemon import fuse_fallocate as fa

assert fa.install(strict=True), fa.unavailable_reason()
import pyfuse3

mountpoint, log_path, handler_kind = sys.argv[1:4]
SIZE, EOPNOTSUPP_LEN, RAISE_LEN, HANG_LEN = (int(a) for a in sys.argv[4:8])
INO, NAME = 2, b"disk"
data = bytearray(SIZE)
log_file = open(log_path, "a", buffering=1)


def record(**event):
    log_file.write(json.dumps(event) + "\n")


class Ops(pyfuse3.Operations):
    def _attr(self, inode):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = attr.attr_timeout = 0
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFDIR | 0o755, 2, 0
        elif inode == INO:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFREG | 0o644, 1, SIZE
            attr.st_blocks = SIZE // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_blksize = 4096
        return attr

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return self._attr(inode)

    async def lookup(self, parent, name, ctx=None):
        if parent != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(INO)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id < INO:
            pyfuse3.readdir_reply(token, NAME, self._attr(INO), INO)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        return bytes(data[off:off + size])

    async def write(self, fh, off, buf):
        if off + len(buf) > SIZE:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        data[off:off + len(buf)] = buf
        return len(buf)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        pass

    async def release(self, fh):
        pass

    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = SIZE // 4096
        st.f_namemax = 255
        return st


async def main():
    options = set(pyfuse3.default_options) | {"fsname=fallocate-test"}
    pyfuse3.init(Ops(), mountpoint, options)
    pending_at_close = None
    try:
        async with trio.open_nursery() as nursery:
            async def answer(req, ino, mode, offset, length):
                await trio.sleep(0.001)  # answer later, from another task
                err = errno.EOPNOTSUPP if length == EOPNOTSUPP_LEN else 0
                if err == 0:
                    data[offset:offset + length] = bytes(len(data[offset:offset + length]))
                record(event="call", ino=ino, mode=mode, offset=offset, length=length, err=err,
                       pending=fa.pending())
                first = fa.reply(req, err)
                record(event="replied", first=first, second=fa.reply(req, 0))

            def on_fallocate(req, ino, mode, offset, length):
                if length == RAISE_LEN:
                    record(event="raise", mode=mode, offset=offset, length=length)
                    raise RuntimeError("handler failure the test asked for")
                if length == HANG_LEN:
                    record(event="hang", mode=mode, offset=offset, length=length, req=req)
                    nursery.cancel_scope.cancel()  # stop serving with this one unanswered
                    return
                nursery.start_soon(answer, req, ino, mode, offset, length)

            if handler_kind == "record":
                fa.set_handler(on_fallocate)
            nursery.start_soon(pyfuse3.main)
            print("READY", fa.sessions(), flush=True)
    finally:
        pending_at_close = fa.pending()
        pyfuse3.close(unmount=True)
        hang = [json.loads(l) for l in open(log_path) if '"hang"' in l]
        late = fa.reply(hang[-1]["req"], 0) if hang else None
        record(event="closed", pending_at_close=pending_at_close, pending_after=fa.pending(), late_reply=late)


trio.run(main)
'''


def _requirements():
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3"
    try:
        import dmuserd.daemon._fuse_fallocate  # noqa: F401
    except ImportError as exc:
        return f"extension not built: {exc}"
    return None


_missing = _requirements()
needs_fuse = pytest.mark.skipif(_missing is not None, reason=_missing or "")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2); 0 or the errno."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno()


def _run(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=60)


class Server:
    """A pyfuse3 file system with the shim, in a subprocess."""

    def __init__(self, tmp, handler: str = "record"):
        self.mnt = tmp / "mnt"
        self.mnt.mkdir()
        self.log = tmp / "calls.jsonl"
        self.log.touch()
        self.script = tmp / "server.py"
        self.script.write_text(SERVER)
        self.path = str(self.mnt / "disk")
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script), str(self.mnt), str(self.log), handler,
             str(SIZE), str(EOPNOTSUPP_LEN), str(RAISE_LEN), str(HANG_LEN)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.loops: list[str] = []
        self._seen = 0
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("READY"):
            self.close()
            raise AssertionError(f"server did not start: {line!r} {self.stderr()}")
        self.sessions = int(line.split()[1])

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read()

    def events(self) -> list[dict]:
        """Events logged since the previous call."""
        lines = self.log.read_text().splitlines()
        new, self._seen = lines[self._seen:], len(lines)
        return [json.loads(line) for line in new]

    def wait_for(self, kind: str, timeout: float = 10) -> list[dict]:
        """Events since the previous call, once one of ``kind`` is among them
        (the server logs "replied" after the caller may have woken up)."""
        events = self.events()
        deadline = time.monotonic() + timeout
        while not any(e["event"] == kind for e in events) and time.monotonic() < deadline:
            time.sleep(0.01)
            events += self.events()
        return events

    def calls(self) -> list[tuple[int, int, int]]:
        return [(e["mode"], e["offset"], e["length"]) for e in self.events() if e["event"] == "call"]

    def losetup(self) -> str:
        dev = _run("losetup", "--find", "--show", self.path).stdout.strip()
        self.loops.append(dev)
        return dev

    def wait(self, timeout=30) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        for dev in self.loops:
            _run("losetup", "-d", dev, check=False)
        self.loops.clear()
        if os.path.ismount(self.mnt):
            if _run("fusermount3", "-u", str(self.mnt), check=False).returncode != 0:
                _run("umount", "-l", str(self.mnt), check=False)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)
        if os.path.ismount(self.mnt):
            _run("umount", "-l", str(self.mnt), check=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("fuse-fallocate"))
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def fd(server):
    server.events()  # forget earlier tests' events
    fd = os.open(server.path, os.O_RDWR)
    try:
        yield fd
    finally:
        os.close(fd)


@needs_fuse
def test_pyfuse3_session_bound_to_the_shim(server):
    assert server.sessions == 1


@needs_fuse
@pytest.mark.parametrize(
    "mode, offset, length",
    [
        (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192),
        (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 3 * MiB + 512, 12345),
        (FALLOC_FL_ZERO_RANGE, 0, 4096),
        (0, 0, SIZE),
    ],
)
def test_fallocate_reaches_the_handler(server, fd, mode, offset, length):
    assert fallocate(fd, mode, offset, length) == 0
    events = server.wait_for("replied")
    call = [e for e in events if e["event"] == "call"]
    assert [(e["mode"], e["offset"], e["length"]) for e in call] == [(mode, offset, length)]
    assert call[0]["ino"] == 2 and call[0]["pending"] == 1
    # reply() said True once; a second reply for the same request is refused.
    assert [(e["first"], e["second"]) for e in events if e["event"] == "replied"] == [(True, False)]


@needs_fuse
def test_punch_hole_zeroes_data(server, fd):
    os.pwrite(fd, b"\xaa" * 3 * 4096, 8 * MiB)
    os.fsync(fd)
    assert fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8 * MiB + 4096, 4096) == 0
    # The kernel drops the FUSE page cache for the range after a successful fallocate.
    assert os.pread(fd, 3 * 4096, 8 * MiB) == b"\xaa" * 4096 + bytes(4096) + b"\xaa" * 4096


@needs_fuse
def test_handler_errno_reaches_the_caller(server, fd):
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    assert fallocate(fd, mode, 0, EOPNOTSUPP_LEN) == errno.EOPNOTSUPP
    assert server.calls() == [(mode, 0, EOPNOTSUPP_LEN)]
    # EOPNOTSUPP is per request: the kernel still asks next time.
    assert fallocate(fd, mode, 0, 4096) == 0
    assert server.calls() == [(mode, 0, 4096)]


@needs_fuse
def test_handler_that_raises_gives_eio(server, fd):
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    assert fallocate(fd, mode, 4096, RAISE_LEN) == errno.EIO
    assert [e["event"] for e in server.events() if e["event"] != "replied"] == ["raise"]
    assert fallocate(fd, mode, 0, 4096) == 0  # and the file system carries on
    assert server.proc.poll() is None


@needs_fuse
def test_loop_device_discard_and_zeroout(server):
    """What the loop driver sends for blkdiscard and blkdiscard -z.

    Seen on Linux 6.18 (loop.c do_req_filebacked -> lo_fallocate): discard is
    fallocate(PUNCH_HOLE|KEEP_SIZE); BLKZEROOUT (blkdiscard -z) is
    REQ_OP_WRITE_ZEROES with REQ_NOUNMAP, i.e. fallocate(ZERO_RANGE|KEEP_SIZE);
    one call per command for 1 MiB.
    """
    if shutil.which("losetup") is None or shutil.which("blkdiscard") is None:
        pytest.skip("needs losetup and blkdiscard")
    server.events()
    dev = server.losetup()
    try:
        with open(dev, "r+b", buffering=0) as blk:
            blk.seek(2 * MiB)
            blk.write(b"\x55" * MiB)
            os.fsync(blk.fileno())
        server.events()

        _run("blkdiscard", "-o", "0", "-l", "1MiB", dev)
        discard = server.calls()
        print("blkdiscard ->", discard)
        _assert_covers(discard, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, MiB)

        _run("blkdiscard", "-z", "-o", str(2 * MiB), "-l", "1MiB", dev)
        zeroout = server.calls()
        print("blkdiscard -z ->", zeroout)
        _assert_covers(zeroout, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 2 * MiB, MiB)

        with open(dev, "rb", buffering=0) as blk:
            blk.seek(2 * MiB)
            assert blk.read(MiB) == bytes(MiB)
    finally:
        _run("losetup", "-d", dev, check=False)
        server.loops.remove(dev)


def _assert_covers(calls, mode, offset, length):
    """The calls all have ``mode`` and, in order, cover exactly [offset, offset+length)."""
    assert calls, "the handler saw nothing"
    assert {c[0] for c in calls} == {mode}, calls
    pos = offset
    for _, off, n in calls:
        assert off == pos, calls
        pos += n
    assert pos == offset + length, calls


@needs_fuse
def test_no_handler_gives_eopnotsupp(tmp_path):
    srv = Server(tmp_path, handler="none")
    try:
        assert srv.sessions == 1
        fd = os.open(srv.path, os.O_RDWR)
        try:
            for _ in range(2):  # EOPNOTSUPP, not ENOSYS: the kernel keeps asking
                assert fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096) == errno.EOPNOTSUPP
            assert os.pread(fd, 4, 0) == bytes(4)
        finally:
            os.close(fd)
        assert srv.events() == []
    finally:
        srv.close()
    assert srv.proc.returncode == 0, srv.stderr()


@needs_fuse
def test_unanswered_request_at_session_end(tmp_path):
    """A request still outstanding when pyfuse3 closes the session is answered
    by the shim's fuse_session_destroy; replying later is refused, not a crash."""
    srv = Server(tmp_path)
    result = {}
    try:
        fd = os.open(srv.path, os.O_RDWR)
        try:
            caller = threading.Thread(
                target=lambda: result.setdefault("err", fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                                                  0, HANG_LEN)))
            caller.start()
            assert srv.wait(30) == 0, srv.stderr()
            caller.join(30)
            assert not caller.is_alive()
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)  # ENOTCONN: the connection is gone (FLUSH fails)
    finally:
        srv.close()
    events = srv.events()
    assert [e["event"] for e in events] == ["hang", "closed"]
    closed = events[-1]
    assert closed["pending_at_close"] == 1
    assert closed["pending_after"] == 0
    assert closed["late_reply"] is False
    # The server's unmount closed /dev/fuse first, so the kernel aborted the
    # call (ECONNABORTED on 6.18); the shim's EIO went nowhere, quietly.
    assert result["err"] in (errno.ECONNABORTED, errno.ENOTCONN, errno.EIO)
    assert "fuse:" not in srv.stderr()


def test_install_after_pyfuse3_import_is_refused():
    """pyfuse3 imported first cannot be fixed: install() says so."""
    code = (
        "import pyfuse3\n"
        "from dmuserd.daemon import fuse_fallocate as fa\n"
        "print(fa.install(), fa.install())\n"
        "print(fa.unavailable_reason())\n"
        "try:\n"
        "    fa.install(strict=True)\n"
        "except fa.PyFuse3AlreadyImported:\n"
        "    print('raised')\n"
        "try:\n"
        "    fa.set_handler(print)\n"
        "except fa.FallocateShimError:\n"
        "    print('no handler')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    lines = [line for line in out.splitlines() if "[warning" not in line]  # structlog's default output
    assert lines[0] == "False False"
    assert "imported before" in lines[1]
    assert lines[2:] == ["raised", "no handler"]


@needs_fuse
def test_install_is_idempotent_and_survives_pyfuse3_import():
    code = (
        "from dmuserd.daemon import fuse_fallocate as fa\n"
        "a = fa.install()\n"
        "import pyfuse3\n"
        "print(a, fa.install(), fa.sessions(), fa.pending())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["True", "True", "0", "0"]


def test_without_the_extension_install_returns_false():
    """A build without the extension (no libfuse3-dev): install() is False and
    pyfuse3 still imports (the FUSE export runs without fallocate)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'dmuserd.daemon._fuse_fallocate':\n"
        "            raise ImportError('not built (simulated by the test)')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from dmuserd.daemon import fuse_fallocate as fa\n"
        "print(fa.install(), fa.install())\n"
        "import pyfuse3\n"
        "print(fa.unavailable_reason())\n"
        "try:\n"
        "    fa.install(strict=True)\n"
        "except fa.PyFuse3AlreadyImported:\n"
        "    print('wrong error')\n"
        "except fa.FallocateShimError:\n"
        "    print('raised')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    lines = [line for line in out.splitlines() if "[warning" not in line]
    assert lines[0] == "False False"
    assert "not built (simulated by the test)" in lines[1]
    assert lines[2:] == ["raised"]
