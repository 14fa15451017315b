"""The ``dm-user`` export: serve ``/dev/dm-user/NAME`` on a kernel with dm-user.

``--export dm-user:NAME[,channels=4][,create=1][,size=S]``

Each *channel* is one ``open()`` of the misc device. The device has no
``poll()``, so every channel has a thread of its own that blocks in
``read()``: it reads one whole message (the 40-byte header, continuing after
short reads, then a WRITE's payload in further reads, as the kernel hands it
out) and passes it to trio, where :func:`~dmuserd.daemon.channels.serve_channel`
runs it through the target's dispatcher. A WRITE longer than the daemon's
I/O limit (the kernel has none) is passed on in bounded pieces, which the
connection drops, and answered ERROR. Responses are written from trio on
the channel that received the request (the kernel demands it) with one
``writev()`` of header and payload, continued after a short write. A write
never waits for the daemon side: the kernel copies it and completes the BIO.

A channel whose reads fail with ENOTBLK has seen the target removed and ends
quietly. Any other failure (a read or write error, a protocol violation) is
logged and the channel is replaced: the new one is opened first (so the
kernel never sees the daemon gone), then the old one is given up at once,
even while its thread is blocked in ``read()`` (see :class:`_ChannelFd`): the
kernel fails with EIO what it had taken and not answered, as it does when a
channel closes, and its thread takes no more messages.

With ``create=1`` the export creates the device-mapper table itself (of
``size`` bytes, default the backend's size) and removes it when it stops;
otherwise ``/dev/dm-user/NAME`` must exist already (``dmuserd dm create``,
``dmsetup create``, or Android's init) and is left in place. Attaching to it
needs no ``dmsetup``: the table's size comes from sysfs.

Refused at start, because they would make READ errors routine (each fails
the caller with EIO and trips a ``WARN_ON`` in dm-user.c, a panic where
``panic_on_warn`` is set): a backend whose block size is not 512 bytes (the
dm-user device has 512-byte logical blocks, so reads smaller than a block
would reach it), and an existing table larger than the backend (udev and
partition probes read the device's last sectors).
"""

from __future__ import annotations

import errno
import os
import signal
import threading

import structlog
import trio

from dmuserd.backends.options import Options
from dmuserd.daemon.channels import serve_channel
from dmuserd.daemon.config import ConfigError
from dmuserd.daemon.export import Export
from dmuserd.daemon.dmsetup import (
    DmError,
    check_name,
    create_user_target_async,
    mapper_path,
    misc_path,
    remove_target_async,
    table_size,
)
from dmuserd.protocol import DEFAULT_MAX_IO, HEADER_SIZE, HEADER_STRUCT, SECTOR_SIZE, RequestType

log = structlog.get_logger("dmuserd.dmuser")

DEFAULT_CHANNELS = 4
#: Longest pause between attempts to reopen a failed channel.
MAX_REOPEN_DELAY = 5.0
#: How long a stop waits for ``dmsetup remove`` of a table it created.
REMOVE_TIMEOUT = 15.0
#: An oversized WRITE's payload reaches trio in pieces of at most this many bytes.
PAYLOAD_PIECE = 1 << 20
#: Interrupts a reader thread's blocked ``read()`` when its channel is given up.
#: Its default action is to ignore it, so a process that did not install
#: :func:`install_wake_handler` loses nothing if it arrives.
WAKE_SIGNAL = signal.SIGURG

_HEADER = HEADER_STRUCT
_WRITE = int(RequestType.WRITE)
_devnull_fd: int | None = None


def _on_wake(signum, frame) -> None:
    """Nothing to do: the signal's work is done by interrupting a system call."""


def install_wake_handler() -> bool:
    """Let :data:`WAKE_SIGNAL` interrupt a blocked ``read()``; False if it cannot.

    A handler (unlike the default, ignoring) makes the kernel end an
    interruptible wait with EINTR: Python installs its handlers without
    ``SA_RESTART``. Only the main thread may install one; a handler someone
    else installed serves as well, an explicit SIG_IGN does not.
    """
    current = signal.getsignal(WAKE_SIGNAL)
    if current is signal.SIG_IGN:
        return False
    if current is not signal.SIG_DFL:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(WAKE_SIGNAL, _on_wake)
    return True


def _devnull() -> int:
    global _devnull_fd
    if _devnull_fd is None:
        _devnull_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return _devnull_fd


