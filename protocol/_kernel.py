"""A model of the kernel's dm-user target, sans I/O, with time passed in.

This reproduces ``drivers/md/dm-user.c`` as the daemon sees it (the facts
are listed in ``shared/specs/dm-user.md``), so that:

* the FUSE and NBD exports present dm-user's semantics on plain Linux: they
  submit BIOs to a :class:`KernelTarget` and the daemon serves its channels
  exactly as it would serve ``/dev/dm-user/NAME``;
* tests drive a daemon the way the kernel would, byte for byte.

Nothing here sleeps or blocks. Every call that depends on time takes
``now`` (seconds, any monotonic origin). Where the kernel would block (a
``read()`` with nothing queued) :meth:`Channel.read` returns
:data:`WOULD_BLOCK`; the caller waits for :attr:`KernelTarget.on_queue`.

The life of a BIO::

    submit ──► queued (a message, with its seq) ──► taken by a channel's
    read ──► answered by that channel's write ──► done

There is no limit on the messages outstanding: dm-user.c's 128-message
mempool (:data:`MESSAGE_POOL_RESERVE`) is a reserve that
``mempool_alloc(GFP_NOIO)`` never lets fail, so ``user_map`` never requeues.
A daemon bounds its own concurrency.

A BIO of a type the target does not forward, or carrying a flag
``bio_flags_to_user_flags()`` does not map (CGROUP_PUNT, HIPRI, DRV, SWAP,
anything unknown), is killed at submit: never a message, no seq. Like every
failure it ends with ``bio.error`` = ``EIO`` (``DM_MAPIO_KILL`` completes it
with ``BLK_STS_IOERR``); success is 0. Its ``on_complete`` callback, if set,
runs once, at that moment.

Before a daemon holds the target open, each message waits for one from the
moment it was mapped (``daemon_timeout``, dm-user.c's per-message delayed
work) and fails then only if no channel is open at that moment.

One quirk of dm-user.c is kept on purpose: a BIO queued before any daemon
attached whose timeout then expired *while* a channel was open (so it was
not failed) is never re-armed: if the last channel closes before anyone
reads it, it stays queued (a later channel can still serve it), and if the
target is then removed it never completes at all.
"""

from __future__ import annotations

import enum
import errno
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from dmuserd.protocol._constants import (
    DEFAULT_DAEMON_TIMEOUT_MS,
    FORWARDED_FLAGS,
    FORWARDED_TYPES,
    HEADER_SIZE,
    RequestType,
    ResponseType,
)
from dmuserd.protocol._errors import KernelError
from dmuserd.protocol._message import HEADER_STRUCT as _HEADER

if TYPE_CHECKING:
    from dmuserd.protocol._shm import Buffer

_READ, _WRITE = RequestType.READ, RequestType.WRITE
_SUCCESS = int(ResponseType.SUCCESS)
_NOT_FORWARDED_FLAGS = ~FORWARDED_FLAGS


class _WouldBlock:
    def __repr__(self) -> str:
        return "WOULD_BLOCK"


#: :meth:`Channel.read` found nothing queued: the real ``read()`` would sleep.
WOULD_BLOCK = _WouldBlock()


class BioState(enum.Enum):
    NEW = "new"  # not submitted yet
    QUEUED = "queued"  # a message waiting for a channel to read it
    READING = "reading"  # a channel has read part of it
    AWAITING = "awaiting"  # fully read; its channel owes a response
    ANSWERING = "answering"  # the response header arrived, its payload is coming
    DONE = "done"


@dataclass(eq=False, slots=True)
class Bio:
    """One block I/O submitted to the target.

    For a WRITE, ``data`` is the payload handed to the daemon. For a READ it
    is the caller's writable buffer, which the daemon's payload fills; a
    caller that gives none finds the payload in ``data`` once the BIO
    succeeded. A payload the daemon writes whole from an immutable ``bytes``
    is then taken as it is, not copied: the model's stand-in for the kernel
    copying straight into the BIO's pages.
    """

    type: RequestType
    sector: int
    length: int
    flags: int = 0
    data: bytearray | bytes | memoryview | None = None
    on_complete: Callable[["Bio"], None] | None = None
    seq: int | None = None
    state: BioState = BioState.NEW
    error: int | None = None
    deadline: float | None = None
    #: bytes of the message (header, then write payload) a channel has read
    posn_to_user: int = 0
    #: bytes of the response (header, then read payload) a channel has written
    posn_from_user: int = 0
    channel: "Channel | None" = field(default=None, repr=False)
    #: dm-user.c's ``message.delayed``: a "no daemon" timer was armed for this
    #: message. It stays set after the timer fired (``deadline`` is then None).
    delayed: bool = False

    @property
    def done(self) -> bool:
        return self.state is BioState.DONE

    def _header(self) -> bytes:
        return _HEADER.pack(self.seq, int(self.type), self.flags, self.sector, self.length)


