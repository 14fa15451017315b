"""The control socket: JSON requests and answers, one per line.

A client whose first byte is not ``{`` speaks snapuserd's text protocol
instead (:mod:`dmuserd.daemon.snapuserd`), so the same socket serves
Android tooling.

``dmuserd status`` sends ``{"cmd": "status"}`` and prints the answer. The
socket is created 0600 in a 0700 directory; only root and the daemon's own
user can use it.

Each connection is an input surface (``control-json`` or
``control-snapuserd``, :mod:`dmuserd.daemon.guard`): whatever a client
sends ends, at worst, its own connection. What a client can make the daemon
hold is bounded: :data:`MAX_CONNECTIONS` connections at once (more are told
so and closed), :data:`MAX_REQUEST` bytes per request line,
:data:`MAX_JSON_DEPTH` levels of JSON nesting, and
:data:`IDLE_TIMEOUT` seconds of silence before a first message or between
JSON requests (a snapuserd client may stay idle: libsnapshot keeps its
connection).
"""

from __future__ import annotations

import json
import os

import structlog
import trio

from dmuserd.daemon.guard import Peer, Rejected

log = structlog.get_logger("dmuserd.control")

#: Longest JSON request line, in bytes.
MAX_REQUEST = 64 * 1024
#: Deepest nesting of a JSON request (ours need 3).
MAX_JSON_DEPTH = 32
#: Control connections served at once.
MAX_CONNECTIONS = 64
#: Seconds a connection may stay silent before its first message, or between JSON requests.
IDLE_TIMEOUT = 60.0

SURFACE_JSON = "control-json"