class _ChannelFd:
    """A channel's file descriptor: shared by its reader thread and trio, given up at once.

    The thread may sit in ``read()`` long after trio gave the channel up:
    only a message, the table's removal or a signal wakes it. The kernel
    fails what a channel holds only when its file's last reference goes
    (``dev_release``), and a ``read()`` in progress holds one. Closing the
    number alone would neither release the file nor be safe (the number
    could be reused under the thread's next read). So :meth:`give_up`:

    * closes the fd if the thread is done with it;
    * otherwise points the number at ``/dev/null`` (``dup2``): the dm-user
      file loses its fd-table reference, and any later read on the number
      returns 0 at once; then interrupts the thread's read with
      :data:`WAKE_SIGNAL`. That read ends (EINTR; Python retries it on the
      number and gets 0), its reference goes, and the kernel releases the
      channel, failing with EIO everything it held, a message that read just
      took included.

    The thread, finding :attr:`given_up`, stops and closes the number.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.given_up = False
        self._lock = threading.Lock()
        self._trio_holds = True
        self._reader_holds = True
        self._reader: int | None = None  # the reader thread's id, once it runs

    def reader_started(self) -> None:
        with self._lock:
            self._reader = threading.get_ident()

    def reader_done(self) -> None:
        """The reader thread lets go (the fd closes if trio did already)."""
        with self._lock:
            self._reader_holds = False
            self._reader = None
            last = not self._trio_holds
        if last:
            os.close(self.fd)

    def give_up(self) -> None:
        """Trio lets go: the channel is released now, whatever the thread is doing."""
        with self._lock:
            if not self._trio_holds:
                return
            self._trio_holds = False
            self.given_up = True
            if not self._reader_holds:
                os.close(self.fd)
                return
            os.dup2(_devnull(), self.fd, inheritable=False)
            if self._reader is not None:  # (the lock keeps the thread from exiting meanwhile)
                signal.pthread_kill(self._reader, WAKE_SIGNAL)


def _writev_all(fd: int, buffers) -> None:
    """Write every buffer, continuing after short writes (lengths in bytes, whatever the item size)."""
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
        self._fd = _ChannelFd(os.open(path, os.O_RDWR | os.O_CLOEXEC))
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
        """Yield one message as read: the header with its WRITE payload, or an oversized payload in pieces."""
        message = bytearray(HEADER_SIZE)
        self._read_into(memoryview(message))
        _seq, kind, _flags, _sector, length = _HEADER.unpack(message)
        if kind != _WRITE or length == 0:
            yield message
        elif length <= DEFAULT_MAX_IO:
            message += bytes(length)
            self._read_into(memoryview(message)[HEADER_SIZE:])
            yield message
        else:
            # Longer than any buffer the daemon keeps: the connection drops it
            # piece by piece and the request is answered ERROR.
            yield message
            while length:
                piece = bytearray(min(length, PAYLOAD_PIECE))
                self._read_into(memoryview(piece))
                length -= len(piece)
                yield piece

    def _reader(self) -> None:
        self._fd.reader_started()
        try:
            while True:
                for item in self._read_message():
                    if not self._hand_over(item):
                        return
        except OSError as exc:
            if not self._fd.given_up:
                self._hand_over(exc)
        finally:
            self._fd.reader_done()

    def _hand_over(self, item) -> bool:
        """Pass bytes (or the read's error) to trio; False once the channel is given up."""
        if not self._fd.given_up:
            try:
                trio.from_thread.run(self._send.send, item, trio_token=self._token)
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError, trio.Cancelled):
                pass
        if not isinstance(item, OSError):
            log.warning("a request arrived on a channel being given up: it fails with EIO", channel=self.label)
        return False

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
        """Give the channel up now: the kernel fails what it holds (see :class:`_ChannelFd`)."""
        self._receive.close()
        self._fd.give_up()


