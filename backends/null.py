"""``null``: reads return zeros, writes are dropped.

``--backend null:size=1G``. The fastest possible backend: benchmarks use it
to measure the daemon and the export alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from dmuserd.backends._api import Backend
from dmuserd.backends.options import size_and_block_size

if TYPE_CHECKING:
    from typing_extensions import Buffer


class ReadsZeros(Backend):
    """Reads return zeros (one shared buffer, grown to the largest read); flush has nothing to do.

    The common part of ``null`` and ``zero``; what else a subclass overrides is what it serves.
    """

    def __init__(self, size: int, block_size: int = 512) -> None:
        super().__init__(size=size, block_size=block_size)
        self._zeros = b""

    @classmethod
    def from_options(cls, options: dict[str, str]) -> Self:
        return cls(*size_and_block_size(cls.name, options))

    async def read(self, offset: int, length: int) -> memoryview:
        if len(self._zeros) < length:
            self._zeros = bytes(length)
        return memoryview(self._zeros)[:length]

    async def flush(self) -> None:
        pass


class NullBackend(ReadsZeros):
    name = "null"

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        pass

    async def discard(self, offset: int, length: int) -> None:
        pass

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        pass
