"""Backends for the dm-user VM tests (with ``tests/vm`` on ``PYTHONPATH``).

* :class:`StallBackend`: a file backend that stalls or fails reads in given ranges;
* :class:`ItemsBackend`: a file backend whose reads are buffers of 2- or 4-byte items;
* :class:`ReadOnlyBackend`: reads only, no flush.

``--backend dmuser_vm_backend:StallBackend:path=F,stall=OFF+LEN,fail=OFF+LEN,marker=M``:
a read touching ``stall`` creates the file ``marker`` (so a test knows the
request is in flight in the daemon) and then waits until
:attr:`StallBackend.release` is set: forever in a daemon process (the test
kills it), or until an in-process test sets it. A read touching ``fail``
raises EIO, as a broken disk would.
"""

from __future__ import annotations

import errno
from array import array

import trio

from dmuserd.backends import Backend
from dmuserd.backends.faulty import _parse_ranges
from dmuserd.backends.file import FileBackend
from dmuserd.backends.options import Options


def _touches(ranges, offset: int, length: int) -> bool:
    return any(offset < start + size and start < offset + length for start, size in ranges)


class StallBackend(FileBackend):
    name = "stall"

    def __init__(self, path: str, *, stall=(), fail=(), marker: str | None = None) -> None:
        super().__init__(path)
        self.stall = list(stall)
        self.fail = list(fail)
        self.marker = marker
        self.release = trio.Event()
        self.stalled = 0

    @classmethod
    def from_options(cls, options):
        opts = Options(cls.name, options)
        path = opts.str("path", required=True)
        stall = _parse_ranges(opts.str("stall", ""))
        fail = _parse_ranges(opts.str("fail", ""))
        marker = opts.str("marker", None)
        opts.finish()
        return cls(path, stall=stall, fail=fail, marker=marker)

    async def read(self, offset, length):
        if _touches(self.fail, offset, length):
            raise OSError(errno.EIO, f"injected read error at {offset}+{length}")
        if _touches(self.stall, offset, length):
            self.stalled += 1
            if self.marker:
                with open(self.marker, "w") as f:
                    f.write(f"{offset}+{length}\n")
            await self.release.wait()
        return await super().read(offset, length)


class ItemsBackend(FileBackend):
    """A file backend whose reads come back as buffers of 4-byte or 2-byte items.

    ``--backend dmuser_vm_backend:ItemsBackend:path=F,wrong=OFF``: a read
    below ``wrong`` is an ``array('I')`` of the right byte size (its
    ``len()`` a quarter of it); from ``wrong`` on, a ``memoryview`` of
    2-byte items whose ``len()`` is the length asked for and whose byte size
    is twice that: a daemon counting items would send it.
    """

    name = "items"

    def __init__(self, path: str, *, wrong: int) -> None:
        super().__init__(path)
        self.wrong = wrong

    @classmethod
    def from_options(cls, options):
        opts = Options(cls.name, options)
        path = opts.str("path", required=True)
        wrong = opts.size("wrong", required=True)
        opts.finish()
        return cls(path, wrong=wrong)

    async def read(self, offset, length):
        if offset >= self.wrong:
            return memoryview(bytes(2 * length)).cast("H")
        return array("I", bytes(await super().read(offset, length)))


class ReadOnlyBackend(Backend):
    """Reads only (zeros): no write(), no flush(); nothing it serves can be pending.

    ``--backend dmuser_vm_backend:ReadOnlyBackend:size=S``
    """

    name = "read-only"

    @classmethod
    def from_options(cls, options):
        opts = Options(cls.name, options)
        size = opts.size("size", required=True)
        opts.finish()
        return cls(size=size)

    async def read(self, offset, length):
        return bytes(length)
