"""dm-user on plain Linux: the kernel-target model, served in-process.

The FUSE (and, for tests, any in-process) export does what the block layer
does with a real dm-user device: it submits BIOs to a
:class:`~dmuserd.protocol.KernelTarget`, and the daemon serves the target's
channels, reading each message's bytes from a channel, decoding them with
:class:`~dmuserd.protocol.DaemonConnection`, and writing the response's
bytes back on that channel. So what a FUSE user sees is dm-user's
behaviour: sequence numbers, per-channel ownership, the daemon timeout, no
cap on the messages outstanding in the kernel. What bounds the requests in
the dispatcher is the dispatcher's own admission (``max_in_flight``),
shared by every channel of the device, inline and background alike.

Two kinds of channel serve the target, because handing every BIO to another
task costs more than serving it (a task switch, an event, a wake-up of every
idle reader):

* the **inline channel**: the task that submits a BIO serves the message at
  the head of the queue itself, on one shared channel. It reads a whole
  message with no ``await`` in between and writes a whole response the same
  way, so any number of tasks share the channel without interleaving, the
  way several daemon threads share one file in snapuserd. Several messages
  may be awaiting answers on it at once, as on a real channel.
* ``channels`` **background channels** served by
  :func:`~dmuserd.daemon.channels.serve_channel` (the very code that serves
  ``/dev/dm-user/NAME`` and the NBD plugin's sockets). They take what no
  submitter serves: messages queued while every slot of the dispatcher is
  taken (they read them and wait for a slot), and anything queued while the
  inline channel is gone.

Everything runs in the trio thread; the model's callbacks only set events.
"""

from __future__ import annotations

import errno

import trio

from dmuserd.daemon.channels import refuse_oversized, serve_channel
from dmuserd.daemon.direct import InProcessDevice
from dmuserd.protocol import (
    NEED_DATA,
    WOULD_BLOCK,
    Bio,
    BioState,
    Channel,
    DaemonConnection,
    KernelError,
    KernelTarget,
    OversizedRequest,
    ProtocolError,
    Request,
    RequestType,
    Response,
    ResponseType,
)

_QUEUED, _DONE = BioState.QUEUED, BioState.DONE
_READ = RequestType.READ
_SUCCESS, _ERROR = ResponseType.SUCCESS, ResponseType.ERROR


