"""The ``dm-user`` export: serve ``/dev/dm-user/NAME`` on a kernel with dm-user.

``--export dm-user:NAME[,channels=4][,create=1][,size=S]``

Each *channel* is one ``open()`` of the misc device. The device has no
``poll()``, so every channel has a thread of its own that blocks in
``read()``: it reads one whole message (the 40-byte header, continuing after
short reads, then a WRITE's payload in further reads, as the kernel hands it
out) and passes it to trio, where :func:`~dmuserd.daemon.channels.serve_channel`
runs it through the target's dispatcher. Responses are written from trio on
the channel that received the request (the kernel demands it) with one
``writev()`` of header and payload, continued after a short write. A write
never waits for the daemon side: the kernel copies it and completes the BIO.

A channel whose reads fail with ENOTBLK has seen the target removed and ends
quietly. Any other failure (a read or write error, a protocol violation) is
logged and the channel is reopened; what the old channel had taken and not
answered fails with EIO, as the kernel does when a channel closes.

With ``create=1`` the export creates the device-mapper table itself (of
``size`` bytes, default the backend's size) and removes it when it stops;
otherwise ``/dev/dm-user/NAME`` must exist already (``dmuserd dm create``,
``dmsetup create``, or Android's init) and is left in place.

A thread blocked in ``read()`` cannot be woken except by a message or the
table's removal, so when a daemon that did not create the table stops, its
reader threads stay blocked until the process exits (they are daemon
threads). A message they take meanwhile fails with EIO when their channel
closes: the kernel's behaviour for a daemon that went away.
"""

from __future__ import annotations

import errno
import os
import struct
import threading

import structlog
import trio

from dmuserd.backends.options import parse_bool, parse_size
from dmuserd.daemon.channels import DEFAULT_MAX_IN_FLIGHT, serve_channel
from dmuserd.daemon.config import ConfigError
from dmuserd.daemon.dmsetup import (
    DmError,
    check_name,
    create_user_target_async,
    mapper_path,
    misc_path,
    remove_target_async,
    table_size_async,
)
from dmuserd.protocol import DEFAULT_MAX_IO, HEADER_SIZE, RequestType

log = structlog.get_logger("dmuserd.dmuser")

DEFAULT_CHANNELS = 4
#: Longest pause between attempts to reopen a failed channel.
MAX_REOPEN_DELAY = 5.0
#: How long a stop waits for ``dmsetup remove`` of a table it created.
REMOVE_TIMEOUT = 15.0

_HEADER = struct.Struct("<5Q")


class _SharedFd:
    """A file descriptor closed when its last user lets go.

    The reader thread and the trio side both use a channel's fd; the thread
    may stay blocked in ``read()`` long after trio gave the channel up, and
    closing the number under it could hand a reused fd to its next read.
    """

    def __init__(self, fd: int, users: int) -> None:
        self.fd = fd
        self._users = users
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            os.close(self.fd)


def _writev_all(fd: int, buffers) -> None:
    """Write every buffer, continuing after short writes."""
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if len(v)]
    while views:
        done = os.writev(fd, views)
        if done <= 0:
            raise OSError(errno.EIO, "the dm-user channel took no bytes of a response")
        while done:
            if done >= len(views[0]):
                done -= len(views.pop(0))
            else:
                views[0] = views[0][done:]
                done = 0


class DevChannel:
    """One open file of ``/dev/dm-user/NAME``: a reader thread and a transport.

    The transport side (:meth:`receive_some`, :meth:`send_all`) is what
    :func:`serve_channel` needs. After it ends, :attr:`removed` says the
    target was removed and :attr:`error` holds the failure that ended it.
    """

    def __init__(self, path: str, label: str) -> None:
        self.path = path
        self.label = label
        self._fd = _SharedFd(os.open(path, os.O_RDWR | os.O_CLOEXEC), users=2)
        self._send, self._receive = trio.open_memory_channel(0)
        self._token = trio.lowlevel.current_trio_token()
        self._pending = memoryview(b"")
        self.removed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._reader, name=f"dm-user {label}", daemon=True)
        self._thread.start()

    # -- the reader thread ---------------------------------------------------

    def _read_into(self, view: memoryview) -> None:
        while len(view):
            got = os.readv(self._fd.fd, [view])
            if got <= 0:
                raise OSError(errno.EIO, "read() on the dm-user channel returned no bytes")
            view = view[got:]

    def _read_message(self):
        message = bytearray(HEADER_SIZE)
        self._read_into(memoryview(message))
        _seq, kind, _flags, _sector, length = _HEADER.unpack(message)
        if kind == RequestType.WRITE and 0 < length <= DEFAULT_MAX_IO:
            # (a larger length is a protocol error serve_channel reports)
            message += bytes(length)
            self._read_into(memoryview(message)[HEADER_SIZE:])
        return message

    def _reader(self) -> None:
        try:
            while True:
                try:
                    item = self._read_message()
                except OSError as exc:
                    item = exc
                try:
                    trio.from_thread.run(self._send.send, item, trio_token=self._token)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError, trio.Cancelled):
                    if not isinstance(item, OSError):
                        log.warning("a request arrived on a channel being closed: it fails with EIO",
                                    channel=self.label)
                    return
                if isinstance(item, OSError):
                    return
        finally:
            self._fd.release()

    # -- the transport -------------------------------------------------------

    async def receive_some(self, max_bytes: int) -> bytes:
        if not len(self._pending):
            try:
                item = await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return b""
            if isinstance(item, OSError):
                if item.errno == errno.ENOTBLK:
                    self.removed = True
                else:
                    self.error = item
                return b""
            self._pending = memoryview(item)
        data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return data

    async def send_all(self, buffers: list) -> None:
        if self.error is not None or self.removed:
            raise trio.ClosedResourceError(f"channel {self.label} has failed")
        try:
            _writev_all(self._fd.fd, buffers)
        except OSError as exc:
            # EINVAL: the kernel put this channel in its error state; give it up.
            self.error = exc
            self._receive.close()
            raise

    def close(self) -> None:
        """Give the channel up (the fd closes once the reader thread is done too)."""
        self._receive.close()
        self._fd.release()


