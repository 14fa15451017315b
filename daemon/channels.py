"""Serve one dm-user channel: bytes in, requests to the dispatcher, bytes out.

Every export ends here. A *transport* moves a channel's bytes: the real
``/dev/dm-user/NAME`` file (read in a thread: it has no ``poll()``), a Unix
socket from the NBD plugin, or a channel of the in-process kernel model. It
has two methods::

    async def receive_some(self, max_bytes: int) -> bytes   # b"" at the end
    async def send_all(self, buffers: list) -> None          # one response

:func:`serve_channel` runs requests concurrently, bounded by a shared
:class:`trio.CapacityLimiter` (128 by default, as dm-user), and writes each
response whole before the next one starts, so responses never interleave.
"""

from __future__ import annotations

import structlog
import trio

from dmuserd.protocol import NEED_DATA, DaemonConnection, ProtocolError, Request

log = structlog.get_logger("dmuserd.channel")

#: dm-user keeps at most 128 messages outstanding per target.
DEFAULT_MAX_IN_FLIGHT = 128
#: Large enough for a header plus the largest payload the kernel sends in one go.
RECEIVE_SIZE = 1 << 20


async def serve_channel(transport, dispatcher, limiter: trio.CapacityLimiter, *, name: str = "") -> None:
    """Serve ``transport`` until it ends (EOF) or breaks the protocol.

    Requests still running when the transport ends are finished and their
    responses sent, as far as the transport still takes them.

    A transport whose peer sends one request at a time and waits for its
    answer (the NBD plugin's channels) says so with a true ``serial``
    attribute: its requests are answered in this task, saving a task and a
    lock per request, which is most of this function's cost. A transport
    with a true ``scatter`` attribute sends a READ's data as the backend's
    pieces (:meth:`~dmuserd.backends.Backend.read_views`), unjoined.
    """
    conn = DaemonConnection()
    serial = getattr(transport, "serial", False)
    scatter = getattr(transport, "scatter", False)
    send_lock = trio.Lock()
    chlog = log.bind(device=dispatcher.name, channel=name)

    async def answer(request: Request, token: object) -> None:
        try:
            response = await dispatcher.handle(request, scatter)
        finally:
            limiter.release_on_behalf_of(token)
        buffers = conn.send_response(response)
        try:
            if serial:
                await transport.send_all(buffers)
            else:
                async with send_lock:
                    await transport.send_all(buffers)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            chlog.warning("response not delivered: channel gone", seq=request.seq, op=request.type.name,
                          error=str(exc))

    async with trio.open_nursery() as nursery:
        while True:
            data = await transport.receive_some(RECEIVE_SIZE)
            if not data:
                break
            conn.receive_data(data)
            try:
                while (request := conn.next_event()) is not NEED_DATA:
                    # A token per request: requests of different channels can
                    # be equal (same seq and range), so they cannot borrow.
                    token = object()
                    try:
                        limiter.acquire_on_behalf_of_nowait(token)
                    except trio.WouldBlock:
                        await limiter.acquire_on_behalf_of(token)
                    if serial:
                        await answer(request, token)
                    else:
                        nursery.start_soon(answer, request, token)
            except ProtocolError as exc:
                chlog.error("closing channel: the peer broke the protocol", error=str(exc))
                break
