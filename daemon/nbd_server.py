"""The daemon's own NBD server: ``--export nbd:WHERE,server=dmuserd``.

::

    NBD client ──► this daemon (protocol/_nbd.py) ──► dispatcher ──► backend

No nbdkit and no second process: each client connection is a trio task of
the export that speaks NBD itself (:class:`~dmuserd.protocol.NbdServerConnection`,
sans I/O) and hands every request to ``target.dispatcher.handle``, as
qemu-storage-daemon's NBD export calls its block layer. WHERE is the
``nbd:`` export's (a Unix socket path or ``tcp:HOST:PORT``, or a socket
systemd passed), bound by the same helpers (:func:`~dmuserd.daemon.nbd.bind_nbd_socket`).

How to choose (the default is ``server=nbdkit``): nbdkit outlives the
daemon, so its clients stay connected across a daemon restart; this server
costs far less CPU per request (no second process, no channel hop), but a
daemon restart drops its connections (clients reconnect). The nbdkit-only
options (``threads``, ``data``, ``on-stop``, ``idle-exit``, ``timeout``)
are refused here by name.

What a client gets is what nbdkit's front gives it (tests/daemon/test_nbd_clients.py
runs one client suite on both): structured replies if it asks (a READ is
one OFFSET_DATA chunk, so DF holds; errors are ERROR chunks carrying the
reason), the ``base:allocation`` meta context (NBD_CMD_BLOCK_STATUS answered
from the backend's optional :meth:`~dmuserd.backends.Backend.extents`: not
a block operation, yet admitted as one by the dispatcher, so a stop waits
for it and refuses new ones; ``memory`` reports its never-written chunks
as holes, other backends all data), and fast zero
where the backend has write_zeroes (a FAST_ZERO it answers UNSUPPORTED is
ENOTSUP, without FAST_ZERO EIO).

One connection, pipelined (fio's nbd engine keeps 32 requests in flight
on one connection):

* a *reader* (the connection's task) reads as much as is there, turns every
  complete request into an event and queues it for the *workers*: up to
  :data:`MAX_WORKERS` tasks per connection, started as the queue needs
  them and parked when it is empty. A worker that takes a request while
  more wait wakes one more worker first (should its request block), and
  only one is woken at a time: over a backend that never blocks, one
  worker serves a whole batch for one wake-up. Measured (4 KiB randread
  QD32, memory backend, shared machine, daemon CPU per request): a task
  per request 14.9-17.6 µs, a worker woken per request 11.3-14.3 µs, this
  chain 8.5-8.7 µs. A READ's data lands in its reply buffer straight from
  the backend (:meth:`~dmuserd.backends.Backend.readinto`); buffers of
  :data:`REUSE_MIN` bytes or more are reused once sent;
* one *writer* sends every reply queued so far with one ``sendmsg`` (the
  16-byte headers and READ data gathered), so many replies leave per
  system call;
* bounded: see "Memory" below.

Memory. What the connections of one export hold is counted against one
budget, ``memory=SIZE`` (default :data:`MEMORY`, 256 MiB): WRITE payloads
received and not yet written (and the bytes of a request not yet complete),
READ data from the request's arrival until its reply is sent. A
connection's reader stops reading while the budget is spent, unless the
connection holds no request at all: each connection may always have one
request, of any size, so clients that never read their replies cannot
starve the others (they are served one request at a time); the kernel's
socket buffers then push back on the client. Per connection, fairness is
kept simple: a reader also pauses at :data:`MAX_IN_FLIGHT` unanswered
requests or :data:`MAX_HELD` bytes held. Worst case for an export, with
every connection hostile: ``memory`` + :data:`MAX_CONNECTIONS` x (one
request of up to 32 MiB over the budget, received or to send; up to
:data:`~dmuserd.protocol._nbd.COMPACT_MIN` (1 MiB) of taken bytes the
protocol's buffer may keep after a WRITE's payload is copied out;
:data:`SPARE_BYTES` of reused READ buffers, 8 MiB; three
:data:`RECEIVE_SIZE` buffers; :data:`MAX_IN_FLIGHT` BLOCK_STATUS replies,
outside the budget but small: a reply covers at most :data:`STATUS_RANGE`,
and ``memory``'s then has at most 4096 extents, 32 KiB, so 2 MiB), about
256 MiB + 64 x 44 MiB = 3.0 GiB with 32 MiB requests; with requests of L
bytes (the kernel and fio send L <= 512 KiB) ``memory`` + 64 x (L + 11.75
MiB), 1.0 GiB at 512 KiB. The
one-request floor per connection is what the bound costs; a smaller
``MAX_CONNECTIONS`` cuts it. (Before this budget each connection could
hold ``MAX_HELD`` + 64 MiB + 8 spare buffers per READ size.)

Hostile clients. A request the protocol refuses (out of range, unknown
command or flags, over 32 MiB) gets its NBD error and the stream goes on;
bad framing ends that connection. Either is counted by the host's guard
(surface ``nbd-client``) and logged once per connection. A client that
never finishes the handshake is dropped after :data:`HANDSHAKE_TIMEOUT`;
at most :data:`MAX_CONNECTIONS` are served at once, the next ones wait in
the listen backlog. A request refused because the target is stopping
(admission closed) is answered ESHUTDOWN.

Stop: ``stop_admitting`` closes the listener (and removes a Unix socket the
daemon bound); requests in flight finish (the dispatcher refuses new
ones), then the export's nursery is cancelled and every connection closes.
Before that cancellation, :meth:`NbdServerExport.finish_stop` stops every
connection's reader and waits, up to :data:`STOP_REPLY_TIMEOUT` seconds,
until each has sent its replies (requests read but not begun are answered
ESHUTDOWN by the dispatcher) and closed: every request read before the stop
is answered, even when its reply does not fit the socket buffers at once,
unless the client reads too slowly for that timeout.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from typing import TYPE_CHECKING

import structlog
import trio

from dmuserd.backends import Op
from dmuserd.backends.options import Options
from dmuserd.daemon.dispatcher import Refused
from dmuserd.daemon.export import Export
from dmuserd.daemon.guard import Peer
from dmuserd.daemon.nbd import NbdError, accept_within, bind_nbd_socket, nbd_uri, parse_where, sendmsg_all
from dmuserd.protocol import (
    NBD_NEED_DATA,
    SECTOR_SIZE,
    Flag,
    NbdAllocationFlag,
    NbdCommand,
    NbdCommandFlag,
    NbdDisconnect,
    NbdErrno,
    NbdNegotiated,
    NbdProtocolError,
    NbdRefused,
    NbdRequest,
    NbdServerConnection,
    Request,
    RequestType,
    ResponseType,
    TransmissionFlag,
    nbd_block_status_chunk,
    nbd_data_chunk,
    nbd_simple_reply,
    new_message,
)

if TYPE_CHECKING:
    from dmuserd.daemon.runtime import Target

log = structlog.get_logger("dmuserd.nbd_server")

#: The input surface of the NBD clients (:mod:`dmuserd.daemon.guard`).
SURFACE = "nbd-client"
#: Options of ``server=nbdkit`` only: refused here by name.
NBDKIT_ONLY = ("threads", "data", "on-stop", "idle-exit", "timeout")
#: Connections served at once; the next wait in the listen backlog.
MAX_CONNECTIONS = 64
#: Seconds a client has from connecting to the end of the handshake.
HANDSHAKE_TIMEOUT = 10.0
#: The data bytes the connections of one export may hold, by default (``memory=SIZE``; see the module doc).
MEMORY = 256 * 1024 * 1024
#: Requests of one connection read and not yet answered before the reader pauses.
MAX_IN_FLIGHT = 64
#: Data bytes one connection may hold (WRITE payloads to write, READ data to send) before its reader pauses.
MAX_HELD = 64 * 1024 * 1024
#: Worker tasks per connection at most (started as requests queue up).
MAX_WORKERS = 32
#: Bytes read per ``recv`` (many pipelined requests, or a good piece of a WRITE).
RECEIVE_SIZE = 256 * 1024
#: READ buffers this large or larger are reused once sent (not zeroed and faulted in again per request).
REUSE_MIN = 64 * 1024
#: Spare READ buffers kept per size and connection.
SPARE_BUFFERS = 8
#: Bytes of spare READ buffers kept per connection at most.
SPARE_BYTES = 8 * 1024 * 1024
#: The most of a BLOCK_STATUS query one reply describes (the client asks again from where it ends): bounds the
#: backend's work and the reply's size per query.
STATUS_RANGE = 256 * 1024 * 1024
#: Seconds a stop waits for the connections to send their last replies (:meth:`NbdServerExport.finish_stop`).
STOP_REPLY_TIMEOUT = 2.0
#: Buffers per ``sendmsg`` (IOV_MAX is 1024).
MAX_IOV = 1000
#: A READ's data this large or larger starts a ``sendmsg`` of its own when the bytes before it would
#: leave it off a 64-byte boundary: the socket's buffers are filled from their start at each call, so
#: behind a structured reply's 28-byte header every byte of the data was copied misaligned, into the
#: socket and out again (measured: the daemon's CPU per 1 MiB read 337 µs with the data behind the
#: header in one call, 298 µs without structured replies; one more system call per large READ).
ALIGN_MIN = 64 * 1024
SOCKET_BUFFER = 4 * 1024 * 1024

_READ, _WRITE, _FLUSH, _TRIM, _ZEROES, _CACHE = (NbdCommand.READ, NbdCommand.WRITE, NbdCommand.FLUSH,
                                                 NbdCommand.TRIM, NbdCommand.WRITE_ZEROES, NbdCommand.CACHE)
_STATUS = NbdCommand.BLOCK_STATUS
_NBD_FUA, _NBD_NO_HOLE = int(NbdCommandFlag.FUA), int(NbdCommandFlag.NO_HOLE)
_NBD_FAST_ZERO, _NBD_REQ_ONE = int(NbdCommandFlag.FAST_ZERO), int(NbdCommandFlag.REQ_ONE)
#: ``base:allocation``'s status of a hole (never written or deallocated: reads as zeros), and of data.
_HOLE, _DATA = int(NbdAllocationFlag.HOLE | NbdAllocationFlag.ZERO), 0
_NO_FLAGS, _FUA, _NOUNMAP = Flag(0), Flag.FUA, Flag.NOUNMAP
_R_READ, _R_WRITE, _R_FLUSH = RequestType.READ, RequestType.WRITE, RequestType.FLUSH
_R_DISCARD, _R_ZEROES = RequestType.DISCARD, RequestType.WRITE_ZEROES
_SUCCESS, _UNSUPPORTED = ResponseType.SUCCESS, ResponseType.UNSUPPORTED
#: The NBD error of a request refused because the target is stopping (admission closed), and its message.
_STOPPING = (NbdErrno.ESHUTDOWN, "the server is stopping")


def transmission_flags(capabilities: frozenset[Op]) -> TransmissionFlag:
    """What to advertise for a backend with ``capabilities`` (only what it can do)."""
    flags = TransmissionFlag.SEND_CACHE  # a no-op success: the data is in the daemon already
    writable = Op.WRITE in capabilities
    if not writable:
        flags |= TransmissionFlag.READ_ONLY
    if Op.FLUSH in capabilities:
        flags |= TransmissionFlag.SEND_FLUSH
        if writable:
            flags |= TransmissionFlag.SEND_FUA
    if writable and Op.DISCARD in capabilities:
        flags |= TransmissionFlag.SEND_TRIM
    if writable and Op.WRITE_ZEROES in capabilities:
        # A backend's write_zeroes zeroes without writing the data (nbdkit_plugin's can_fast_zero rule), so a
        # FAST_ZERO request is served as any other; should the backend answer UNSUPPORTED, it is ENOTSUP.
        flags |= TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO
    if Op.FLUSH in capabilities or not writable:
        # One backend behind every connection: a flush on one covers the writes of all.
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return flags


class _Budget:
    """The data bytes the connections of one export hold, against one limit (see the module doc)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.paused: set[trio.lowlevel.ParkingLot] = set()  # readers waiting for room (their connection's lot)

    def release(self, n: int) -> None:
        self.used -= n
        if self.paused and self.used < self.limit:
            for lot in self.paused:
                lot.unpark_all()
            self.paused.clear()