# Enum members looked up once: an attribute of an enum class costs ~0.1 µs.
_QUEUED, _READING = BioState.QUEUED, BioState.READING
_AWAITING, _ANSWERING, _DONE = BioState.AWAITING, BioState.ANSWERING, BioState.DONE


class KernelTarget:
    """One dm-user target: its message queue, its channels, its timers.

    ``daemon_timeout`` is ``dm_user_daemon_timeout_msec`` in seconds.
    ``on_queue`` (optional) is called whenever a message becomes readable or
    the target is destroyed: the moment a blocked ``read()`` would wake.
    """

    def __init__(
        self,
        *,
        daemon_timeout: float = DEFAULT_DAEMON_TIMEOUT_MS / 1000,
        on_queue: Callable[[], None] | None = None,
    ) -> None:
        self.daemon_timeout = daemon_timeout
        self.on_queue = on_queue
        self.next_seq = 0
        self.destroyed = False
        #: set when the last channel closed; never cleared (as in dm-user.c)
        self.daemon_terminated = False
        self.channels: set[Channel] = set()
        self._queue: deque[Bio] = deque()
        self._outstanding = 0

    # -- the block layer's side -------------------------------------------

    @property
    def outstanding(self) -> int:
        """Messages allocated (queued, being read, or awaiting an answer): any number."""
        return self._outstanding

    @property
    def daemon_present(self) -> bool:
        """A daemon holds the target open: queued messages wait for it, no timer runs."""
        return self._user_thread_present()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, bio: Bio, now: float) -> Bio:
        """Hand a BIO to the target (``user_map``): it becomes a message, or is killed."""
        kind = bio.type
        if kind == _WRITE:
            if bio.data is None or _nbytes(bio.data) != bio.length:
                raise ValueError("a WRITE bio needs data of exactly its length in bytes")
        elif kind == _READ and bio.data is not None:
            view = memoryview(bio.data)
            if view.nbytes != bio.length or view.readonly:
                raise ValueError("a READ bio's data must be a writable buffer of exactly its length")
        if self.destroyed:
            self._complete(bio, errno.EIO)
        elif kind not in FORWARDED_TYPES or bio.flags & _NOT_FORWARDED_FLAGS:
            # bio_type_to_user_type() or bio_flags_to_user_flags() said
            # -EOPNOTSUPP: DM_MAPIO_KILL, and dm core ends the BIO with an I/O error.
            self._complete(bio, errno.EIO)
        else:
            self._map(bio, now)
        return bio

    def _map(self, bio: Bio, now: float) -> None:
        self._outstanding += 1
        bio.seq = self.next_seq
        self.next_seq += 1
        bio.state = _QUEUED
        self._queue.append(bio)
        if not self._user_thread_present():
            # enqueue_delayed_work(m, !daemon_terminated)
            bio.delayed = True
            if self.daemon_terminated:
                # The daemon died: a zero delay, nobody will come back for this I/O.
                self._fail_queued(bio)
                return
            bio.deadline = now + self.daemon_timeout
        if self.on_queue:
            self.on_queue()

    def advance(self, now: float) -> list[Bio]:
        """Let time pass: fail queued BIOs whose wait for a daemon ran out.

        A timer that fires while a channel is open does nothing and is spent:
        it is never armed again for that message.
        """
        failed = []
        for bio in list(self._queue):
            if bio.deadline is not None and bio.deadline <= now:
                # process_delayed_work(): the timer is spent either way (and
                # ``delayed`` stays set, as in dm-user.c).
                bio.deadline = None
                if not self._user_thread_present():
                    self._fail_queued(bio)
                    failed.append(bio)
        return failed

    def next_deadline(self) -> float | None:
        """When :meth:`advance` next has something to do, or None."""
        deadlines = [b.deadline for b in self._queue if b.deadline is not None]
        return min(deadlines) if deadlines else None

    def destroy(self, now: float) -> None:
        """``dmsetup remove`` (``user_dtr``): reads now fail with ENOTBLK.

        DM's reference to the target goes away; as in dm-user.c, queued
        messages then fail once at most one channel remains (the kernel
        counts references, and DM's no longer counts), and all of them when
        the last channel closes.
        """
        if self.destroyed:
            return
        self.destroyed = True
        self._target_put()
        if self.on_queue:
            self.on_queue()

    def open_channel(self) -> "Channel":
        """``open("/dev/dm-user/NAME")``."""
        if self.destroyed:
            raise KernelError(errno.ENOENT, "the target was removed")
        channel = Channel(self)
        self.channels.add(channel)
        return channel

    # -- internals -----------------------------------------------------------

    def _references(self) -> int:
        """``kref_read(&t->references)``: DM's (until destroyed) plus one per channel."""
        return len(self.channels) + (0 if self.destroyed else 1)

    def _user_thread_present(self) -> bool:
        """``is_user_space_thread_present()``, off by one after destroy as in dm-user.c."""
        # _references() > 1, spelt out: this runs for every message.
        return len(self.channels) > (1 if self.destroyed else 0)

    def _target_put(self) -> None:
        """``target_put()`` after a reference went away (a channel or DM's)."""
        if self._references() == 0:
            self._release()
        elif not self._user_thread_present():
            # The daemon terminated: every queued message with no timer armed
            # gets a zero-delay one, which finds no daemon and fails it.
            self.daemon_terminated = True
            for bio in list(self._queue):
                if not bio.delayed and bio.state is BioState.QUEUED:
                    bio.delayed = True
                    self._fail_queued(bio)

    def _fail_queued(self, bio: Bio) -> None:
        self._queue.remove(bio)
        self._finish(bio, errno.EIO)

    def _release(self) -> None:
        # target_release: nothing can ever read these. A message whose timer
        # already fired (while a daemon was attached) is skipped, because
        # cancel_delayed_work_sync() returns false for it: dm-user.c leaks it
        # and its BIO never completes. The model keeps that.
        for bio in list(self._queue):
            if bio.state is BioState.QUEUED and not (bio.delayed and bio.deadline is None):
                self._fail_queued(bio)

    def _take(self) -> Bio:
        bio = self._queue.popleft()
        bio.deadline = None
        return bio

    def _finish(self, bio: Bio, error: int) -> None:
        """A message ends: its BIO completes and the message is freed."""
        self._outstanding -= 1
        self._complete(bio, error)

    def _complete(self, bio: Bio, error: int) -> None:
        bio.state = _DONE
        bio.error = error
        bio.channel = None
        if bio.on_complete:
            bio.on_complete(bio)

    def _channel_closed(self, channel: "Channel") -> None:
        self.channels.discard(channel)
        self._target_put()