class DmUserDevice:
    """Serve ``/dev/dm-user/NAME`` with ``channels`` channels until cancelled."""

    def __init__(self, name: str, dispatcher, *, channels: int = DEFAULT_CHANNELS,
                 remove_on_stop: bool = False, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self.name = name
        self.path = misc_path(name)
        self.dispatcher = dispatcher
        self.channel_count = channels
        self.remove_on_stop = remove_on_stop
        self.limiter = trio.CapacityLimiter(max_in_flight)
        self.reopened = 0
        self._log = log.bind(device=dispatcher.name, dm_user=name)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Open every channel (then report started) and serve them.

        Returns when every channel has seen the target removed. On the way
        out a table this export created is removed.
        """
        try:
            channels = []
            try:
                for index in range(self.channel_count):
                    channels.append(self._open(f"{self.name}#{index}"))
            except BaseException:
                for channel in channels:
                    channel.close()
                raise
            async with trio.open_nursery() as nursery:
                for index, channel in enumerate(channels):
                    nursery.start_soon(self._serve_slot, index, channel)
                self._log.info("dm-user attached", path=self.path, channels=self.channel_count)
                task_status.started()
            self._log.info("dm-user target removed: the export ends", path=self.path)
        finally:
            if self.remove_on_stop and os.path.exists(self.path):  # (not removed by someone else)
                with trio.CancelScope(shield=True), trio.move_on_after(REMOVE_TIMEOUT):
                    try:
                        await remove_target_async(self.name)
                        self._log.info("dm-user table removed", name=self.name)
                    except DmError as exc:
                        self._log.error("removing the dm-user table failed", error=str(exc))

    def _open(self, label: str) -> DevChannel:
        try:
            return DevChannel(self.path, label)
        except FileNotFoundError:
            raise DmError(f"{self.path} does not exist: create the table first "
                          f"(dmuserd dm create {self.name} --size SIZE) or add create=1 to the export") from None
        except OSError as exc:
            raise DmError(f"cannot open {self.path}: {exc.strerror}") from None

    async def _serve_slot(self, index: int, channel: DevChannel) -> None:
        label = channel.label
        delay = 0.05
        while True:
            try:
                await serve_channel(channel, self.dispatcher, self.limiter, name=label, surface="dm-user-channel")
            finally:
                channel.close()
            if channel.removed:
                return
            self._log.error("dm-user channel failed: reopening it", channel=label,
                            error=str(channel.error or "protocol error (see above)"))
            while True:
                await trio.sleep(delay)
                delay = min(delay * 2, MAX_REOPEN_DELAY)
                try:
                    channel = self._open(label)
                    break
                except DmError as exc:
                    if not os.path.exists(self.path):
                        self._log.info("dm-user target gone: channel ends", channel=label)
                        return
                    self._log.error("reopening the dm-user channel failed", channel=label, error=str(exc))
            self.reopened += 1


def _options(export, backend_size: int) -> tuple[int, bool, int]:
    """channels, create, size from the export's options (typed errors)."""
    opts = dict(export.options)
    where = f"export {export}"
    try:
        channels = int(opts.pop("channels", DEFAULT_CHANNELS))
    except ValueError:
        raise ConfigError(f"{where}: channels must be a whole number (e.g. channels=4)") from None
    if not 1 <= channels <= 64:
        raise ConfigError(f"{where}: channels={channels}: use 1 to 64")
    create = parse_bool(opts.pop("create", "0"), what=f"{where} option create")
    size = parse_size(opts.pop("size"), what=f"{where} option size") if "size" in opts else backend_size
    if opts:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(sorted(opts))} (known: channels, create, size)")
    if size > backend_size:
        raise ConfigError(f"{where}: size {size} is larger than the backend ({backend_size} bytes)")
    return channels, create, size


async def start_export(daemon, target, export, nursery) -> None:
    """Attach ``target`` to ``/dev/dm-user/<export.where>`` (see the module doc)."""
    name = check_name(export.where)
    channels, create, size = _options(export, target.backend.size)
    if create:
        await create_user_target_async(name, size)
    else:
        existing = await table_size_async(name)
        if existing is not None and existing > target.backend.size:
            log.warning("the dm-user table is larger than the backend: I/O past its end fails",
                        name=name, table_bytes=existing, backend_bytes=target.backend.size)
    device = DmUserDevice(name, target.dispatcher, channels=channels, remove_on_stop=create)

    async def serve(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await device.run(task_status=task_status)  # (a table it created is removed if this fails)
        finally:
            target.endpoints.pop("dm-user", None)

    await nursery.start(serve)
    target.endpoints["dm-user"] = mapper_path(name)
