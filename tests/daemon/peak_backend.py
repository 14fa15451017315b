"""A memory backend whose reads take a while and count how many run at once (for the bounds tests).

A uniquely named module (not conftest) so test files import it directly."""

from __future__ import annotations

import trio

from dmuserd.backends.memory import MemoryBackend


class PeakReads(MemoryBackend):
    """Each read sleeps ``delay`` s; ``peak`` is the most reads that were in flight at once."""

    def __init__(self, size: int = 1 << 20, delay: float = 0.01) -> None:
        super().__init__(size)
        self.delay = delay
        self.active = self.peak = 0

    async def read(self, offset, length):
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await trio.sleep(self.delay)
        finally:
            self.active -= 1
        return bytes(length)