class Channel:
    """One open file of ``/dev/dm-user/NAME``."""

    def __init__(self, target: KernelTarget) -> None:
        self.target = target
        self.closed = False
        self._to_user_error = 0
        self._from_user_error = 0
        self._reading: Bio | None = None
        self._awaiting: dict[int, Bio] = {}
        self._scratch = bytearray()  # a response header being assembled
        self._answering: Bio | None = None

    @property
    def awaiting(self) -> int:
        """Messages this channel has read and not answered."""
        return len(self._awaiting)

    def read(self, size: int) -> bytes | _WouldBlock:
        """``read(fd, size)``: bytes, :data:`WOULD_BLOCK`, or :class:`KernelError`.

        One call returns (the rest of) the header or (part of) the WRITE
        payload, never both. As in dm-user.c, even a zero-byte read takes the
        next message for this channel (or fails with ENOTBLK after destroy).
        """
        if self.closed:
            self._check_open()
        if self._to_user_error:
            raise KernelError(self._to_user_error, "this channel's reads failed before")
        if size < 0:
            raise ValueError("a read size cannot be negative")
        bio = self._reading
        if bio is None:
            target = self.target
            if target.destroyed:
                self._to_user_error = errno.ENOTBLK
                raise KernelError(errno.ENOTBLK, "the target was removed")
            if not target._queue:
                return WOULD_BLOCK
            bio = self._reading = target._take()
            bio.state = _READING
            bio.channel = self
        if size == 0:
            return b""
        posn = bio.posn_to_user
        if posn < HEADER_SIZE:
            out = _HEADER.pack(bio.seq, bio.type, bio.flags, bio.sector, bio.length)
            if posn or size < HEADER_SIZE:
                out = out[posn : posn + size]
        else:
            start = posn - HEADER_SIZE
            data = bio.data
            if start == 0 and size >= bio.length and type(data) is bytes:
                out = data  # immutable: the whole payload needs no copy
            else:
                out = bytes(_byte_view(data)[start : start + size])  # type: ignore[arg-type]  # a WRITE's payload
        posn = bio.posn_to_user = posn + len(out)
        if posn == (HEADER_SIZE + bio.length if bio.type == _WRITE else HEADER_SIZE):
            self._reading = None
            bio.state = _AWAITING
            self._awaiting[bio.seq] = bio  # type: ignore[index]  # a submitted BIO has its seq
        return out

    def readinto(self, buffer: Buffer) -> int | _WouldBlock:
        """``read()`` into a buffer; returns the count in bytes (or raises, or WOULD_BLOCK)."""
        view = _byte_view(buffer)
        data = self.read(len(view))
        if isinstance(data, _WouldBlock):
            return data
        view[: len(data)] = data
        return len(data)

    def write(self, data: Buffer) -> int:
        """``write(fd, data)``: the count of bytes taken, or :class:`KernelError`.

        Takes one response at most per call (like the kernel): the caller
        writes the rest of its buffer again, as it would after a short write.
        """
        if self.closed:
            self._check_open()
        if self._from_user_error:
            raise KernelError(self._from_user_error, "this channel is in an error state")
        view = _byte_view(data)
        taken = 0
        bio = self._answering
        if bio is None:
            header: memoryview | bytearray
            if not self._scratch and len(view) >= HEADER_SIZE:
                header = view  # the whole header in this write: no assembling
            else:
                chunk = view[: HEADER_SIZE - len(self._scratch)]
                if not len(chunk):
                    # msg_copy_from_iov() copied nothing: dm-user.c sets the error
                    # and returns 0 for this call; every later write fails EINVAL.
                    self._from_user_error = errno.EINVAL
                    return 0
                self._scratch += chunk
                if len(self._scratch) < HEADER_SIZE:
                    return len(chunk)
                header = self._scratch
            seq, rtype, _flags, _sector, _len = _HEADER.unpack_from(header)
            self._scratch.clear()
            taken = HEADER_SIZE if header is view else len(chunk)
            bio = self._awaiting.pop(seq, None)
            if bio is None:
                # Accepted once, then the channel is poisoned (dm-user.c).
                self._from_user_error = errno.EINVAL
                return taken
            if rtype != _SUCCESS:
                self.target._finish(bio, errno.EIO)
                return taken
            if bio.type != _READ:
                self.target._finish(bio, 0)
                return taken
            bio.state = _ANSWERING
            bio.posn_from_user = HEADER_SIZE
            self._answering = bio
        length = bio.length
        start = bio.posn_from_user - HEADER_SIZE
        chunk = view[taken : taken + length - start]
        count = len(chunk)
        if count:
            if bio.data is None:
                if count == length and type(view.obj) is bytes:
                    bio.data = chunk  # immutable and whole: taken, not copied
                else:
                    bio.data = bytearray(length)
            if bio.data is not chunk:
                bio.data[start : start + count] = chunk  # type: ignore[index]  # the caller's buffer, or ours
            bio.posn_from_user += count
            taken += count
        if start + count == length:
            if bio.data is None:
                bio.data = b""  # a zero-length READ
            self._answering = None
            self.target._finish(bio, 0)
        return taken

    def write_all(self, data: Buffer) -> None:
        """Write ``data`` completely, continuing after short writes."""
        taken = 0
        if type(data) is bytes:  # the usual case: whole in one write
            if not data or (taken := self.write(data)) == len(data):
                return
        view = _byte_view(data)[taken:]
        while len(view):
            view = view[self.write(view) :]

    def close(self) -> None:
        """``close(fd)``: what this channel owned fails with EIO."""
        if self.closed:
            return
        self.closed = True
        owned = list(self._awaiting.values())
        if self._reading is not None:
            owned.append(self._reading)
        if self._answering is not None:
            owned.append(self._answering)
        self._reading = self._answering = None
        self._awaiting.clear()
        for bio in owned:
            self.target._finish(bio, errno.EIO)
        self.target._channel_closed(self)

    def _check_open(self) -> None:
        if self.closed:
            raise KernelError(errno.EBADF, "the channel is closed")


def _byte_view(data: Buffer) -> memoryview:
    """``data`` as a flat view of bytes: lengths and offsets count bytes, never items."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _nbytes(data: Buffer) -> int:
    return len(data) if type(data) is bytes else memoryview(data).nbytes
