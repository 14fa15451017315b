"""The data mover for synchronous tools (``cow create/render/verify``, ``ota``).

Those tools are plain blocking code (file I/O, hashing, compression). They
run in a worker thread of a trio loop that owns the mover, and call it
through :class:`BlockingMover`, whose methods hand each operation to the
loop (``trio.from_thread.run``) and wait. A hand-off costs tens of
microseconds, so tools call it per chunk (a megabyte, a read's batch), not
per block::

    result, stats = run_with_mover("auto", render_cow, base, cow, out, mover=MOVER)

``MOVER`` in the arguments is replaced by the :class:`BlockingMover`;
``stats`` is the mover's counters (:meth:`Mover.stats`) at the end.
"""

from __future__ import annotations

from typing import Any, Callable

import trio

from dmuserd.dsa_offload._mover import Mover
from dmuserd.dsa_offload._open import open_mover

#: Placeholder for the mover in :func:`run_with_mover`'s arguments.
MOVER = object()


class BlockingMover:
    """A :class:`Mover` called from a worker thread of the loop that owns it."""

    def __init__(self, mover: Mover) -> None:
        self.mover = mover
        self.engine = mover.engine

    def copy(self, dst, src) -> None:
        trio.from_thread.run(self.mover.copy, dst, src)

    def fill(self, dst, pattern: bytes | int = b"\0") -> None:
        trio.from_thread.run(self.mover.fill, dst, pattern)

    def compare(self, a, b) -> int | None:
        return trio.from_thread.run(self.mover.compare, a, b)

    def crc32c(self, buf, seed: int = 0) -> int:
        return trio.from_thread.run(self.mover.crc32c, buf, seed)

    def batch(self, requests) -> list:
        return trio.from_thread.run(self.mover.batch, requests)

    def stats(self) -> dict:
        return self.mover.stats()


def run_with_mover(engine: str, fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, dict]:
    """Run blocking ``fn`` with a mover on ``engine``; returns ``(its result, the mover's stats)``.

    Arguments that are :data:`MOVER` become the :class:`BlockingMover`.
    Must not be called from a trio task (it runs its own loop).
    """

    async def main():
        async with open_mover(engine) as mover:
            blocking = BlockingMover(mover)
            call_args = [blocking if a is MOVER else a for a in args]
            call_kwargs = {k: blocking if v is MOVER else v for k, v in kwargs.items()}
            result = await trio.to_thread.run_sync(lambda: fn(*call_args, **call_kwargs))
            return result, mover.stats()

    return trio.run(main)
