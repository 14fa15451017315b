"""``http``: serve a target read-only over HTTP (``GET`` with ``Range``, ``HEAD``).

An example of a dmuserd export in a package of its own (see
``docs/writing-an-export.md``)::

    pip install docs/examples/http-export
    dmuserd serve --backend file:path=disk.img --export http:127.0.0.1:8080
    curl -r 4096-8191 http://127.0.0.1:8080/ | xxd

``--export http:HOST:PORT[,clients=N]``: at most ``clients`` connections
(default 16) are served at once; the next ones wait in the listen backlog.
One request per connection (``Connection: close``). A range is read as
block-aligned READs of at most :data:`PIECE` bytes through the target's
dispatcher, the one entry point every export uses, and sliced to the bytes
asked for. Bytes a client sends that are not a GET/HEAD this understands
get a 4xx answer, counted by the daemon's guard; any other failure ends that
connection alone.
"""

from __future__ import annotations

import itertools
import re

import trio

from dmuserd.backends import Options
from dmuserd.daemon.config import ConfigError
from dmuserd.daemon.export import Export
from dmuserd.protocol import SECTOR_SIZE, Flag, Request, RequestType, ResponseType

#: The largest READ handed to the dispatcher at once.
PIECE = 1 << 20
#: The longest request head accepted (request line and headers), and how long it may take to arrive.
MAX_HEAD = 8192
HEAD_TIMEOUT = 10.0
#: The input surface of this export's connections (``dmuserd status``: ``rejected_inputs``).
SURFACE = "http"

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class BadRequest(Exception):
    """What a client sent cannot be answered: ``status`` says why."""

    def __init__(self, status: str, why: str) -> None:
        super().__init__(why)
        self.status = status


