"""dm-user on plain Linux: the kernel-target model, served in-process.

The FUSE (and, for tests, any in-process) export does what the block layer
does with a real dm-user device: it submits BIOs to a
:class:`~dmuserd.protocol.KernelTarget`, and the daemon serves the target's
channels with the very code that serves ``/dev/dm-user/NAME``
(:func:`~dmuserd.daemon.channels.serve_channel`). So what a FUSE user sees
is dm-user's behaviour: sequence numbers, the 128-message limit, per-channel
ownership, the daemon timeout.

Everything runs in the trio thread; the model's callbacks only set events.
"""

from __future__ import annotations

import errno
import functools

import trio

from dmuserd.daemon.channels import DEFAULT_MAX_IN_FLIGHT, serve_channel
from dmuserd.protocol import WOULD_BLOCK, Bio, Channel, KernelError, KernelTarget, RequestType, SECTOR_SIZE


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


class EmulatedDmUser:
    """A dm-user target and its daemon, both in this process.

    Use :meth:`run` in a nursery (``await nursery.start(device.run)``), then
    :meth:`submit` block I/O from any trio task.
    """

    def __init__(self, dispatcher, *, channels: int = 4, daemon_timeout: float = 4.0,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self.dispatcher = dispatcher
        self.channel_count = channels
        self._readable = _Wakeup()
        self._timers = _Wakeup()
        self.target = KernelTarget(daemon_timeout=daemon_timeout, on_queue=self._on_queue)
        self.limiter = trio.CapacityLimiter(max_in_flight)

    def _on_queue(self) -> None:
        self._readable.fire()
        self._timers.fire()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Open the channels and serve them until cancelled."""
        channels = [self.target.open_channel() for _ in range(self.channel_count)]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_timers)
                for index, channel in enumerate(channels):
                    transport = ModelChannelTransport(channel, self._readable)
                    nursery.start_soon(functools.partial(serve_channel, transport, self.dispatcher, self.limiter, name=f"model{index}"))
                task_status.started()
        finally:
            for channel in channels:
                channel.close()

    async def _run_timers(self) -> None:
        while True:
            deadline = self.target.next_deadline()
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                await self._timers.wait()
            self.target.advance(trio.current_time())

    async def submit(self, kind: RequestType, offset: int, length: int = 0, data=None, flags: int = 0):
        """Submit one BIO and wait for it; return the data of a READ.

        Raises ``OSError(EIO)`` when the BIO fails, as the block layer would.
        """
        done = trio.Event()
        bio = Bio(kind, offset // SECTOR_SIZE, length, flags=flags, data=data,
                  on_complete=lambda _bio: done.set())
        self.target.submit(bio, trio.current_time())
        await done.wait()
        if bio.error:
            raise OSError(bio.error, f"dm-user {kind.name} at {offset}+{length} failed")
        return bio.data if kind == RequestType.READ else None
