"""``null``: reads return zeros, writes are dropped.

``--backend null:size=1G``. The fastest possible backend: benchmarks use it
to measure the daemon and the export alone.
"""

from __future__ import annotations

from dmuserd.backends._api import Backend
from dmuserd.backends.options import size_and_block_size


class ReadsZeros(Backend):
    """Reads return zeros (one shared buffer, grown to the largest read); flush has nothing to do.

    The common part of ``null`` and ``zero``; what else a subclass overrides is what it serves.
    """

    def __init__(self, size: int, block_size: int = 512) -> None:
        super().__init__(size=size, block_size=block_size)
        self._zeros = b""

    @classmethod
    def from_options(cls, options):
        return cls(*size_and_block_size(cls.name, options))

    async def read(self, offset, length):
        if len(self._zeros) < length:
            self._zeros = bytes(length)
        return memoryview(self._zeros)[:length]

    async def flush(self):
        pass


class NullBackend(ReadsZeros):
    name = "null"

    async def write(self, offset, data, fua=False):
        pass

    async def discard(self, offset, length):
        pass

    async def write_zeroes(self, offset, length, may_unmap=False):
        pass