class NbdServerExport(Export):
    """One ``nbd:WHERE,server=dmuserd`` export: a listener and its client connections."""

    kind = "nbd"

    def __init__(self, spec, host, memory: int = MEMORY) -> None:
        super().__init__(spec, host)
        self.budget = _Budget(memory)
        self.target: Target | None = None
        self.connections = 0  # served now
        self.accepted = 0  # since the start
        self._listener: trio.socket.SocketType | None = None
        self._accepting: trio.CancelScope | None = None
        self._unlink: str | None = None  # the Unix socket path we bound (never systemd's)
        self._live: set[_Connection] = set()
        self.log = log.bind(where=spec.where)

    @classmethod
    def from_spec(cls, spec, host) -> NbdServerExport:
        parse_where(spec.where)
        opts = Options(str(spec), spec.options, kind="export", error=NbdError)
        opts.choice("server", ("nbdkit", "dmuserd"), "dmuserd")
        memory = opts.size("memory", MEMORY)
        if memory < 1:
            raise NbdError(f"export {spec}: memory={memory} must be at least 1 byte")
        for key in NBDKIT_ONLY:
            if opts.has(key):
                raise NbdError(f"export {spec}: option {key} is nbdkit's (server=nbdkit); "
                               "server=dmuserd serves NBD in the daemon and takes no such option")
        opts.finish("server=nbdkit|dmuserd, memory=SIZE")
        return cls(spec, host, memory)

    async def start(self, target, nursery: trio.Nursery) -> str:
        self.target = target
        self.log = log.bind(device=target.name, where=self.spec.where)
        sock, systemd = bind_nbd_socket(self.spec.where)
        kind, address = parse_where(self.spec.where)
        if kind == "unix" and not systemd:
            self._unlink = address
        sock.setblocking(False)
        self._listener = trio.socket.from_stdlib_socket(sock)
        self._accepting = trio.CancelScope()
        nursery.start_soon(self._accept, nursery)
        self.log.info("serving NBD in the daemon", endpoint=nbd_uri(self.spec.where))
        return nbd_uri(self.spec.where)

    def stop_admitting(self) -> None:
        """Close the listener: new clients are refused; connections finish what is in flight."""
        if self._accepting is not None:
            self._accepting.cancel()

    async def finish_stop(self) -> None:
        """Requests are done: the connections read no more, send the replies due and close (bounded)."""
        with trio.move_on_after(STOP_REPLY_TIMEOUT):
            for connection in self._live:
                connection.stop_reading()
            for connection in list(self._live):
                await connection.done.wait()

    def status(self) -> dict:
        return {"server": "dmuserd", "where": self.spec.where, "connections": self.connections,
                "connections_accepted": self.accepted, "memory_held": self.budget.used,
                "memory_limit": self.budget.limit}

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._unlink is not None:
            try:
                os.unlink(self._unlink)
            except OSError:
                pass
            self._unlink = None

    async def _accept(self, nursery: trio.Nursery) -> None:
        slots = trio.Semaphore(MAX_CONNECTIONS)
        listener = self._listener
        assert listener is not None and self._accepting is not None
        try:
            with self._accepting:
                while True:
                    conn, address = await accept_within(listener, slots, self.log, "client")
                    self.accepted += 1
                    nursery.start_soon(self._serve, conn, address, slots)
        finally:
            self._close_listener()

    async def _serve(self, conn: trio.socket.SocketType, address, slots: trio.Semaphore) -> None:
        self.connections += 1
        sock = socket.socket(fileno=conn.detach())
        peer = Peer.of(sock) if sock.family == socket.AF_UNIX else None
        context = {"device": self.target.name, "connection": self.accepted}
        if peer is None and address:
            context["client"] = str(address)
        connection = _Connection(self, sock, peer, context)
        self._live.add(connection)
        try:
            with sock, self.host.guard.isolate(SURFACE, peer, **context):
                await connection.run()
        finally:
            self._live.discard(connection)
            connection.done.set()
            self.connections -= 1
            slots.release()


