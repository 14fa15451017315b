"""``file``: a raw image file or a block device.

``--backend file:path=/srv/a.img[,size=1G][,create=1][,readonly=1][,direct=1]``

* Sparse-aware: ``discard`` punches holes, ``write_zeroes`` uses
  ``fallocate(ZERO_RANGE)`` (or a hole when unmapping is allowed), falling
  back to writing zeros where the filesystem has neither. On a block device
  they become ``BLKDISCARD`` / ``BLKZEROOUT``.
* ``flush`` is ``fdatasync``; a FUA write is ``pwritev2(RWF_DSYNC)``, durable
  before it completes.
* ``direct=1`` opens with ``O_DIRECT`` (no page cache): buffers are then
  page-aligned copies.
* Blocking I/O never stalls the event loop: reads first try
  ``preadv2(RWF_NOWAIT)``, which succeeds at once on a page-cache hit, and
  otherwise run in a worker thread, as do writes and syncs.
* ``create=1`` creates the file (sparse) with ``size``; an existing file
  smaller than ``size`` is extended.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
from typing import TYPE_CHECKING, Any

import trio

from dmuserd.backends._api import Backend, BackendError, Op, Unsupported
from dmuserd.backends.options import Options

if TYPE_CHECKING:
    from typing_extensions import Buffer

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKSSZGET = 0x1268

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_ZEROS = bytes(1 << 20)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _address(buffer: memoryview) -> int:
    """Where ``buffer``'s memory starts (it must be writable: ctypes maps only those)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class FileBackend(Backend):
    name = "file"

    def __init__(
        self,
        path: str,
        *,
        size: int | None = None,
        create: bool = False,
        readonly: bool = False,
        direct: bool = False,
    ) -> None:
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if create and not readonly:
            flags |= os.O_CREAT
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise BackendError(f"file backend: cannot open {path}: {exc.strerror}") from None
        self.path = path
        self.direct = direct
        try:
            st = os.fstat(self.fd)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            block_size = 512
            if self.is_block_device:
                actual = struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8))[0]
                block_size = struct.unpack("i", fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4))[0]
                if size is not None and size > actual:
                    raise BackendError(f"file backend: {path} holds {actual} bytes, size={size} asked for")
            else:
                actual = st.st_size
                if size is not None and size > actual:
                    if readonly:
                        raise BackendError(f"file backend: {path} holds {actual} bytes, size={size} asked for (read-only)")
                    os.ftruncate(self.fd, size)
                    actual = size
            size = actual if size is None else size
            if size % block_size:
                raise BackendError(f"file backend: {path} size {size} is not a multiple of {block_size} bytes")
            disabled: set[Op] = {Op.WRITE, Op.DISCARD, Op.WRITE_ZEROES} if readonly else set()
            super().__init__(size=size, block_size=block_size, disabled_ops=disabled)
        except BaseException:
            os.close(self.fd)
            raise
        self._nowait = not direct
        self._zero_range_ok = True

    @classmethod
    def from_options(cls, options: dict[str, str]) -> FileBackend:
        opts = Options(cls.name, options)
        path = opts.str("path", required=True)
        size = opts.size("size")
        create = opts.bool("create")
        readonly = opts.bool("readonly")
        direct = opts.bool("direct")
        opts.finish()
        if create and size is None:
            raise BackendError("backend 'file': create=1 needs size=...")
        return cls(path, size=size, create=create, readonly=readonly, direct=direct)

    # -- reads and writes ------------------------------------------------------

    def _buffer(self, length: int) -> bytearray | mmap.mmap:
        # O_DIRECT wants page-aligned memory: an anonymous mmap is.
        return mmap.mmap(-1, max(length, 1)) if self.direct else bytearray(length)

    async def read(self, offset: int, length: int) -> memoryview:
        view = memoryview(self._buffer(length))[:length]
        await self._read_into(view, offset)
        return view

    async def readinto(self, offset: int, buffer: memoryview) -> None:
        # preadv straight into ``buffer``; O_DIRECT wants page-aligned memory,
        # which only some buffers are: those go through read()'s aligned one.
        if self.direct and (_address(buffer) % mmap.PAGESIZE or len(buffer) % self.block_size):
            await super().readinto(offset, buffer)
        else:
            await self._read_into(buffer, offset)

    async def _read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from ``offset``: from the page cache at once when it can, else in a worker thread."""
        length = len(view)
        if self._nowait:
            try:
                done = os.preadv(self.fd, [view], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                done = 0
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                self._nowait = False
                done = 0
        else:
            done = 0
        if done < length:
            await trio.to_thread.run_sync(self._read_fully, view, offset, done)

    def _read_fully(self, view: memoryview, offset: int, done: int) -> None:
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:  # past the end of a file shorter than its size: zeros
                view[done:] = bytes(len(view) - done)
                return
            done += n

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        if self.direct:
            aligned = self._buffer(len(view))
            aligned[: len(view)] = view
            view = memoryview(aligned)[: len(view)]
        await trio.to_thread.run_sync(self._write_fully, view, offset, fua)

    def _write_fully(self, view: memoryview, offset: int, fua: bool) -> None:
        flags = os.RWF_DSYNC if fua else 0
        done = 0
        while done < len(view):
            done += os.pwritev(self.fd, [view[done:]], offset + done, flags)

    async def flush(self) -> None:
        await trio.to_thread.run_sync(os.fdatasync, self.fd)

    # -- deallocation -----------------------------------------------------------

    async def discard(self, offset: int, length: int) -> None:
        await trio.to_thread.run_sync(self._discard, offset, length)

    def _discard(self, offset: int, length: int) -> None:
        try:
            if self.is_block_device:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            else:
                _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise Unsupported(f"discard on {self.path}: {exc.strerror}") from None
            raise

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        await trio.to_thread.run_sync(self._write_zeroes, offset, length, may_unmap)

    def _write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        if self.is_block_device:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                    raise
        else:
            mode = FALLOC_FL_PUNCH_HOLE if may_unmap else FALLOC_FL_ZERO_RANGE
            if mode == FALLOC_FL_PUNCH_HOLE or self._zero_range_ok:
                try:
                    _fallocate(self.fd, mode | FALLOC_FL_KEEP_SIZE, offset, length)
                    return
                except OSError as exc:
                    if exc.errno != errno.EOPNOTSUPP:
                        raise
                    if mode == FALLOC_FL_ZERO_RANGE:
                        self._zero_range_ok = False
        # Neither deallocation works here: write real zeros.
        done = 0
        while done < length:
            chunk = min(length - done, len(_ZEROS))
            self._write_fully(memoryview(_ZEROS)[:chunk], offset + done, False)
            done += chunk

    async def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            await trio.to_thread.run_sync(os.close, fd)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"path": self.path, "direct": self.direct, "block_device": self.is_block_device}