def prepare_socket_path(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def serve_control(daemon, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    from dmuserd.daemon.activation import bind_private_unix, inherited_socket

    inherited = inherited_socket(path)
    if inherited is not None:
        sock = trio.socket.from_stdlib_socket(inherited)
    else:
        prepare_socket_path(path)
        sock = trio.socket.from_stdlib_socket(bind_private_unix(path, 16))
    listener = trio.SocketListener(sock)
    slots = trio.Semaphore(MAX_CONNECTIONS)
    log.info("control socket listening", path=path)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(lambda stream: _connection(daemon, stream, slots), [listener],
                                       handler_nursery=nursery)
    finally:
        if inherited is None:  # a socket systemd passed us stays for the next start
            try:
                os.unlink(path)
            except OSError:
                pass


async def _connection(daemon, stream: trio.SocketStream, slots: trio.Semaphore) -> None:
    """One connection, under the guard and within the connection limit."""
    peer = Peer.of(stream.socket)
    async with stream:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            daemon.guard.reject(SURFACE_JSON, "too-many-connections",
                                f"{MAX_CONNECTIONS} control connections are open already", peer)
            with trio.move_on_after(1):
                await _send_quietly(stream, _encode({"ok": False, "error": (
                    f"too many control connections ({MAX_CONNECTIONS}): close idle ones and try again")}))
            return
        try:
            await _client(daemon, stream, peer)
        finally:
            slots.release()


async def _send_quietly(stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _receive(stream, max_bytes: int, timeout: float | None) -> bytes:
    """The next bytes, or b"" at the end; :class:`Rejected` after ``timeout`` s of silence."""
    try:
        if timeout is None:
            return await stream.receive_some(max_bytes)
        with trio.fail_after(timeout):
            return await stream.receive_some(max_bytes)
    except trio.TooSlowError:
        raise Rejected("idle-timeout", f"no request for {timeout:g} s: connection closed") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""


async def _client(daemon, stream: trio.SocketStream, peer: Peer | None) -> None:
    """One connection: JSON lines, or snapuserd's protocol if the first byte is not ``{``.

    The first read takes at most one snapuserd message (512 bytes), so a
    snapuserd client's request is whole, as snapuserd itself reads it.
    """
    from dmuserd.daemon import snapuserd

    first = b""
    with daemon.guard.isolate(SURFACE_JSON, peer):
        first = await _receive(stream, snapuserd.MAX_MESSAGE, IDLE_TIMEOUT)
    if not first:
        return
    if first[:1] != b"{":
        with daemon.guard.isolate(snapuserd.SURFACE, peer):
            await snapuserd.serve_client(daemon, stream, first, peer)
        return
    with daemon.guard.isolate(SURFACE_JSON, peer):
        buffer = first
        while True:
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                answer = await handle_request(daemon, line, peer)
                try:
                    await stream.send_all(_encode(answer))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if len(buffer) > MAX_REQUEST:
                await _send_quietly(stream, _encode({"ok": False, "error": (
                    f"request too large: a request is one line of at most {MAX_REQUEST} bytes")}))
                raise Rejected("request-too-large", f"no newline in the first {len(buffer)} bytes")
            chunk = await _receive(stream, 4096, IDLE_TIMEOUT)
            if not chunk:
                return
            buffer += chunk


def _encode(answer: dict) -> bytes:
    return json.dumps(answer).encode() + b"\n"


class CommandError(Exception):
    """A control request that cannot be done; the message goes to the client."""


async def status_command(daemon, request: dict) -> dict:
    """``{"cmd": "status"}`` → the daemon's status."""
    return {"status": daemon.status()}


#: What ``merge`` can do to a target's merge.
MERGE_ACTIONS = ("start", "pause", "resume", "status")


async def merge_command(daemon, request: dict) -> dict:
    """``{"cmd": "merge", "action": ..., "target": NAME}`` → the merge's state.

    The snapshot layer refuses with a ``MergeError``; it becomes this
    request's error answer.
    """
    from dmuserd.snapshot.merge import MergeError
    from dmuserd.snapshot.merge_control import MergeControl

    action, name = request.get("action"), request.get("target")
    if action not in MERGE_ACTIONS:
        raise CommandError(f"merge: action must be one of {', '.join(MERGE_ACTIONS)}, not {action!r}")
    target = daemon.targets.get(name) if isinstance(name, str) else None
    if target is None:
        raise CommandError(f"merge: no target {name!r} (targets: {', '.join(sorted(daemon.targets)) or 'none'})")
    control = getattr(target.backend, "merge", None)
    if not isinstance(control, MergeControl):
        raise CommandError(f"merge: target {name!r} serves a {target.backend.name} backend; "
                           "only snapshot targets (base + COW) merge")
    try:
        if action == "start":
            if daemon.nursery is None:
                raise CommandError("merge: the daemon is not running its targets yet; try again")
            control.start(daemon.nursery)
        elif action == "pause":
            control.pause()
        elif action == "resume":
            control.resume()
    except MergeError as exc:
        raise CommandError(str(exc)) from None
    return {"target": name, **control.describe()}


#: Commands: name -> ``async def f(daemon, request: dict) -> dict`` returning the
#: answer's fields (``ok`` is added); raise ``CommandError`` to refuse.
COMMANDS = {
    "status": status_command,
    "merge": merge_command,
}


def _depth(value) -> int:
    """How deeply ``value`` (parsed JSON) nests lists and objects, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_request(line: bytes) -> dict:
    """One request line → its JSON object; :class:`Rejected` says what is wrong with it."""
    try:
        request = json.loads(line)
    except RecursionError:
        raise Rejected("json-too-deep", f"the JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # (UnicodeDecodeError too)
        raise Rejected("bad-json", f"not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        raise Rejected("bad-request", 'send one JSON object with a string "cmd" per line, e.g. {"cmd": "status"}')
    if _depth(request) > MAX_JSON_DEPTH:
        raise Rejected("json-too-deep", f"the JSON nests deeper than {MAX_JSON_DEPTH} levels")
    if request["cmd"] not in COMMANDS:
        raise Rejected("unknown-command",
                       f"unknown command {request['cmd'][:64]!r} (known: {', '.join(sorted(COMMANDS))})")
    return request


async def handle_request(daemon, line: bytes, peer: Peer | None = None) -> dict:
    """Answer one request line; never raises (a failing command is an error answer)."""
    try:
        request = parse_request(line)
    except Rejected as exc:
        daemon.guard.reject(SURFACE_JSON, exc.reason, exc.detail, peer)
        return {"ok": False, "error": exc.detail}
    cmd = request["cmd"]
    try:
        return {"ok": True, **await COMMANDS[cmd](daemon, request)}
    except CommandError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a failing command must not take the daemon down
        daemon.guard.failed(SURFACE_JSON, exc, peer, cmd=cmd)
        return {"ok": False, "error": f"{cmd} failed: {type(exc).__name__}: {exc}"}


def request(path: str, payload: dict, timeout: float = 5.0) -> dict:
    """Blocking client for the command line: send one request, read one answer."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