class _Connection:
    """One client: handshake, then the reader, its workers and the writer (see the module doc)."""

    def __init__(self, export: NbdServerExport, sock: socket.socket, peer: Peer | None, context: dict) -> None:
        self.export = export
        self.sock = sock
        self.peer = peer
        self.context = context
        self.dispatcher = export.target.dispatcher
        backend = export.target.backend
        self.proto = NbdServerConnection(backend.size, transmission_flags(backend.capabilities),
                                         block_size=max(SECTOR_SIZE, backend.block_size))
        self._buffer = memoryview(bytearray(RECEIVE_SIZE))
        self._queue: deque[NbdRequest] = deque()
        self._idle = trio.lowlevel.ParkingLot()  # workers with nothing to do
        self._workers = 0
        self._waking = 0  # workers woken (or started) that have not run yet
        self._replies: list = []  # buffers to send, in order
        self._held = 0  # data bytes of requests read and not done (see MAX_HELD), in the budget too
        self._unparsed = 0  # bytes received and not yet parsed into a request, in the budget too
        self._budget = export.budget
        self._in_flight = 0  # requests read and not yet replied (queued, served, or their reply unsent)
        self._writer = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()  # the reader, paused by the bounds
        self._refused = 0
        self._closing = False
        self._stop = False  # finish_stop: read no more requests
        self._reading: trio.CancelScope | None = None  # the handshake's or the request reader's scope
        self.done = trio.Event()
        self._stalled = False  # _events stopped at a bound with requests maybe still buffered
        self._spare: dict[int, list[bytearray]] = {}  # sent READ buffers of REUSE_MIN bytes or more, by size
        self._spare_bytes = 0
        self._structured = False  # structured replies negotiated (set once the handshake is over)

    def stop_reading(self) -> None:
        """A stop: read no more requests (nor finish a handshake); the replies due still go out."""
        self._stop = True
        if self._reading is not None:
            self._reading.cancel()

    def _reject(self, reason: str, detail: str) -> None:
        """Count a refused input; log only the first of this connection."""
        self._refused += 1
        guard = self.export.host.guard
        if self._refused == 1:
            guard.reject(SURFACE, reason, detail, self.peer, **self.context)
        else:
            guard.count(SURFACE, reason)

    # -- socket ------------------------------------------------------------------------------

    async def _recv(self) -> int:
        while True:
            try:
                return self.sock.recv_into(self._buffer)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
            except OSError as exc:  # reset, timed out: the client is gone, as at EOF
                log.debug("NBD client connection failed", error=str(exc), **self.context)
                return 0

    # -- phases ------------------------------------------------------------------------------

    async def run(self) -> None:
        self.sock.setblocking(False)
        if self.sock.family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        except OSError:
            pass
        try:
            negotiated = False
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as self._reading:
                negotiated = await self._handshake()
            if self._stop:
                return
            if self._reading.cancelled_caught:
                self._reject("handshake-timeout", f"no export chosen within {HANDSHAKE_TIMEOUT} s")
                return
            if negotiated:
                self._structured = self.proto.structured
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write)
                    self._nursery = nursery
                    with trio.CancelScope() as self._reading:
                        if self._parse() and not self._stop:  # requests sent right behind the handshake first
                            await self._read()
                    # The client is done (or gone), or a stop: answer what runs, then end the writer.
                    while self._in_flight:
                        await self._room.park()
                    nursery.cancel_scope.cancel()
        except NbdProtocolError as exc:
            self._reject("protocol-error", str(exc))
        except OSError as exc:  # the client went away mid-reply: nothing to answer
            log.debug("NBD client gone", error=str(exc), **self.context)
        finally:
            self._budget.release(self._held + self._unparsed)  # what requests never finished still held
            self._held = self._unparsed = 0

    async def _handshake(self) -> bool:
        proto = self.proto
        await sendmsg_all(self.sock, [proto.data_to_send()])
        while True:
            n = await self._recv()
            if not n:
                return False
            proto.receive_data(self._buffer[:n])
            event = proto.next_event()
            out = proto.data_to_send()
            if out:
                await sendmsg_all(self.sock, [out])
            while event is not NBD_NEED_DATA:
                if type(event) is NbdNegotiated:
                    return True
                if type(event) is NbdDisconnect:
                    return False
                event = proto.next_event()
                out = proto.data_to_send()
                if out:
                    await sendmsg_all(self.sock, [out])

    async def _read(self) -> None:
        """Read requests and queue them, within the bounds, until the client disconnects."""
        budget = self._budget
        while not self._closing:
            while self._full():
                if self._held < MAX_HELD and self._in_flight < MAX_IN_FLIGHT:  # the export's budget is spent
                    self._spare.clear()
                    self._spare_bytes = 0
                    budget.paused.add(self._room)
                await self._room.park()
            if self._stalled:  # parsing stopped at a bound: more requests may be buffered
                self._stalled = False
            else:
                n = await self._recv()
                if not n:
                    return
                self.proto.receive_data(self._buffer[:n])
            if not self._parse():
                return

    def _full(self) -> bool:
        """No more requests now: this connection's bounds, or the export's budget (unless it holds none)."""
        return (self._in_flight >= MAX_IN_FLIGHT or self._held >= MAX_HELD
                or (self._held > 0 and self._budget.used >= self._budget.limit))

    def _parse(self) -> bool:
        """:meth:`_events`; False when the framing is lost (counted): answer what runs, read no more."""
        try:
            self._events()
        except NbdProtocolError as exc:
            self._reject("protocol-error", str(exc))
            return False
        finally:  # bytes received but not parsed (a WRITE still arriving) count in the budget too
            unparsed = self.proto.buffered
            self._budget.used += unparsed - self._unparsed
            self._unparsed = unparsed
        return True

    def _events(self) -> None:
        """Turn the complete requests buffered into work (or a refusal's reply), until a bound is reached."""
        proto = self.proto
        queue = self._queue
        budget = self._budget
        queued = 0
        while True:
            if self._full():
                self._stalled = True
                break
            event = proto.next_event()
            if event is NBD_NEED_DATA:
                break
            kind = type(event)
            if kind is NbdRequest:
                self._in_flight += 1
                if event.command is _READ or event.command is _WRITE:  # type: ignore[union-attr]
                    self._held += event.length  # type: ignore[union-attr]
                    budget.used += event.length  # type: ignore[union-attr]
                queue.append(event)  # type: ignore[arg-type]
                queued += 1
            elif kind is NbdRefused:
                self._in_flight += 1
                self._reject("request-refused",
                             f"{event.reason} (command {event.command}, cookie {event.cookie:#x})")  # type: ignore[union-attr]
                self._reply(proto.error_reply(event.cookie, event.error, event.reason))  # type: ignore[union-attr]
            elif kind is NbdDisconnect:
                self._closing = True
                break
        if queued:
            self._more_workers()

    def _more_workers(self) -> None:
        """Queued requests wait: wake one idle worker, or start one (up to :data:`MAX_WORKERS`).

        Not while one is on its way already: that one takes the next request
        and calls this again if more wait. So a backend that never blocks
        (memory) costs one wake-up per batch, and one that blocks gets a
        worker per waiting request, one scheduling round apart.
        """
        if self._waking:
            return
        if self._idle:
            self._waking += 1
            self._idle.unpark()
        elif self._workers < MAX_WORKERS:
            self._workers += 1
            self._waking += 1
            self._nursery.start_soon(self._work)

    # -- workers -----------------------------------------------------------------------------

    async def _work(self) -> None:
        queue = self._queue
        handle = self.dispatcher.handle
        self._waking -= 1
        while True:
            if not queue:
                await self._idle.park()
                self._waking -= 1
                continue
            req = queue.popleft()
            if queue:
                self._more_workers()  # for the rest, should this request block
            command = req.command
            sector = req.offset // SECTOR_SIZE
            if command is _READ:
                spare = self._spare.get(req.length)
                if spare:
                    data = spare.pop()
                    self._spare_bytes -= req.length
                else:
                    data = bytearray(req.length)
                response = await handle(new_message(Request, req.cookie, _R_READ, _NO_FLAGS, sector, req.length, None),
                                        into=memoryview(data))
                if response.type is _SUCCESS:  # held until sent; structured: one chunk (DF holds as it is)
                    self._reply(nbd_data_chunk(req.cookie, req.offset, req.length) if self._structured
                                else nbd_simple_reply(req.cookie), data)
                    continue
                self._held -= req.length
                self._budget.release(req.length)
            elif command is _WRITE:
                response = await handle(new_message(Request, req.cookie, _R_WRITE,
                                                    _FUA if req.flags & _NBD_FUA else _NO_FLAGS, sector, req.length,
                                                    req.payload))
                self._held -= req.length  # the payload is written (or failed): it goes
                self._budget.release(req.length)
            elif command is _FLUSH:
                response = await handle(Request(req.cookie, _R_FLUSH, _NO_FLAGS, 0, 0))
            elif command is _TRIM:
                response = await handle(Request(req.cookie, _R_DISCARD, _FUA if req.flags & _NBD_FUA else _NO_FLAGS,
                                                sector, req.length))
            elif command is _ZEROES:
                flags = (_FUA if req.flags & _NBD_FUA else _NO_FLAGS) | (_NOUNMAP if req.flags & _NBD_NO_HOLE
                                                                         else _NO_FLAGS)
                response = await handle(Request(req.cookie, _R_ZEROES, flags, sector, req.length))
                if response.type is _UNSUPPORTED and not req.flags & _NBD_FAST_ZERO:
                    # ENOTSUP is for a FAST_ZERO only (the spec: MUST NOT otherwise, once advertised).
                    self._reply(self.proto.error_reply(req.cookie, NbdErrno.EIO, "the backend could not zero"))
                    continue
            elif command is _STATUS:
                self._reply(await self._block_status(req))
                continue
            else:  # CACHE: the data is as close as it gets already
                self._reply(nbd_simple_reply(req.cookie))
                continue
            if response.type is _SUCCESS:
                self._reply(nbd_simple_reply(req.cookie))
            else:
                self._reply(self.proto.error_reply(req.cookie, *_nbd_error(response)))

    async def _block_status(self, req: NbdRequest) -> bytes:
        """The reply to a BLOCK_STATUS for ``base:allocation``: the backend's extents (holes read as zeros).

        Not a block operation, so not :meth:`~dmuserd.daemon.dispatcher.Dispatcher.handle`: the
        backend's optional :meth:`~dmuserd.backends.Backend.extents`
        (default: all of it allocated data, as nbdkit says for a plugin
        without extents) is asked in one of the target's request slots
        (:meth:`~dmuserd.daemon.dispatcher.Dispatcher.admitted`), so it waits its turn like any request
        and a stop waits for it; refused (ESHUTDOWN) once the target stops
        admitting. A failure or a malformed answer is EIO for this request alone.
        """
        proto = self.proto
        async with self.dispatcher.admitted() as admitted:
            if not admitted:
                return proto.error_reply(req.cookie, *_STOPPING)
            length = min(req.length, STATUS_RANGE)  # the spec lets a reply cover less than asked
            try:
                extents = await self.dispatcher.backend.extents(req.offset, length)
                return nbd_block_status_chunk(req.cookie, proto.allocation_context or 0,
                                              [(e.length, _HOLE if e.hole else _DATA) for e in extents],
                                              length, bool(req.flags & _NBD_REQ_ONE))
            except Exception as exc:  # noqa: BLE001 - one failing query fails alone
                log.warning("block status failed", offset=req.offset, length=req.length,
                            error=f"{type(exc).__name__}: {exc}", **self.context)
                return proto.error_reply(req.cookie, NbdErrno.EIO, "the backend could not tell what is allocated")

    # -- writer ------------------------------------------------------------------------------

    def _reply(self, header: bytes, data: bytearray | None = None) -> None:
        replies = self._replies
        replies.append(header)
        if data is not None:
            replies.append(data)
        if self._writer:
            self._writer.unpark()

    async def _write(self) -> None:
        """Send the queued replies, all at once each time (one ``sendmsg`` for as many as fit)."""
        while True:
            if not self._replies:
                await self._writer.park()
                continue
            batch, data, headers, replies = self._next_batch()
            try:
                await sendmsg_all(self.sock, batch, data + headers)
            except OSError as exc:  # the client is gone: nothing more can reach it, the connection ends
                log.debug("NBD client gone with replies due", error=str(exc), **self.context)
                self._nursery.cancel_scope.cancel()
                return
            self._held -= data
            self._budget.release(data)
            self._in_flight -= replies
            for buffer in batch:
                if type(buffer) is bytearray and REUSE_MIN <= len(buffer) <= SPARE_BYTES - self._spare_bytes:
                    spare = self._spare.setdefault(len(buffer), [])
                    if len(spare) < SPARE_BUFFERS:
                        spare.append(buffer)
                        self._spare_bytes += len(buffer)
            if self._room:
                self._room.unpark_all()

    def _next_batch(self) -> tuple[list, int, int, int]:
        """The buffers of the next ``sendmsg`` (taken off the queue): (buffers, data bytes, header bytes, replies done).

        At most :data:`MAX_IOV` buffers, cut before a large READ's data that
        would not start on a 64-byte boundary (:data:`ALIGN_MIN`). A reply is
        counted done with its last buffer: a READ's with its data, which may
        go in the next call, so a stop never ends the connection between them.
        """
        queue = self._replies
        end = min(len(queue), MAX_IOV)
        data = headers = replies = 0
        for i in range(end):
            buffer = queue[i]
            if type(buffer) is bytes:  # a reply (simple, a READ chunk's header, or a whole error or status chunk)
                headers += len(buffer)
                if i + 1 >= len(queue) or type(queue[i + 1]) is bytes:
                    replies += 1  # no data follows it
            else:  # a READ's data
                if i and len(buffer) >= ALIGN_MIN and (headers + data) % 64:
                    end = i
                    break
                data += len(buffer)
                replies += 1
        batch = queue[:end]
        del queue[:end]
        return batch, data, headers, replies


def _nbd_error(response) -> tuple[NbdErrno, str]:
    """The NBD error of a dispatcher's failed answer, and its message for a structured reply."""
    if type(response) is Refused:
        return _STOPPING
    if response.type is _UNSUPPORTED:
        return NbdErrno.ENOTSUP, "the backend does not support this operation"
    return NbdErrno.EIO, "the backend failed (the daemon's log says why)"
