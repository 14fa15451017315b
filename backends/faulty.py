"""``faulty``: a RAM disk that fails where you tell it to.

``--backend faulty:size=64M,fail=1M+4K/8M+64K,ops=read/write``

Requests that touch a listed range (``OFFSET+LENGTH``, ``/``-separated)
with a listed operation (``read``, ``write``, ``flush``, ``discard``,
``write_zeroes``; default ``read/write``) raise ``OSError(EIO)``; all others
are served by an inner :class:`~dmuserd.backends.memory.MemoryBackend`. For
testing how clients and the daemon cope with a failing disk. From Python,
wrap any backend: ``FaultyBackend(inner, [(offset, length)], {Op.READ})``.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dmuserd.backends._api import Backend, BackendError, Op
from dmuserd.backends.memory import MemoryBackend
from dmuserd.backends.options import Options, parse_size

if TYPE_CHECKING:
    from typing_extensions import Buffer


def _parse_ranges(text: str) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for item in filter(None, text.split("/")):
        offset, plus, length = item.partition("+")
        if not plus:
            raise BackendError(f"backend 'faulty' option fail: {item!r} is not OFFSET+LENGTH")
        ranges.append((parse_size(offset, what="fail offset"), parse_size(length, what="fail length")))
    return ranges


class FaultyBackend(Backend):
    name = "faulty"

    def __init__(self, inner: Backend, ranges: Iterable[tuple[int, int]],
                 ops: Iterable[Op] = frozenset({Op.READ, Op.WRITE})) -> None:
        super().__init__(size=inner.size, block_size=inner.block_size)
        self.inner = inner
        self.ranges = list(ranges)
        self.ops = frozenset(ops)
        self.failures = 0

    @classmethod
    def from_options(cls, options: dict[str, str]) -> FaultyBackend:
        opts = Options(cls.name, options)
        size = opts.size("size", required=True)
        ranges = _parse_ranges(opts.str("fail", ""))
        names = opts.str("ops", "read/write").split("/")
        opts.finish()
        try:
            ops = {Op(name) for name in names}
        except ValueError:
            raise BackendError(f"backend 'faulty' option ops: use names from {', '.join(o.value for o in Op)}") from None
        return cls(MemoryBackend(size), ranges, ops)

    @property
    def capabilities(self) -> frozenset[Op]:
        return self.inner.capabilities

    def _check(self, op: Op, offset: int = 0, length: int | None = None) -> None:
        if op not in self.ops:
            return
        end = self.size if length is None else offset + length
        for start, count in self.ranges:
            if offset < start + count and start < end:
                self.failures += 1
                raise OSError(errno.EIO, f"injected {op.value} failure at {start}+{count}")

    async def read(self, offset: int, length: int) -> Buffer:
        self._check(Op.READ, offset, length)
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self._check(Op.WRITE, offset, memoryview(data).nbytes)
        await self.inner.write(offset, data, fua)

    async def flush(self) -> None:
        self._check(Op.FLUSH)
        await self.inner.flush()

    async def discard(self, offset: int, length: int) -> None:
        self._check(Op.DISCARD, offset, length)
        await self.inner.discard(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self._check(Op.WRITE_ZEROES, offset, length)
        await self.inner.write_zeroes(offset, length, may_unmap)

    async def close(self) -> None:
        await self.inner.close()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"fail": self.ranges, "failures": self.failures}
