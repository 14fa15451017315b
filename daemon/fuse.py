"""The FUSE export: each target is a regular file in one FUSE mount.

``--export fuse:/run/dmuserd/fuse`` puts the target's file at
``/run/dmuserd/fuse/<name>``. ``losetup --direct-io=on`` turns it into a real
block device. Every target exported over FUSE in a process shares the
process's one mount.

The FUSE session is dmuserd's own (:mod:`dmuserd.daemon._fuse_session`, on
libfuse's low-level API): each request reaches Python as one event tuple,
and :class:`SessionLoop`'s workers read requests while there are any and
serve each in place, waiting on the fd only when none is left. (pyfuse3,
which this export used before, costs ~125k instructions per request in its
own machinery: a trio wait, a lock and a coroutine per request.)

Each file operation becomes block I/O on the target's in-process device:
by default one typed request straight to the dispatcher
(:class:`~dmuserd.daemon.direct.DirectDevice`); with ``emulate=dm-user``
(``--export fuse:DIR,emulate=dm-user[,channels=4]``) dm-user BIOs on the
in-process kernel model (:class:`~dmuserd.daemon.emulated.EmulatedDmUser`),
with dm-user's own semantics (sequence numbers, the daemon timeout):

=================  ===========================================================
read               READ of the covering blocks (unaligned reads are sliced)
write              WRITE (an unaligned write reads, patches and writes back)
fsync              a zero-length WRITE with PREFLUSH (how the kernel flushes)
fallocate          PUNCH_HOLE → DISCARD, ZERO_RANGE → WRITE_ZEROES (the loop
                   driver's discard and write-zeroes)
=================  ===========================================================

Options: ``emulate=dm-user`` and, with it, ``channels=N`` (1 to 64, default
4: the model's background channels). A stop detaches the loop devices on
the mount's files first (their own flush still gets served), then the
dispatcher refuses new requests: they fail with EIO.

A failed BIO is EIO to the caller; the file and the device stay up. Each
request is an input surface (``fuse``, :mod:`dmuserd.daemon.guard`): an
operation that fails with anything but an ``OSError`` (a bug) answers EIO,
is counted and logged; the mount goes on. A request left unanswered (a
cancelled task) is answered EIO, and so is every outstanding one when the
mount stops: no caller hangs.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import TYPE_CHECKING

import structlog
import trio

from dmuserd.backends.options import Options
from dmuserd.daemon.config import ConfigError
from dmuserd.daemon.export import Export, Host
from dmuserd.daemon.guard import Guard
from dmuserd.errors import DmuserdError
from dmuserd.protocol import SECTOR_SIZE, Flag, Request, RequestType, ResponseType, new_message

try:
    from dmuserd.daemon import _fuse_session
except ImportError:  # built without libfuse3-dev: FuseMount.run says what to install
    _fuse_session = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from dmuserd.daemon.direct import InProcessDevice

log = structlog.get_logger("dmuserd.fuse")

#: The input surface of FUSE requests (:mod:`dmuserd.daemon.guard`).
SURFACE = "fuse"

_READ = RequestType.READ
_NO_FLAGS = Flag(0)
_SUCCESS = ResponseType.SUCCESS


class FuseExportError(DmuserdError):
    """The FUSE export could not be set up (mountpoint busy, no /dev/fuse...)."""


class FuseExport(Export):
    """``--export fuse:DIR[,emulate=dm-user[,channels=N]]``: the target as file ``DIR/<name>`` (see the module doc)."""

    kind = "fuse"

    def __init__(self, spec, host: Host, *, emulate: bool, channels: int) -> None:
        super().__init__(spec, host)
        self.emulate = emulate
        self.channels = channels
        self.device: InProcessDevice | None = None  # once started

    @classmethod
    def from_spec(cls, spec, host: Host) -> FuseExport:
        opts = Options(str(spec), spec.options, kind="export", error=ConfigError)
        emulate = opts.choice("emulate", ("dm-user",)) is not None
        if opts.has("channels") and not emulate:
            raise ConfigError(f"export {str(spec)!r}: channels= is for emulate=dm-user (the kernel model's channels)")
        channels = opts.int("channels", 4, min=1, max=64)
        opts.finish("emulate=dm-user, channels=N with it")
        mount = host.shared.get(cls.kind)
        mountpoint = os.path.abspath(spec.where)
        if mount is None:
            host.shared[cls.kind] = FuseMount(mountpoint, host.guard)
        elif mount.mountpoint != mountpoint:
            raise ConfigError(
                f"FUSE exports name several mount points ({mount.mountpoint}, {mountpoint}); one process has "
                "one FUSE mount: use the same directory for every target")
        return cls(spec, host, emulate=emulate, channels=channels)

    async def start(self, target, nursery: trio.Nursery) -> str:
        """Add the target's file to the process's mount (mounting it first, in the daemon's nursery)."""
        from dmuserd.daemon.direct import DirectDevice
        from dmuserd.daemon.emulated import EmulatedDmUser

        mount: FuseMount = self.host.shared[self.kind]
        dispatcher = target.dispatcher
        device = EmulatedDmUser(dispatcher, channels=self.channels) if self.emulate else DirectDevice(dispatcher)
        self.device = device
        await nursery.start(device.run)
        path = mount.add(target.name, device, target.backend.size, target.backend.block_size)
        nursery.start_soon(self._hold, mount, target.name)
        if not mount.started:
            mount.started = True
            if self.host.nursery is None:
                raise ConfigError(f"export {str(self.spec)!r}: the daemon is not running")
            await self.host.nursery.start(mount.run)
        return path

    @staticmethod
    async def _hold(mount: FuseMount, name: str) -> None:
        """The file stays while the target's exports run."""
        try:
            await trio.sleep_forever()
        finally:
            mount.remove(name)

    async def prepare_stop(self) -> None:
        """Detach loop devices on the file while its I/O, their own flush included, is still served."""
        if self.endpoint is not None and self.host.shared[self.kind].mounted:
            from dmuserd.daemon.loopdev import detach_loops_under

            await detach_loops_under(self.endpoint)

    def stop_admitting(self) -> None:
        if self.device is not None:
            self.device.stop_admitting()

    def status(self) -> dict:
        return {"mode": "emulate=dm-user" if self.emulate else "direct"}


class _File:
    def __init__(self, inode: int, name: str, device: InProcessDevice, size: int, block_size: int) -> None:
        self.inode = inode
        self.name = name
        self.device = device
        #: the device's entry point, held here for the READ path (an attribute lookup less per read)
        self.handle = device.handle
        self.next_seq = device.next_seq
        self.size = size
        self.block_size = block_size
        self.rmw_lock = trio.Lock()  # serialises read-modify-write of partial blocks


class FuseMount:
    """The process's one FUSE mount, holding a file per target (``host.shared["fuse"]``)."""

    def __init__(self, mountpoint: str, guard: Guard | None = None) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self.guard = guard if guard is not None else Guard()
        self._files: dict[int, _File] = {}
        self._by_name: dict[bytes, _File] = {}
        self._next_inode = 2
        self.started = False
        self.mounted = False
        self.fallocate_supported = False
        self._nursery: trio.Nursery | None = None

    def add(self, name: str, device: InProcessDevice, size: int, block_size: int) -> str:
        """Expose ``device`` (an :class:`~dmuserd.daemon.direct.InProcessDevice`) as file ``name``; its path."""
        if name.encode() in self._by_name:
            raise ConfigError(f"the FUSE mount {self.mountpoint} has a file {name!r} already")
        if size % block_size:  # a read is served from the whole blocks covering it, all within the file
            raise ConfigError(f"{name}: size {size} is not a multiple of the block size {block_size}")
        inode, self._next_inode = self._next_inode, self._next_inode + 1
        entry = _File(inode, name, device, size, block_size)
        self._files[inode] = entry
        self._by_name[name.encode()] = entry
        return os.path.join(self.mountpoint, name)

    def remove(self, name: str) -> None:
        """The file ``name`` goes (its target was removed); its inode is not reused."""
        entry = self._by_name.pop(name.encode(), None)
        if entry is not None:
            del self._files[entry.inode]

    def _check_mountpoint(self) -> None:
        if not os.path.exists("/dev/fuse"):
            raise FuseExportError("/dev/fuse is missing: load the fuse module (modprobe fuse) or install fuse3")
        os.makedirs(self.mountpoint, exist_ok=True)
        if os.path.ismount(self.mountpoint):
            raise FuseExportError(
                f"{self.mountpoint} is already a mount point (busy): unmount it (umount {self.mountpoint}) or pick another"
            )
        if os.listdir(self.mountpoint):
            raise FuseExportError(f"{self.mountpoint} is not empty: use an empty directory as the FUSE mount point")

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Mount, serve until cancelled, unmount (also after an error)."""
        self._check_mountpoint()
        if _fuse_session is None:
            raise FuseExportError(
                "the FUSE export needs dmuserd's libfuse extension (daemon/_fuse_session.c), which was not built: "
                "install libfuse3-dev (and a C compiler), then reinstall dmuserd")
        options = "fsname=dmuserd,subtype=dmuserd" + (",allow_other" if os.geteuid() == 0 else "")
        try:
            session = _fuse_session.Session(self.mountpoint, options)
        except OSError as exc:
            raise FuseExportError(f"mounting FUSE at {self.mountpoint} failed: {exc}") from None
        self.mounted = True
        log.info("fuse mounted", mountpoint=self.mountpoint, files=[f.name for f in self._files.values()])
        try:
            async with trio.open_nursery() as nursery:
                loop = SessionLoop(session, Operations(self), nursery)
                loop.add_worker()
                task_status.started()
        finally:
            if session.fd >= 0:
                trio.lowlevel.notify_closing(session.fd)
            session.close()  # outstanding requests answer EIO, then the lazy unmount
            self.mounted = False
            log.info("fuse unmounted", mountpoint=self.mountpoint)


#: fallocate(2) modes (linux/falloc.h) the export takes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
ROOT_INODE = 1
#: how long the kernel may cache names and attributes (they change only when a target comes or goes)
CACHE_SECONDS = 300.0


class Operations:
    """What each FUSE operation does on the mount's files: arguments in, the answer's value out.

    An ``OSError`` is answered with its errno (:meth:`SessionLoop.serve`).
    Attributes are ``(ino, mode, nlink, size, uid, gid, blksize, blocks,
    time_ns)``, as ``Request.attr`` and ``Request.entry`` take them.
    """

    def __init__(self, mount: FuseMount) -> None:
        self.mount = mount
        self.guard = mount.guard
        self.files = mount._files  # the READ path's lookup: one attribute load
        self.mounted_at = time.time_ns()

    def _entry(self, inode: int) -> _File:
        try:
            return self.files[inode]
        except KeyError:
            raise OSError(errno.ENOENT, f"no file with inode {inode}") from None

    def getattr(self, inode: int) -> tuple:
        uid, gid = os.getuid(), os.getgid()
        if inode == ROOT_INODE:
            return (inode, stat.S_IFDIR | 0o755, 2, 0, uid, gid, 4096, 0, self.mounted_at)
        entry = self._entry(inode)
        return (inode, stat.S_IFREG | 0o600, 1, entry.size, uid, gid, max(4096, entry.block_size),
                entry.size // 512, self.mounted_at)

    def setattr(self, inode: int, to_set: int, size: int) -> tuple:
        if inode != ROOT_INODE and to_set & _fuse_session.SET_ATTR_SIZE and size != self._entry(inode).size:
            raise OSError(errno.EPERM, "a device's size is fixed")
        return self.getattr(inode)

    def lookup(self, parent: int, name: bytes) -> tuple:
        entry = self.mount._by_name.get(name)
        if parent != ROOT_INODE or entry is None:
            raise OSError(errno.ENOENT, "no such file")
        return self.getattr(entry.inode)

    def open(self, inode: int, flags: int) -> int:
        """The file handle: the inode (no per-open state)."""
        self._entry(inode)
        if flags & os.O_TRUNC:
            # A device's size is fixed (truncate is EPERM too). Accepting it would let the
            # kernel's atomic O_TRUNC set its cached size to 0. (dd: use conv=notrunc.)
            raise OSError(errno.EPERM, "a device's size is fixed")
        return inode

    def opendir(self, inode: int) -> int:
        if inode != ROOT_INODE:
            raise OSError(errno.ENOTDIR, "not a directory")
        return inode

    def readdir(self, inode: int, offset: int) -> list[tuple[bytes, int, int, int]]:
        """The files after ``offset`` as ``(name, inode, mode, next offset)``: the offset is the inode."""
        return [(entry.name.encode(), entry.inode, stat.S_IFREG, entry.inode)
                for entry in sorted(self.files.values(), key=lambda e: e.inode) if entry.inode > offset]

    def statfs(self) -> tuple[int, int, int, int]:
        """``(block size, blocks, files, longest name)``: full, nothing free."""
        total = sum(e.size for e in self.files.values())
        return (4096, total // 4096, len(self.files) + 1, 255)

    async def read(self, fh: int, off: int, size: int):
        """Whole blocks within the file (a loop device's I/O: nearly every read) go to the device as they are.

        The answer is the backend's views (a list of buffers), sent before
        anything else runs, so a 4 KiB read is never copied here. Any other
        read is answered from the whole blocks covering it
        (:meth:`_read_covering`, through this same path), cut to what was
        asked; short at the end of the file.
        """
        entry = self.files.get(fh)
        if entry is None:
            raise OSError(errno.ENOENT, f"no file with inode {fh}")
        if (off | size) % entry.block_size or not size or off + size > entry.size:
            return await self._read_covering(fh, entry, off, size)
        response = await entry.handle(
            new_message(Request, entry.next_seq(), _READ, _NO_FLAGS, off // SECTOR_SIZE, size, None), True)
        _, answer, views = response
        if answer is not _SUCCESS:
            raise entry.device.failed(response, _READ, off, size)
        return views

    async def _read_covering(self, fh: int, entry: _File, off: int, size: int) -> bytes:
        """A read that is not whole blocks within the file: the whole blocks covering it, cut to it."""
        end = min(off + size, entry.size)
        if off >= end:
            return b""
        head = off % entry.block_size
        first = off - head
        data = b"".join(await self.read(fh, first, end - first + -end % entry.block_size))
        return data[head : end - first]

    async def write(self, fh: int, off: int, data: bytes) -> int:
        return await write_range(self._entry(fh), off, data)

    async def fsync(self, fh: int) -> None:
        # What the 6.1 kernel sends for a flush: WRITE, len 0, PREFLUSH.
        await self._entry(fh).device.submit(RequestType.WRITE, 0, 0, data=b"", flags=Flag.PREFLUSH)

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """PUNCH_HOLE → DISCARD, ZERO_RANGE → WRITE_ZEROES; preallocation within the size is a no-op."""
        entry = self._entry(fh)
        if not mode & FALLOC_FL_KEEP_SIZE and offset + length > entry.size:
            raise OSError(errno.EFBIG, "a block device's file cannot grow")
        if mode & FALLOC_FL_PUNCH_HOLE:
            await self._deallocate(entry, RequestType.DISCARD, offset, length, _NO_FLAGS)
        elif mode & FALLOC_FL_ZERO_RANGE:
            await self._deallocate(entry, RequestType.WRITE_ZEROES, offset, length, Flag.NOUNMAP)
        elif mode & ~FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")

    async def _deallocate(self, entry: _File, kind, offset: int, length: int, flags: Flag) -> None:
        end = min(offset + length, entry.size)
        bs = entry.block_size
        first = -(-offset // bs) * bs
        last = end // bs * bs
        # Partial blocks at either edge are zeroed by writing (both ops read back
        # as zeros at least for the bytes asked; the middle goes to the backend).
        for start, stop in ((offset, min(first, end)), (max(last, offset), end)):
            if stop > start and not (start >= first and stop <= last):
                await write_range(entry, start, bytes(stop - start))
        if last > first:
            await entry.device.submit(kind, first, last - first, flags=flags)

    def errno_of(self, exc: Exception, op: str) -> int:
        """The errno a request that raised ``exc`` answers: an ``OSError``'s own, anything else a counted EIO (a bug)."""
        if isinstance(exc, OSError):
            return exc.errno or errno.EIO
        self.guard.failed(SURFACE, exc, op=op)
        return errno.EIO


#: the operations that reach Python (``_fuse_session`` answers RELEASE, FLUSH, FORGET... itself)
_OPS = ("LOOKUP", "GETATTR", "SETATTR", "OPEN", "READ", "WRITE", "FSYNC", "OPENDIR", "READDIR", "STATFS", "FALLOCATE")
#: the most worker tasks one mount runs (each serves one request at a time)
MAX_WORKERS = 160
#: a worker that never waits lets the rest of the daemon run after this many requests
RUN_OF_REQUESTS = 64


class SessionLoop:
    """Worker tasks reading requests from the session and serving them (see the module doc).

    A worker takes requests while there are any (the fd is non-blocking) and
    serves each in place; with a backend that answers at once one worker
    serves everything, with no task switch per request. One worker at a time
    waits for the fd to become readable; others with nothing to do park.
    When the last free worker starts on a request, a parked one is woken (or
    a new one started, up to :data:`MAX_WORKERS`), so a request that waits
    in its backend never holds the others back.
    """

    def __init__(self, session, ops: Operations, nursery: trio.Nursery) -> None:
        self.session = session
        self.ops = ops
        self.nursery = nursery
        self.workers = 0
        self.free = 0  # workers reading or about to read: neither serving nor parked
        self.watching = False
        self.lot = trio.lowlevel.ParkingLot()
        self._op_names = {getattr(_fuse_session, name): name.lower() for name in _OPS}

    def add_worker(self) -> None:
        self.workers += 1
        self.free += 1
        self.nursery.start_soon(self.worker)

    async def worker(self) -> None:
        next_event = self.session.next
        serve = self.serve
        run = 0
        while True:
            try:
                event = next_event()
            except EOFError:
                log.warning("fuse file system was unmounted from outside", mountpoint=self.ops.mount.mountpoint)
                raise FuseExportError(
                    f"{self.ops.mount.mountpoint} was unmounted from outside; the daemon stops") from None
            if event is None:
                run = 0
                await self._wait()
                continue
            self.free -= 1
            if not self.free:
                self._another_reader()
            await serve(event)
            self.free += 1
            run += 1
            if run == RUN_OF_REQUESTS:
                run = 0
                await trio.lowlevel.checkpoint()

    def _another_reader(self) -> None:
        if self.lot:
            self.lot.unpark()
            self.free += 1
        elif self.workers < MAX_WORKERS:
            self.add_worker()

    async def _wait(self) -> None:
        """Until the fd is readable (one worker), or until woken to read (the others)."""
        if self.watching:
            self.free -= 1
            await self.lot.park()  # the waker counted this worker free again
            return
        self.watching = True
        try:
            await trio.lowlevel.wait_readable(self.session.fd)
        finally:
            self.watching = False

    async def serve(self, event: tuple) -> None:
        """Answer one request (``(op, request, args...)`` from ``Session.next``); never raises an ``Exception``."""
        fs = _fuse_session
        ops = self.ops
        op, req = event[0], event[1]
        try:
            if op == fs.READ:
                req.data(await ops.read(event[2], event[3], event[4]))
            elif op == fs.WRITE:
                req.written(await ops.write(event[2], event[3], event[4]))
            elif op == fs.FSYNC:
                await ops.fsync(event[2])
                req.error(0)
            elif op == fs.FALLOCATE:
                await ops.fallocate(event[2], event[3], event[4], event[5])
                req.error(0)
            elif op == fs.LOOKUP:
                req.entry(ops.lookup(event[2], event[3]), CACHE_SECONDS)
            elif op == fs.GETATTR:
                req.attr(ops.getattr(event[2]), CACHE_SECONDS)
            elif op == fs.SETATTR:
                req.attr(ops.setattr(event[2], event[3], event[4]), CACHE_SECONDS)
            elif op == fs.OPEN:
                # No page cache in the FUSE layer: the device (or loop) above caches,
                # and every read must see what other exports wrote.
                req.open(ops.open(event[2], event[3]), True)
            elif op == fs.OPENDIR:
                req.open(ops.opendir(event[2]), False)
            elif op == fs.READDIR:
                req.dirents(event[3], ops.readdir(event[2], event[4]))
            elif op == fs.STATFS:
                req.statfs(*ops.statfs())
            else:
                req.error(errno.ENOSYS)
        except Exception as exc:  # noqa: BLE001 - one request fails, never the mount
            req.error(ops.errno_of(exc, self._op_names.get(op, str(op))))


async def write_range(entry: _File, offset: int, data, flags: Flag = _NO_FLAGS) -> int:
    """Write ``data`` at any offset, read-modify-writing partial blocks."""
    length = len(data)
    if offset + length > entry.size:
        raise OSError(errno.ENOSPC, "write beyond the end of the device")
    bs = entry.block_size
    if offset % bs == 0 and length % bs == 0:
        await entry.device.submit(RequestType.WRITE, offset, length, data=bytes(data), flags=flags)
        return length
    start = offset // bs * bs
    stop = -(-(offset + length) // bs) * bs
    async with entry.rmw_lock:
        block = bytearray(await entry.device.submit(_READ, start, stop - start))
        block[offset - start : offset - start + length] = data
        await entry.device.submit(RequestType.WRITE, start, stop - start, data=bytes(block), flags=flags)
    return length
