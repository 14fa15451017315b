"""The FUSE export: each target is a regular file in one FUSE mount.

``--export fuse:/run/dmuserd/fuse`` puts the target's file at
``/run/dmuserd/fuse/<name>``. ``losetup --direct-io=on`` turns it into a real
block device. pyfuse3 allows one mount per process, so every target exported
over FUSE in a process shares the mount.

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
fallocate          PUNCH_HOLE → DISCARD, ZERO_RANGE → WRITE_ZEROES
                   (where the fallocate shim could be installed, see
                   :mod:`dmuserd.daemon.fuse_fallocate`)
=================  ===========================================================

Options: ``emulate=dm-user`` and, with it, ``channels=N`` (1 to 64, default
4: the model's background channels). A stop detaches the loop devices on
the mount's files first (their own flush still gets served), then the
dispatcher refuses new requests: they fail with EIO.

A failed BIO is EIO to the caller; the file and the device stay up. Each
request is an input surface (``fuse``, :mod:`dmuserd.daemon.guard`): an
operation that fails with anything but an ``OSError`` (a bug) answers EIO,
is counted and logged, and pyfuse3 never sees the exception (it would end
the whole mount).
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import time
from typing import TYPE_CHECKING, Any

import structlog
import trio

from dmuserd.backends.options import Options
from dmuserd.daemon.config import ConfigError
from dmuserd.daemon.export import Export, Host
from dmuserd.daemon.guard import Guard
from dmuserd.errors import DmuserdError
from dmuserd.protocol import SECTOR_SIZE, Flag, Request, RequestType, ResponseType, new_message

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


def _load_pyfuse3():
    """Import pyfuse3, with our fallocate shim in front of it when available."""
    try:
        from dmuserd.daemon import fuse_fallocate
    except ImportError:
        fuse_fallocate = None
    has_fallocate = bool(fuse_fallocate and fuse_fallocate.install())
    import pyfuse3

    return pyfuse3, (fuse_fallocate if has_fallocate else None)


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
        pyfuse3, fallocate = _load_pyfuse3()
        self.fallocate_supported = fallocate is not None
        ops = _Operations(self, pyfuse3)
        options = set(pyfuse3.default_options)
        options.discard("default_permissions")
        options |= {"fsname=dmuserd", "subtype=dmuserd"}
        if os.geteuid() == 0:
            options.add("allow_other")
        try:
            pyfuse3.init(ops, self.mountpoint, options)
        except RuntimeError as exc:
            raise FuseExportError(f"mounting FUSE at {self.mountpoint} failed: {exc}") from None
        self.mounted = True
        log.info("fuse mounted", mountpoint=self.mountpoint, files=[f.name for f in self._files.values()],
                 fallocate=self.fallocate_supported)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if fallocate:
                    fallocate.set_handler(self._on_fallocate)
                nursery.start_soon(self._main, pyfuse3)
                task_status.started()
        finally:
            if fallocate:
                fallocate.set_handler(None)
            self._nursery = None
            with trio.CancelScope(shield=True):
                pyfuse3.close(unmount=True)
            self.mounted = False
            log.info("fuse unmounted", mountpoint=self.mountpoint)

    async def _main(self, pyfuse3) -> None:
        await pyfuse3.main(min_tasks=4, max_tasks=160)
        # main() returns when the file system was unmounted from outside.
        log.warning("fuse file system was unmounted from outside", mountpoint=self.mountpoint)
        raise FuseExportError(f"{self.mountpoint} was unmounted from outside; the daemon stops")

    # -- fallocate (called by the shim inside pyfuse3's request processing) ---

    def _on_fallocate(self, req: int, inode: int, mode: int, offset: int, length: int) -> None:
        from dmuserd.daemon import fuse_fallocate as fa

        self._nursery.start_soon(self._fallocate, fa, req, inode, mode, offset, length)

    async def _fallocate(self, fa, req, inode, mode, offset, length) -> None:
        err = errno.EIO
        with self.guard.isolate(SURFACE, op="fallocate", mode=mode, offset=offset, length=length):
            err = await self._fallocate_errno(fa, inode, mode, offset, length)
        fa.reply(req, err)

    async def _fallocate_errno(self, fa, inode, mode, offset, length) -> int:
        """The errno a fallocate gets (0 for success)."""
        err = 0
        try:
            entry = self._files.get(inode)
            if entry is None:
                err = errno.ENOENT
            elif not mode & fa.FALLOC_FL_KEEP_SIZE and offset + length > entry.size:
                err = errno.EFBIG  # a block device's file cannot grow
            elif mode & fa.FALLOC_FL_PUNCH_HOLE:
                await self._deallocate(entry, RequestType.DISCARD, offset, length, _NO_FLAGS)
            elif mode & fa.FALLOC_FL_ZERO_RANGE:
                await self._deallocate(entry, RequestType.WRITE_ZEROES, offset, length, Flag.NOUNMAP)
            elif mode & ~fa.FALLOC_FL_KEEP_SIZE:
                err = errno.EOPNOTSUPP
            # mode 0 / KEEP_SIZE alone: preallocation within the size is a no-op.
        except OSError as exc:
            err = exc.errno or errno.EIO
        return err

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


def _fuse_error(ops: _OpsMixin, exc: Exception, op: str) -> Exception:
    """What a FUSE request that raised ``exc`` answers: an ``OSError`` is its errno, anything else a counted EIO.

    (A ``FUSEError`` stays as it is; pyfuse3 must never see anything else: it
    would end the whole mount. See the module doc.)
    """
    fuse_error = ops.pyfuse3.FUSEError
    if isinstance(exc, fuse_error):
        return exc
    if isinstance(exc, OSError):
        return fuse_error(exc.errno or errno.EIO)
    ops.export.guard.failed(SURFACE, exc, op=op)
    return fuse_error(errno.EIO)


def _request(method):
    """One FUSE request, its exception answered by :func:`_fuse_error`."""

    @functools.wraps(method)
    async def request(self, *args):
        try:
            return await method(self, *args)
        except Exception as exc:  # noqa: BLE001 - pyfuse3 would end the mount
            raise _fuse_error(self, exc, method.__name__) from None

    return request


class _Operations:
    """pyfuse3 operations (a subclass is built at run time: pyfuse3 is imported late)."""

    def __new__(cls, export: FuseMount, pyfuse3):
        ops_cls = type("DmuserdFuseOperations", (_OpsMixin, pyfuse3.Operations), {})
        ops = ops_cls()
        ops.export = export
        ops.files = export._files  # the READ path's lookup: one attribute load
        ops.pyfuse3 = pyfuse3
        ops.mounted_at = time.time_ns()
        ops.sync_handles = set()
        return ops


class _OpsMixin:
    # Set by _Operations.__new__:
    export: FuseMount
    files: dict[int, _File]
    pyfuse3: Any
    mounted_at: int
    sync_handles: set

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def _attrs(self, inode: int):
        pyfuse3 = self.pyfuse3
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = 300
        attr.attr_timeout = 300
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.mounted_at
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
            attr.st_size = 0
            attr.st_blksize = 4096
        else:
            entry = self._entry(inode)
            attr.st_mode = stat.S_IFREG | 0o600
            attr.st_nlink = 1
            attr.st_size = entry.size
            attr.st_blksize = max(4096, entry.block_size)
            attr.st_blocks = entry.size // 512
        return attr

    def _entry(self, inode: int) -> _File:
        try:
            return self.export._files[inode]
        except KeyError:
            raise self.pyfuse3.FUSEError(errno.ENOENT) from None

    @_request
    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    @_request
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode != self.pyfuse3.ROOT_INODE and fields.update_size and attr.st_size != self._entry(inode).size:
            raise self.pyfuse3.FUSEError(errno.EPERM)  # a device's size is fixed
        return self._attrs(inode)

    @_request
    async def lookup(self, parent_inode, name, ctx=None):
        entry = self.export._by_name.get(bytes(name))
        if parent_inode != self.pyfuse3.ROOT_INODE or entry is None:
            raise self.pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(entry.inode)

    @_request
    async def opendir(self, inode, ctx):
        if inode != self.pyfuse3.ROOT_INODE:
            raise self.pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_request
    async def readdir(self, fh, start_id, token):
        entries = sorted(self.export._files.values(), key=lambda e: e.inode)
        for entry in entries:
            if entry.inode <= start_id:
                continue
            if not self.pyfuse3.readdir_reply(token, entry.name.encode(), self._attrs(entry.inode), entry.inode):
                break

    @_request
    async def releasedir(self, fh):
        pass

    @_request
    async def open(self, inode, flags, ctx):
        self._entry(inode)
        if flags & os.O_TRUNC:
            # A device's size is fixed (truncate is EPERM too). Accepting it would let the
            # kernel's atomic O_TRUNC set its cached size to 0. (dd: use conv=notrunc.)
            raise self.pyfuse3.FUSEError(errno.EPERM)
        info = self.pyfuse3.FileInfo(fh=inode)
        # No page cache in the FUSE layer: the device (or loop) above caches,
        # and every read must see what other exports wrote.
        info.direct_io = True
        info.keep_cache = False
        return info

    @_request
    async def release(self, fh):
        pass

    @_request
    async def flush(self, fh):
        pass

    async def read(self, fh, off, size):
        """Whole blocks within the file (a loop device's I/O: nearly every read) go to the device as they are.

        Any other read is answered from the whole blocks covering it
        (:meth:`_read_covering`, through this same path), cut to what was
        asked; short at the end of the file. The ``try`` is here rather than
        in :func:`_request`'s wrapper, and the file is looked up here rather
        than through :meth:`_entry`: each is a frame less on the path every
        loop-device read takes (under fio each step of this handler costs
        several times what it costs in a loop in process: between requests
        the server runs trio, libfuse and the kernel).
        """
        try:
            entry = self.files.get(fh)
            if entry is None:
                raise self.pyfuse3.FUSEError(errno.ENOENT)
            if (off | size) % entry.block_size or not size or off + size > entry.size:
                return await self._read_covering(fh, entry, off, size)
            # The data as views of the backend's memory: pyfuse3 replies with
            # it before anything else runs, so a 4 KiB read is never copied here.
            response = await entry.handle(
                new_message(Request, entry.next_seq(), _READ, _NO_FLAGS, off // SECTOR_SIZE, size, None), True)
            _, answer, views = response
            if answer is not _SUCCESS:
                raise entry.device.failed(response, _READ, off, size)
            return views[0] if len(views) == 1 else b"".join(views)
        except Exception as exc:  # noqa: BLE001 - pyfuse3 would end the mount
            raise _fuse_error(self, exc, "read") from None

    async def _read_covering(self, fh, entry: _File, off: int, size: int):
        """A read that is not whole blocks within the file: the whole blocks covering it, cut to it."""
        end = min(off + size, entry.size)
        if off >= end:
            return b""
        head = off % entry.block_size
        first = off - head
        data = await self.read(fh, first, end - first + -end % entry.block_size)
        return bytes(memoryview(data)[head : end - first])

    @_request
    async def write(self, fh, off, buf):
        return await write_range(self._entry(fh), off, buf)

    @_request
    async def fsync(self, fh, datasync):
        entry = self._entry(fh)
        # What the 6.1 kernel sends for a flush: WRITE, len 0, PREFLUSH.
        await entry.device.submit(RequestType.WRITE, 0, 0, data=b"", flags=Flag.PREFLUSH)

    @_request
    async def statfs(self, ctx):
        stats = self.pyfuse3.StatvfsData()
        total = sum(e.size for e in self.export._files.values())
        stats.f_bsize = stats.f_frsize = 4096
        stats.f_blocks = total // 4096
        stats.f_bfree = stats.f_bavail = 0
        stats.f_files = len(self.export._files) + 1
        stats.f_ffree = stats.f_favail = 0
        stats.f_namemax = 255
        return stats