class _Wakeup:
    """An event that can be waited on again and again."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class ModelChannelTransport:
    """One channel of the model, as a transport for :func:`serve_channel`."""

    def __init__(self, channel: Channel, readable: _Wakeup) -> None:
        self.channel = channel
        self._readable = readable

    async def receive_some(self, max_bytes: int) -> bytes:
        while True:
            try:
                data = self.channel.read(max_bytes)
            except KernelError as exc:
                if exc.errno == errno.ENOTBLK:  # the target was removed
                    return b""
                raise
            if data is not WOULD_BLOCK:
                return data
            await self._readable.wait()

    async def send_all(self, buffers: list) -> None:
        for buffer in buffers:
            self.channel.write_all(buffer)


class EmulatedDmUser(InProcessDevice):
    """A dm-user target and its daemon, both in this process.

    Use :meth:`run` in a nursery (``await nursery.start(device.run)``), then
    :meth:`handle` requests (or :meth:`submit` block I/O) from any trio task.
    """

    def __init__(self, dispatcher, *, channels: int = 4, daemon_timeout: float = 4.0) -> None:
        super().__init__(dispatcher.name)
        self.dispatcher = dispatcher
        self.channel_count = channels
        self._readable = _Wakeup()
        self._timers = _Wakeup()
        self.target = KernelTarget(daemon_timeout=daemon_timeout, on_queue=self._on_queue)
        self._inline: Channel | None = None
        self._inline_conn = DaemonConnection()
        self._submitting = False

    def _on_queue(self) -> None:
        # A submitter serves its own message: waking every background reader
        # for it would only make them find the queue empty again.
        if not self._submitting:
            self._readable.fire()
        # Deadlines exist only while no daemon holds the target open.
        if not self.target.daemon_present or self.target.destroyed:
            self._timers.fire()

    def stop_admitting(self) -> None:
        """A stop is under way: the target is removed, so new I/O fails with EIO at once."""
        if not self.target.destroyed:
            self.target.destroy(trio.current_time())

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Open the channels and serve them until cancelled."""
        channels = [self.target.open_channel() for _ in range(self.channel_count)]
        self._inline = self.target.open_channel()
        self._inline_conn = DaemonConnection()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_timers)
                for index, channel in enumerate(channels):
                    nursery.start_soon(self._serve_background, channel, f"model{index}")
                task_status.started()
        finally:
            inline, self._inline = self._inline, None
            if inline is not None:
                inline.close()
            for channel in channels:
                channel.close()  # (a no-op for those closed already)

    async def _serve_background(self, channel: Channel, name: str) -> None:
        """Serve one background channel until the target is removed.

        A channel that broke (bytes it could not frame, counted by the
        guard) is closed, so that what it held fails with EIO as when a
        daemon's channel closes, and a fresh one takes its place: what
        ``/dev/dm-user`` exports do too.
        """
        try:
            while True:
                await serve_channel(ModelChannelTransport(channel, self._readable), self.dispatcher,
                                    name=name, surface="dm-user-model")
                if self.target.destroyed:
                    return
                channel.close()
                channel = self.target.open_channel()
        finally:
            channel.close()

    async def _run_timers(self) -> None:
        while True:
            deadline = self.target.next_deadline()
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                await self._timers.wait()
            self.target.advance(trio.current_time())

    async def handle(self, req: Request, views: bool = False) -> Response:
        """Submit ``req`` as one BIO and wait for it: SUCCESS (a READ's data), or ERROR (the BIO's EIO)."""
        bio = Bio(req.type, req.sector, req.len, req.flags, req.payload)
        self._submitting = True
        try:
            self.target.submit(bio, trio.current_time())
        finally:
            self._submitting = False
        # Serve messages until ours has been taken by some channel.
        while bio.state is _QUEUED:
            if not self.dispatcher.has_room:
                self._readable.fire()  # every slot is taken: a background channel reads it and waits for one
                break
            # (no await between the check and the dispatcher taking the slot)
            if not await self._serve_inline():
                self._readable.fire()  # the inline channel cannot: wake the others
                break
        if bio.state is not _DONE:
            # Another channel owns it now. Nothing completes it before the
            # await below (one thread), so the callback can be set this late.
            done = trio.Event()
            bio.on_complete = lambda _bio: done.set()
            await done.wait()
        if bio.error:  # always EIO: how the model ends a BIO that failed
            return Response(req.seq, _ERROR)
        if req.type != _READ:
            return Response(req.seq)
        return Response(req.seq, _SUCCESS, [bio.data] if views else bio.data)

    async def _serve_inline(self) -> bool:
        """Read, serve and answer the message at the head of the queue on the inline channel.

        False if the inline channel cannot read one (nothing queued, or the
        channel is gone).
        """
        request = self._take_inline()
        if request is None:
            return False
        channel, conn = self._inline, self._inline_conn  # the request's (replaced only after it, if at all)
        if type(request) is OversizedRequest:
            response = refuse_oversized(self.dispatcher, request, "dm-user-model", conn.max_io, channel="inline")
        else:
            response = await self.dispatcher.handle(request)
        if not channel.closed:  # else closing failed the message
            for buffer in conn.send_response(response):
                channel.write_all(buffer)
        return True

    def _take_inline(self):
        """Read the next whole message on the inline channel: its event, or None if none can be read.

        No ``await`` happens in here, so no other task's message interleaves
        (see the module doc); the caller writes the whole response the same way.
        """
        channel, conn = self._inline, self._inline_conn
        if channel is None or channel.closed:
            return None
        try:
            while True:
                data = channel.read(conn.need_bytes)
                if data is WOULD_BLOCK:
                    return None
                conn.receive_data(data)
                if (request := conn.next_event()) is not NEED_DATA:
                    return request
        except KernelError:
            return None
        except ProtocolError as exc:
            # Bytes no kernel sends (a BIO no block layer builds): the channel
            # is replaced, as a background one is, failing what it held.
            self.dispatcher.guard.reject("dm-user-model", f"protocol-{exc.field}", str(exc), None,
                                         device=self.dispatcher.name, channel="inline")
            channel.close()
            self._inline, self._inline_conn = None, DaemonConnection()
            if not self.target.destroyed:
                self._inline = self.target.open_channel()
            return None
