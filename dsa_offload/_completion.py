"""Waiting for completions from trio, with no background task.

The extension's poller thread signals one eventfd per queue; trio allows
only one task to wait on an fd, so the waiters take turns: whoever finds
nobody reading becomes the reader, waits for the fd, reaps everything that
completed (marking those operations done and releasing their buffers) and
wakes the others to check their own. A cancelled reader hands the role on.
"""

from __future__ import annotations

from typing import Callable

import trio


class Completions:
    def __init__(self, queue) -> None:
        self._queue = queue
        self._reading = False
        self._lot = trio.lowlevel.ParkingLot()

    async def wait(self, op) -> None:
        """Return once ``op`` has completed and been reaped."""
        await self.wait_until(lambda: op.done)

    async def wait_idle(self) -> None:
        """Return once nothing is in flight on the queue."""
        await self.wait_until(lambda: self._queue.in_flight == 0)
        self._queue.reap()

    async def wait_until(self, done: Callable[[], bool]) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not done():
            if self._reading:
                await self._lot.park()
                continue
            self._reading = True
            try:
                if not self._queue.reap():
                    # fileno() is looked up each time: a forked child reopens.
                    await trio.lowlevel.wait_readable(self._queue.fileno())
                    self._queue.reap()
            finally:
                self._reading = False
                self._lot.unpark_all()
