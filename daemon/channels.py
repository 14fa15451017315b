"""Serve one dm-user channel: bytes in, requests to the dispatcher, bytes out.

Every export ends here. A *transport* moves a channel's bytes: the real
``/dev/dm-user/NAME`` file (read in a thread: it has no ``poll()``), a Unix
socket from the NBD plugin, or a channel of the in-process kernel model. It
has two methods::

    async def receive_some(self, max_bytes: int) -> bytes   # b"" at the end
    async def send_all(self, buffers: list) -> None          # one response

:func:`serve_channel` runs requests concurrently, at most
:data:`MAX_IN_FLIGHT_PER_CHANNEL` per channel (so one channel cannot take
every slot of the target's bound, which the dispatcher keeps: see
:class:`~dmuserd.daemon.dispatcher.Dispatcher`), and writes each response
whole before the next one starts, so responses never interleave.

A channel is an input surface (:mod:`dmuserd.daemon.guard`): bytes that break
the protocol end that channel, counted as a rejection with the field at
fault; any other exception ends it too, counted and logged, and goes no
further. The daemon and its other channels never see it.
"""

from __future__ import annotations

import structlog
import trio

from dmuserd.daemon.dispatcher import Refused
from dmuserd.daemon.guard import Peer
from dmuserd.protocol import (
    NEED_DATA,
    DaemonConnection,
    OversizedRequest,
    ProtocolError,
    Request,
    Response,
    ResponseType,
)

log = structlog.get_logger("dmuserd.channel")

#: Requests one channel may have in flight at once, whatever the target's limit.
MAX_IN_FLIGHT_PER_CHANNEL = 64
#: Large enough for a header plus the largest payload the kernel sends in one go.
RECEIVE_SIZE = 1 << 20
#: Smaller READs are copied into one buffer even for a scatter-gather
#: transport: below this, building and checking a list costs more than the copy.
SCATTER_MIN = 64 * 1024


async def serve_channel(transport, dispatcher, *, name: str = "",
                        surface: str = "channel", peer: Peer | None = None, resends: bool = False) -> None:
    """Serve ``transport`` until it ends (EOF), breaks the protocol or fails.

    Requests still running when the transport ends are finished and their
    responses sent, as far as the transport still takes them. Nothing the
    peer sends makes this raise: the channel ends, and
    ``dispatcher.guard`` counts why under ``surface``.

    A transport whose peer sends one request at a time and waits for its
    answer (the NBD plugin's channels) says so with a true ``serial``
    attribute: its requests are answered in this task, saving a task and a
    lock per request, which is most of this function's cost. A transport
    with a true ``scatter`` attribute sends a READ's data of
    :data:`SCATTER_MIN` bytes or more as the backend's pieces
    (:meth:`~dmuserd.backends.Backend.read_views`), unjoined. A
    transport whose ``pool`` attribute is a :class:`~dmuserd.protocol.SlotPool`
    speaks the slotted framing (the NBD plugin's shared-memory channels):
    data of the requests that name a slot moves through the pool, a READ's
    read by the backend straight into its slot.

    ``resends``: the peer re-sends what is left unanswered when the channel
    closes (the NBD plugin, to the next daemon); a request the dispatcher
    refuses because the daemon stops (:class:`~dmuserd.daemon.dispatcher.Refused`)
    is then left unanswered rather than failed.
    """
    with dispatcher.guard.isolate(surface, peer, device=dispatcher.name, channel=name):
        await _serve(transport, dispatcher, name, surface, peer, resends)


async def _serve(transport, dispatcher, name: str, surface: str,
                 peer: Peer | None, resends: bool) -> None:
    conn = DaemonConnection(pool=getattr(transport, "pool", None))
    try:
        await _serve_connection(conn, transport, dispatcher, name, surface, peer, resends)
    finally:
        conn.close()  # the slots of requests left unanswered are free again


async def _serve_connection(conn: DaemonConnection, transport, dispatcher, name: str, surface: str,
                            peer: Peer | None, resends: bool) -> None:
    serial = getattr(transport, "serial", False)
    scatter = getattr(transport, "scatter", False)
    send_lock = trio.Lock()
    own = trio.CapacityLimiter(MAX_IN_FLIGHT_PER_CHANNEL)
    chlog = log.bind(device=dispatcher.name, channel=name)

    async def answer(request: Request, token: object) -> None:
        try:
            if type(request) is OversizedRequest:
                response = refuse_oversized(dispatcher, request, surface, conn.max_io, peer, channel=name)
            else:
                response = await dispatcher.handle(request, scatter and request.len >= SCATTER_MIN,
                                                   conn.destination(request))
        finally:
            if not serial:
                own.release_on_behalf_of(token)
        if resends and type(response) is Refused:
            return  # the peer re-sends it to the next daemon when this channel closes
        try:
            buffers = conn.send_response(response)
        except ProtocolError as exc:
            # The dispatcher answered something the protocol cannot carry (a
            # bug): the peer gets ERROR for this request, the channel goes on.
            dispatcher.guard.failed("dispatcher", exc, device=dispatcher.name, channel=name, seq=request.seq)
            buffers = conn.send_response(Response(request.seq, ResponseType.ERROR))
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
                    if serial:
                        await answer(request, token)
                    else:
                        await _acquire(own, token)
                        nursery.start_soon(answer, request, token)
            except ProtocolError as exc:
                # The stream has lost its framing: end this channel after
                # answering what it holds.
                dispatcher.guard.reject(surface, f"protocol-{exc.field}", str(exc), peer,
                                        device=dispatcher.name, channel=name)
                break


def refuse_oversized(dispatcher, request, surface: str, max_io: int, peer: Peer | None = None, **context) -> Response:
    """The ERROR answer to a READ/WRITE longer than the daemon's buffers (the kernel has no limit), counted."""
    dispatcher.guard.reject(surface, "io-too-large", f"{request.type.name} of {request.len} bytes, over the "
                            f"{max_io}-byte limit: answered ERROR", peer, device=dispatcher.name,
                            seq=request.seq, **context)
    return Response(request.seq, ResponseType.ERROR)


async def _acquire(limiter: trio.CapacityLimiter, token: object) -> None:
    try:
        limiter.acquire_on_behalf_of_nowait(token)
    except trio.WouldBlock:
        await limiter.acquire_on_behalf_of(token)
