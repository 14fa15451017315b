"""An in-process device with no dm-user bytes: each block I/O is one typed request.

FUSE (and any export living in the daemon's own process) submits block I/O
here by default: :meth:`DirectDevice.submit` builds a
:class:`~dmuserd.protocol.Request` and awaits the dispatcher, one call, the
way qemu's FUSE export calls its block layer. The dm-user wire format is
never packed or parsed on this path.

:class:`~dmuserd.daemon.emulated.EmulatedDmUser` has the same two methods
and runs every request through the kernel-target model instead (sequence
numbers, the daemon timeout, EIO when the daemon goes away): that is
``--export fuse:DIR,emulate=dm-user``, for people testing a daemon against
dm-user's own semantics, and the tests' oracle.
"""

from __future__ import annotations

import errno
import itertools

import trio

from dmuserd.daemon.dispatcher import Refused
from dmuserd.protocol import SECTOR_SIZE, Flag, Request, RequestType, ResponseType

_SUCCESS = ResponseType.SUCCESS
_NO_FLAGS = Flag(0)


class DirectDevice:
    """Block I/O straight to a target's dispatcher (see the module doc)."""

    def __init__(self, dispatcher) -> None:
        self.dispatcher = dispatcher
        self._handle = dispatcher.handle
        self._seq = itertools.count().__next__

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Nothing runs in the background; here so both devices start alike."""
        task_status.started()

    def stop_admitting(self) -> None:
        """Nothing to do: the dispatcher's admission, closed first, refuses new I/O (EIO here)."""

    async def submit(self, kind: RequestType, offset: int, length: int = 0, data=None, flags: Flag = _NO_FLAGS):
        """One block I/O; the data of a READ (None otherwise).

        ``OSError(EIO)`` when it fails, as the block layer says it: a failed
        request, or one refused because the target is stopping.
        """
        response = await self._handle(Request(self._seq(), kind, flags, offset // SECTOR_SIZE, length, data))
        if response.type is not _SUCCESS:
            raise OSError(errno.EIO, f"{self.dispatcher.name}: {kind.name} at {offset}+{length} failed "
                          f"({'refused: the target is stopping' if type(response) is Refused else response.type.name})")
        return response.payload
