"""The floor for a Python FUSE block file: pyfuse3 copying from a bytearray.

Serves one regular file, ``MOUNTPOINT/disk``, of ``--size`` bytes held in a
``bytearray``: ``read`` returns a slice, ``write`` stores into it. Nothing
else happens per request, so its IOPS and throughput are what any pyfuse3
(trio) server can reach on this machine; ``bench/scenarios/fuse_loop.py``
compares dmuserd's FUSE export with it.

It mounts with the FUSE options :mod:`dmuserd.daemon.fuse` uses (no
``default_permissions``, ``allow_other`` as root), opens the file with
``direct_io`` and no ``keep_cache``, and runs ``pyfuse3.main`` with the
``min_tasks``/``max_tasks`` dmuserd's export used while it ran on pyfuse3
(until session 12; it now has its own libfuse session). Run it with the venv's python::

    python bench/anchors/bare_pyfuse3.py --size 1G /mnt/empty-dir

With ``--memory-backend`` the file is held by dmuserd's ``memory`` backend
instead, and ``read``/``write`` await its ``read``/``write`` directly: no
dm-user model, no dispatcher. That is the floor of any pyfuse3 server that
calls a Python async backend per request, i.e. the most dmuserd's FUSE
export could reach on pyfuse3 with its dispatcher costing nothing.

It unmounts and exits on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
import time

import pyfuse3
import trio

NAME = b"disk"
INODE = pyfuse3.ROOT_INODE + 1
#: as dmuserd/daemon/fuse.py's ``pyfuse3.main`` call had them (before its own session)
MIN_TASKS = 4
MAX_TASKS = 160


class BareFile(pyfuse3.Operations):
    """The file in a bytearray."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.data = bytearray(size)
        self.mounted_at = time.time_ns()

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = attr.attr_timeout = 300
        attr.st_uid, attr.st_gid = os.getuid(), os.getgid()
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.mounted_at
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFDIR | 0o755, 2, 0
        elif inode == INODE:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFREG | 0o600, 1, self.size
            attr.st_blocks = self.size // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_blksize = 4096
        return attr

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size and inode == INODE and attr.st_size != self.size:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or bytes(name) != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(INODE)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id < INODE:
            pyfuse3.readdir_reply(token, NAME, self._attrs(INODE), INODE)

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        if inode != INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        info = pyfuse3.FileInfo(fh=inode)
        info.direct_io = True
        info.keep_cache = False
        return info

    async def release(self, fh):
        pass

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        pass

    async def read(self, fh, off, size):
        return self.data[off : off + size]

    async def write(self, fh, off, buf):
        if off + len(buf) > self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self.data[off : off + len(buf)] = buf
        return len(buf)


class BackendFile(BareFile):
    """The file in dmuserd's memory backend, called straight from the handlers."""

    def __init__(self, size: int) -> None:
        pyfuse3.Operations.__init__(self)
        from dmuserd.backends.memory import MemoryBackend

        self.size = size
        self.backend = MemoryBackend(size, 512)
        self.mounted_at = time.time_ns()

    async def read(self, fh, off, size):
        # The backend's pieces, as dmuserd's FUSE read takes them: a read
        # within one chunk is a view of it (pyfuse3 replies from it at once).
        views = await self.backend.read_views(off, max(0, min(size, self.size - off)))
        return views[0] if len(views) == 1 else b"".join(views)

    async def write(self, fh, off, buf):
        if off + len(buf) > self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        await self.backend.write(off, buf)
        return len(buf)


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(text[:-1]) * units[text[-1]] if text[-1:] in units and text[-1:] else int(text)


async def serve(mountpoint: str, size: int, file_class=BareFile) -> None:
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {"fsname=bare_pyfuse3", "subtype=bare_pyfuse3"}
    if os.geteuid() == 0:
        options.add("allow_other")
    pyfuse3.init(file_class(size), mountpoint, options)
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pyfuse3.main, MIN_TASKS, MAX_TASKS)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
    finally:
        pyfuse3.close(unmount=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="file size (default 1G)")
    parser.add_argument("--memory-backend", action="store_true",
                        help="hold the data in dmuserd's memory backend and call it from the handlers")
    parser.add_argument("mountpoint", help="an empty directory")
    args = parser.parse_args(argv)
    trio.run(serve, args.mountpoint, parse_size(args.size), BackendFile if args.memory_backend else BareFile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
