"""In-process block devices: what the FUSE export (and tests) submit block I/O to.

Two devices serve a target to an export living in the daemon's own process,
and both take typed requests (:meth:`InProcessDevice.handle`: a
:class:`~dmuserd.protocol.Request` in, its
:class:`~dmuserd.protocol.Response` out):

* :class:`DirectDevice`, FUSE's default: ``handle`` *is* the dispatcher's,
  one call per block I/O, the way qemu's FUSE export calls its block layer.
  The dm-user wire format is never packed or parsed on this path.
* :class:`~dmuserd.daemon.emulated.EmulatedDmUser` runs every request
  through the kernel-target model instead (sequence numbers, the daemon
  timeout, EIO when the daemon goes away): ``--export
  fuse:DIR,emulate=dm-user``, for people testing a daemon against dm-user's
  own semantics, and the tests' oracle.

:meth:`InProcessDevice.submit` is the block layer's view built on
``handle``: one I/O, its data, ``OSError(EIO)`` when it fails.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Awaitable, Callable

import trio

from dmuserd.daemon.dispatcher import Refused
from dmuserd.protocol import SECTOR_SIZE, Flag, Request, RequestType, Response, ResponseType

_SUCCESS = ResponseType.SUCCESS
_NO_FLAGS = Flag(0)


class InProcessDevice:
    """A target's block device inside the daemon (see the module doc).

    ``handle(request, views=False)`` runs one request and returns its
    response, never raising; with ``views`` a READ's data is a list of
    buffers that may be views of the backend's memory (valid to hand on at
    once, before the caller next awaits: the FUSE reply is sent so). The
    request's ``seq`` is the caller's (:meth:`next_seq`); a device that
    numbers its messages itself (the dm-user model) keeps it only to answer.
    """

    name: str
    handle: Callable[..., Awaitable[Response]]

    def __init__(self, name: str) -> None:
        self.name = name
        #: the next request's sequence number
        self.next_seq = itertools.count().__next__

    async def submit(self, kind: RequestType, offset: int, length: int = 0, data=None, flags: Flag = _NO_FLAGS):
        """One block I/O at byte ``offset``; the data of a READ (None otherwise), or ``OSError(EIO)``."""
        response = await self.handle(Request(self.next_seq(), kind, flags, offset // SECTOR_SIZE, length, data))
        if response.type is not _SUCCESS:
            raise self.failed(response, kind, offset, length)
        return response.payload

    def failed(self, response: Response, kind: RequestType, offset: int, length: int) -> OSError:
        """The block layer's error for a failed ``response``: EIO, saying what failed and why."""
        why = "refused: the target is stopping" if type(response) is Refused else response.type.name
        return OSError(errno.EIO, f"{self.name}: {kind.name} at {offset}+{length} failed ({why})")

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve what runs in the background (in a nursery: ``await nursery.start(device.run)``); here, nothing."""
        task_status.started()

    def stop_admitting(self) -> None:
        """A stop is under way: new I/O fails with EIO from now on.

        Here nothing to do: the dispatcher's admission, closed first, refuses it.
        """


class DirectDevice(InProcessDevice):
    """Block I/O straight to a target's dispatcher (see the module doc)."""

    def __init__(self, dispatcher) -> None:
        super().__init__(dispatcher.name)
        self.dispatcher = dispatcher
        #: the dispatcher's own entry point: no frame of this class on the I/O path
        self.handle = dispatcher.handle