class DmUserDevice:
    """Serve ``/dev/dm-user/NAME`` with ``channels`` channels until cancelled."""

    #: What opens a channel (a test passes a subclass that fails on purpose).
    channel_type = DevChannel

    def __init__(self, name: str, dispatcher, *, channels: int = DEFAULT_CHANNELS,
                 remove_on_stop: bool = False) -> None:
        self.name = name
        self.path = misc_path(name)
        self.dispatcher = dispatcher
        self.channel_count = channels
        self.remove_on_stop = remove_on_stop
        self.reopened = 0
        self._log = log.bind(device=dispatcher.name, dm_user=name)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Open every channel (then report started) and serve them.

        Returns when every channel has seen the target removed. On the way
        out a table this export created is removed.
        """
        if not install_wake_handler():
            self._log.warning("cannot install a handler for the wake signal: a failed channel's reader "
                              "thread lets go only when the next request arrives", signal=WAKE_SIGNAL.name)
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
            return self.channel_type(self.path, label)
        except FileNotFoundError:
            raise DmError(f"{self.path} does not exist: create the table first "
                          f"(dmuserd dm create {self.name} --size SIZE) or add create=1 to the export") from None
        except OSError as exc:
            raise DmError(f"cannot open {self.path}: {exc.strerror}") from None

    async def _serve_slot(self, index: int, channel: DevChannel) -> None:
        """Serve one channel; when it fails, open its replacement, then give the old one up.

        In that order because the kernel takes a target whose last channel
        closed for one whose daemon is gone and fails new I/O at once: a
        one-channel export stays attached throughout. Giving the old channel
        up fails with EIO what it had taken and not answered.
        """
        label = channel.label
        delay = 0.05
        try:
            while True:
                await serve_channel(channel, self.dispatcher, name=label, surface="dm-user-channel")
                if channel.removed:
                    return
                self._log.error("dm-user channel failed: reopening it", channel=label,
                                error=str(channel.error or "protocol error (see above)"))
                replacement = await self._reopen(label)
                channel.close()
                if replacement is None:
                    return
                channel = replacement
                self.reopened += 1
                await trio.sleep(delay)  # (a channel that fails again at once does not spin)
                delay = min(delay * 2, MAX_REOPEN_DELAY)
        finally:
            channel.close()

    async def _reopen(self, label: str) -> DevChannel | None:
        """A new channel for ``label``, retried with back-off; None once the target is gone."""
        delay = 0.05
        while True:
            try:
                return self._open(label)
            except DmError as exc:
                if not os.path.exists(self.path):
                    self._log.info("dm-user target gone: channel ends", channel=label)
                    return None
                self._log.error("reopening the dm-user channel failed", channel=label, error=str(exc))
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_REOPEN_DELAY)


def _check_block_size(export, backend) -> None:
    """Refuse a backend the dm-user device's 512-byte logical blocks do not fit."""
    if backend.block_size != SECTOR_SIZE:
        raise ConfigError(
            f"export {export}: the backend's block size is {backend.block_size} bytes, but a dm-user device has "
            f"{SECTOR_SIZE}-byte logical blocks: every smaller read would fail with EIO and trip dm-user's WARN_ON. "
            f"Export a {SECTOR_SIZE}-byte-block backend over dm-user, or this one over fuse or nbd")


def _check_existing_table(export, name: str, backend_size: int) -> None:
    """Refuse a table larger than the backend; its size comes from sysfs (no dmsetup needed)."""
    existing = table_size(name)
    if existing is None:
        log.info("the dm-user table's size is unknown (sysfs lists no device of that name): not checked", name=name)
    elif existing > backend_size:
        raise ConfigError(
            f"export {export}: the dm-user table {name} is {existing} bytes, larger than the backend "
            f"({backend_size} bytes): every read past the backend's end (udev and partition probes read the last "
            f"sectors) would fail with EIO and trip dm-user's WARN_ON. Recreate the table: "
            f"dmuserd dm remove {name} && dmuserd dm create {name} --size {backend_size}")


class DmUserExport(Export):
    """``--export dm-user:NAME[,channels=4][,create=1][,size=S]`` (see the module doc)."""

    kind = "dm-user"

    def __init__(self, spec, host, *, channels: int, create: bool, size: int | None) -> None:
        super().__init__(spec, host)
        self.name = spec.where
        self.channels = channels
        self.create = create
        self.size = size
        self.device: DmUserDevice | None = None

    @classmethod
    def from_spec(cls, spec, host) -> DmUserExport:
        opts = Options(str(spec), spec.options, kind="export", error=ConfigError)
        channels = opts.int("channels", DEFAULT_CHANNELS, min=1, max=64)
        create = opts.bool("create")
        size = opts.size("size")
        opts.finish("channels=N, create=1, size=SIZE")
        return cls(spec, host, channels=channels, create=create, size=size)

    async def start(self, target, nursery: trio.Nursery) -> str:
        """Attach ``target`` to ``/dev/dm-user/NAME``, creating the table first with ``create=1``."""
        export, backend = self.spec, target.backend
        name = check_name(self.name)
        size = backend.size if self.size is None else self.size
        if size > backend.size:
            raise ConfigError(f"export {export}: size {size} is larger than the backend ({backend.size} bytes)")
        _check_block_size(export, backend)
        if self.create:
            await create_user_target_async(name, size)
        else:
            _check_existing_table(export, name, backend.size)
        self.device = DmUserDevice(name, target.dispatcher, channels=self.channels, remove_on_stop=self.create)
        await nursery.start(self._serve)
        return mapper_path(name)

    async def _serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.device.run(task_status=task_status)  # (a table it created is removed if this fails)
        finally:
            self.endpoint = None  # the target was removed: the export has ended

    def status(self) -> dict:
        device = self.device
        return {} if device is None else {"channels": device.channel_count, "reopened": device.reopened}
