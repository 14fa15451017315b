"""One ublk hardware queue, served from trio.

The kernel hands requests over through two things the queue shares with
us: its *descriptor array* (``/dev/ublkcN`` mmap'ed read-only, one
:class:`~dmuserd.daemon.ublk.uapi.Descriptor` per tag) and one I/O buffer per
tag in our memory, whose address each FETCH gives the kernel. The cycle of a
tag:

1. FETCH_REQ (at start) / COMMIT_AND_FETCH_REQ (after each request) is
   pending in the kernel;
2. a block request arrives: the kernel fills the tag's descriptor, copies a
   WRITE's data into the tag's buffer and completes the command (a CQE on
   this queue's ring, which signals the ring's eventfd, which wakes trio);
3. :meth:`Queue.serve` starts a task for the tag: descriptor → typed
   :class:`~dmuserd.protocol.Request` → ``dispatcher.handle`` → a READ's data
   into the buffer → COMMIT_AND_FETCH_REQ with the result (bytes done, or
   ``-errno``), which completes the block request and re-arms the tag.

Tags bound the concurrency: at most ``depth`` requests per queue are in the
daemon at once. All commands of a queue are issued from the trio thread (the
kernel accepts a queue's commands only from the task that fetched on it).

A descriptor the export cannot serve (an unknown operation, a length beyond
the tag's buffer) fails that request alone with EIO, counted under the
guard's ``ublk`` surface.
"""

from __future__ import annotations

import errno
import mmap
import os

import structlog
import trio

from dmuserd.daemon.guard import Guard
from dmuserd.daemon.ublk import uapi
from dmuserd.daemon.ublk.control import uring_module
from dmuserd.protocol import SECTOR_SIZE, Flag, Request, RequestType, ResponseType

log = structlog.get_logger("dmuserd.ublk")

_TYPES = {
    uapi.Op.READ: RequestType.READ,
    uapi.Op.WRITE: RequestType.WRITE,
    uapi.Op.FLUSH: RequestType.FLUSH,
    uapi.Op.DISCARD: RequestType.DISCARD,
    uapi.Op.WRITE_ZEROES: RequestType.WRITE_ZEROES,
}
_DATA_OPS = (uapi.Op.READ, uapi.Op.WRITE)
_FLAGS = ((uapi.IoFlag.FUA, Flag.FUA), (uapi.IoFlag.NOUNMAP, Flag.NOUNMAP), (uapi.IoFlag.META, Flag.META),
          (uapi.IoFlag.FAILFAST_DEV, Flag.FAILFAST_DEV), (uapi.IoFlag.FAILFAST_TRANSPORT, Flag.FAILFAST_TRANSPORT),
          (uapi.IoFlag.FAILFAST_DRIVER, Flag.FAILFAST_DRIVER))

def _flag_table() -> dict[int, Flag]:
    """Our flags for every combination of the ublk bits we map, by those bits.

    One lookup per request: combining IntFlags in Python costs about a
    microsecond per operation, six per request.
    """
    table = {}
    for combination in range(1 << len(_FLAGS)):
        theirs, ours = 0, Flag(0)
        for i, (bit, flag) in enumerate(_FLAGS):
            if combination >> i & 1:
                theirs, ours = theirs | int(bit), ours | flag
        table[theirs] = ours
    return table


_FLAG_OF = _flag_table()
_MAPPED = sum(int(bit) for bit, _ in _FLAGS)  # the bits we map; others (SWAP) are not passed on
_RESULT = {ResponseType.ERROR: -errno.EIO, ResponseType.UNSUPPORTED: -errno.EOPNOTSUPP}
_SURFACE = "ublk"


class Malformed(Exception):
    """A descriptor this export cannot serve (the request fails alone with EIO)."""


def to_request(desc: uapi.Descriptor, tag: int, buffer: memoryview) -> Request:
    """The typed request a descriptor stands for; a WRITE's payload is copied out of ``buffer``."""
    kind = _TYPES.get(desc.op)
    if kind is None:
        raise Malformed(f"unknown operation {desc.op}")
    length = desc.nr_sectors * SECTOR_SIZE
    if desc.op in _DATA_OPS and length > len(buffer):
        raise Malformed(f"{kind.name} of {length} bytes is larger than the tag's {len(buffer)}-byte buffer")
    flags = _FLAG_OF[desc.flags & _MAPPED]
    payload = bytes(buffer[:length]) if desc.op == uapi.Op.WRITE else None
    return Request(tag, kind, flags, desc.start_sector, length, payload)


