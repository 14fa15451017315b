"""A file backend that stalls or fails reads in given ranges (for the dm-user tests).

``--backend dmuser_vm_backend:StallBackend:path=F,stall=OFF+LEN,fail=OFF+LEN,marker=M``
(with ``tests/vm`` on ``PYTHONPATH``). A read touching ``stall`` creates
the file ``marker`` (so a test knows the request is in flight in the
daemon) and then waits until :attr:`release` is set: forever in a daemon
process (the test kills it), or until an in-process test sets it. A read
touching ``fail`` raises EIO, as a broken disk would.
"""

from __future__ import annotations

import errno

import trio

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