class HttpExport(Export):
    """One ``http:HOST:PORT`` export of one target."""

    kind = "http"

    def __init__(self, spec, host, *, address: str, port: int, clients: int) -> None:
        super().__init__(spec, host)
        self.address, self.port = address, port
        self.slots = trio.Semaphore(clients)
        self.served = 0
        self._seq = itertools.count()
        self._accepting = trio.CancelScope()

    @classmethod
    def from_spec(cls, spec, host) -> HttpExport:
        """Check ``HOST:PORT`` and the options before anything starts."""
        address, _, port = spec.where.rpartition(":")
        if not address or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"export {str(spec)!r}: use http:HOST:PORT (e.g. http:127.0.0.1:8080)")
        opts = Options(str(spec), spec.options, kind="export", error=ConfigError)
        clients = opts.int("clients", 16, min=1, max=1024)
        opts.finish("clients=N")
        return cls(spec, host, address=address, port=int(port), clients=clients)

    async def start(self, target, nursery: trio.Nursery) -> str:
        """Listen, then accept in ``nursery`` (the target's: a stop cancels it); the URL."""
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.address)
        except OSError as exc:
            raise ConfigError(f"export {str(self.spec)!r}: cannot listen: {exc.strerror}") from None
        nursery.start_soon(self._accept, listeners[0], target, nursery)
        return f"http://{self.address}:{self.port}/"

    def stop_admitting(self) -> None:
        """A stop: take no new connection (the dispatcher refuses new reads already)."""
        self._accepting.cancel()

    def status(self) -> dict:
        return {"responses": self.served}

    async def _accept(self, listener, target, nursery: trio.Nursery) -> None:
        async with listener:
            with self._accepting:
                while True:
                    await self.slots.acquire()
                    try:
                        stream = await listener.accept()
                    except OSError as exc:  # out of descriptors, say: wait and go on
                        self.slots.release()
                        self.host.guard.reject(SURFACE, "accept-failed", str(exc), device=target.name)
                        await trio.sleep(0.1)
                        continue
                    nursery.start_soon(self._connection, stream, target)

    async def _connection(self, stream, target) -> None:
        try:
            with self.host.guard.isolate(SURFACE, device=target.name):
                async with stream:
                    try:
                        await self._answer(stream, target, await _read_head(stream))
                    except BadRequest as exc:
                        self.host.guard.reject(SURFACE, f"http-{exc.status.split()[0]}", str(exc),
                                               device=target.name)
                        await _send_head(stream, exc.status, {"Content-Length": "0"})
                        await _linger(stream)
        finally:
            self.slots.release()

    async def _answer(self, stream, target, head: str) -> None:
        request_line, *lines = head.split("\r\n")
        words = request_line.split(" ")
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            raise BadRequest("400 Bad Request", f"not an HTTP/1.x request line: {request_line[:80]!r}")
        method = words[0]
        if method not in ("GET", "HEAD"):
            raise BadRequest("405 Method Not Allowed", f"{method[:20]!r}: this export is read-only")
        headers = dict(_header(line) for line in lines if line)
        size = target.backend.size
        start, end, status = 0, size, "200 OK"
        fields = {"Accept-Ranges": "bytes"}
        if "range" in headers:
            start, end = _parse_range(headers["range"], size)
            status = "206 Partial Content"
            fields["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        fields["Content-Length"] = str(end - start)
        await _send_head(stream, status, fields)
        if method == "GET":
            await self._send_bytes(stream, target, start, end)
        self.served += 1

    async def _send_bytes(self, stream, target, start: int, end: int) -> None:
        """Bytes ``start``..``end`` of the target, read as whole blocks through its dispatcher."""
        block = target.backend.block_size
        offset = start // block * block
        while offset < end:
            length = min(PIECE, -(-end // block) * block - offset)
            request = Request(next(self._seq), RequestType.READ, Flag(0), offset // SECTOR_SIZE, length, None)
            response = await target.dispatcher.handle(request)
            if response.type != ResponseType.SUCCESS:
                # The head is gone already: ending the connection early is how HTTP says it failed.
                raise OSError(f"READ at {offset}+{length} failed ({response.type.name})")
            data = memoryview(response.payload)
            await stream.send_all(data[max(start - offset, 0) : min(end - offset, length)])
            offset += length


async def _read_head(stream) -> str:
    buffer = bytearray()
    with trio.move_on_after(HEAD_TIMEOUT):
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > MAX_HEAD:
                raise BadRequest("431 Request Header Fields Too Large", f"a request head over {MAX_HEAD} bytes")
            data = await stream.receive_some(4096)
            if not data:
                raise BadRequest("400 Bad Request", "the connection ended inside the request head")
            buffer += data
        return buffer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    raise BadRequest("408 Request Timeout", f"no whole request head in {HEAD_TIMEOUT} s")


def _header(line: str) -> tuple[str, str]:
    name, sep, value = line.partition(":")
    if not sep:
        raise BadRequest("400 Bad Request", f"not a header line: {line[:80]!r}")
    return name.strip().lower(), value.strip()


def _parse_range(text: str, size: int) -> tuple[int, int]:
    """``bytes=A-B``, ``bytes=A-``, ``bytes=-N`` → (start, end), end exclusive."""
    match = _RANGE.match(text.replace(" ", ""))
    if not match or match.groups() == ("", ""):
        raise BadRequest("416 Range Not Satisfiable", f"not one byte range: {text[:80]!r}")
    first, last = match.groups()
    if not first:
        start, end = max(size - int(last), 0), size
    else:
        start, end = int(first), size if not last else min(int(last) + 1, size)
    if start >= end:
        raise BadRequest("416 Range Not Satisfiable", f"range {text[:80]!r} is outside the {size}-byte device")
    return start, end


async def _linger(stream) -> None:
    """Read what the client still sends (briefly), so closing does not reset the connection before it reads."""
    await stream.send_eof()
    with trio.move_on_after(1.0):
        for _ in range(256):
            if not await stream.receive_some(65536):
                break


async def _send_head(stream, status: str, fields: dict) -> None:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in fields.items()), "Connection: close", "", ""]
    await stream.send_all("\r\n".join(lines).encode("latin-1"))