class Queue:
    """Queue ``q_id`` of device ``dev_id``: its ring, descriptor array, buffers and counters."""

    def __init__(self, char_fd: int, q_id: int, depth: int, buffer_size: int) -> None:
        uring = uring_module()
        self.q_id = q_id
        self.depth = depth
        self.buffer_size = buffer_size
        self._fd = char_fd
        page = mmap.PAGESIZE
        self._descriptors = mmap.mmap(char_fd, uapi.descriptor_array_size(depth, page), mmap.MAP_SHARED,
                                      mmap.PROT_READ, offset=uapi.descriptor_array_offset(q_id, page))
        self._memory = mmap.mmap(-1, depth * buffer_size)
        self._view = memoryview(self._memory)
        base = uring.address(self._memory)
        self._addresses = [base + tag * buffer_size for tag in range(depth)]
        self.ring = uring.Ring(max(8, depth), 0)
        #: tags whose request is in the daemon (fetched, not committed yet)
        self.owned: set[int] = set()
        #: tags with a command pending in the kernel (not aborted)
        self.armed: set[int] = set()
        self.requests = 0
        self.errors = 0
        self.malformed = 0

    def fetch_all(self) -> None:
        """Arm every tag (FETCH_REQ); the kernel counts the queue ready once all are in."""
        for tag in range(self.depth):
            self.ring.uring_cmd(self._fd, uapi.IoCmd.FETCH_REQ, uapi.io_cmd(self.q_id, tag, 0, self._addresses[tag]),
                                tag)
            self.armed.add(tag)
        self.ring.submit()

    def commit(self, tag: int, result: int) -> None:
        """Answer ``tag``'s request with ``result`` and arm the tag again."""
        self.owned.discard(tag)
        self.ring.uring_cmd(self._fd, uapi.IoCmd.COMMIT_AND_FETCH_REQ,
                            uapi.io_cmd(self.q_id, tag, result, self._addresses[tag]), tag)
        self.armed.add(tag)
        self.ring.submit()

    def take(self) -> list[int]:
        """The tags whose request arrived since the last call (commands ended otherwise are noted)."""
        arrived = []
        for tag, res in self.ring.completions():
            self.armed.discard(tag)
            if res == uapi.IO_RES_OK:
                self.owned.add(tag)
                arrived.append(tag)
            elif res != uapi.IO_RES_ABORT:
                # Our command was refused: a bug of ours, or the device went away under us.
                log.error("ublk queue command failed", queue=self.q_id, tag=tag, error=os.strerror(-res))
        return arrived

    async def serve(self, handle, nursery: trio.Nursery, guard: Guard) -> None:
        """Serve requests until every tag is aborted (the device stopped) or cancellation.

        ``handle`` is the target's ``dispatcher.handle``; each request runs in
        a task of ``nursery``.
        """
        while self.armed or self.owned:
            await trio.lowlevel.wait_readable(self.ring.eventfd)
            for tag in self.take():
                nursery.start_soon(self._one, handle, tag, guard)

    async def _one(self, handle, tag: int, guard: Guard) -> None:
        self.requests += 1
        buffer = self._view[tag * self.buffer_size:(tag + 1) * self.buffer_size]
        result = -errno.EIO
        try:
            desc = uapi.decode_descriptor(self._descriptors, tag)
            try:
                request = to_request(desc, tag, buffer)
            except Malformed as exc:
                self.malformed += 1
                guard.reject(_SURFACE, "malformed-descriptor", str(exc), queue=self.q_id, tag=tag)
            else:
                response = await handle(request)
                if response.type == ResponseType.SUCCESS:
                    if request.type == RequestType.READ:
                        data = memoryview(response.payload).cast("B")
                        buffer[:request.len] = data
                    result = request.len
                else:
                    result = _RESULT.get(response.type, -errno.EIO)
        except Exception as exc:  # noqa: BLE001 - a bug here fails this one request only
            guard.failed(_SURFACE, exc, queue=self.q_id, tag=tag)
        finally:
            buffer.release()
        if result < 0:
            self.errors += 1
        try:
            self.commit(tag, result)
        except OSError as exc:  # the ring refused the submission: this request is lost, the queue goes on
            guard.failed(_SURFACE, exc, queue=self.q_id, tag=tag)

    def fail_owned(self) -> None:
        """Answer EIO to every request still in the daemon (their tasks were cancelled)."""
        for tag in list(self.owned):
            self.errors += 1
            self.commit(tag, -errno.EIO)

    async def refuse_until_stopped(self) -> None:
        """While the device stops: answer EIO to whatever still arrives, until every tag is aborted."""
        self.fail_owned()
        while self.armed:
            await trio.lowlevel.wait_readable(self.ring.eventfd)
            for tag in self.take():
                self.errors += 1
                self.commit(tag, -errno.EIO)

    def status(self) -> dict:
        return {"queue": self.q_id, "depth": self.depth, "requests": self.requests, "in_flight": len(self.owned),
                "errors": self.errors, "malformed": self.malformed}

    def close(self) -> None:
        """Release the ring, the descriptor mapping and the buffers (the device no longer uses them)."""
        self.ring.close()
        self._view.release()
        self._descriptors.close()
        self._memory.close()
