"""The control socket: JSON requests and answers, one per line.

A client whose first byte is not ``{`` speaks snapuserd's text protocol
instead (:mod:`dmuserd.daemon.snapuserd`), so the same socket serves
Android tooling.

``dmuserd status`` sends ``{"cmd": "status"}`` and prints the answer. The
socket is created 0600 in a 0700 directory; only root and the daemon's own
user can use it.
"""

from __future__ import annotations

import json
import os

import structlog
import trio

log = structlog.get_logger("dmuserd.control")

MAX_REQUEST = 64 * 1024


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
        sock = trio.socket.from_stdlib_socket(bind_private_unix(path))
        sock.listen(16)
    listener = trio.SocketListener(sock)
    log.info("control socket listening", path=path)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(lambda stream: _client(daemon, stream), [listener],
                                       handler_nursery=nursery)
    finally:
        if inherited is None:  # a socket systemd passed us stays for the next start
            try:
                os.unlink(path)
            except OSError:
                pass


async def _client(daemon, stream: trio.SocketStream) -> None:
    """One connection: JSON lines, or snapuserd's protocol if the first byte is not ``{``.

    The first read takes at most one snapuserd message (512 bytes), so a
    snapuserd client's request is whole, as snapuserd itself reads it.
    """
    from dmuserd.daemon import snapuserd

    async with stream:
        try:
            first = await stream.receive_some(snapuserd.MAX_MESSAGE)
            if not first:
                return
            if first[:1] != b"{":
                await snapuserd.serve_client(daemon, stream, first)
                return
            buffer = first
            while True:
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    await stream.send_all(_encode(await handle_request(daemon, line)))
                if len(buffer) > MAX_REQUEST:
                    await stream.send_all(_encode({"ok": False, "error": "request too large"}))
                    return
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buffer += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def _encode(answer: dict) -> bytes:
    return json.dumps(answer).encode() + b"\n"


#: Commands: name -> "module:function", each ``async def f(daemon, request: dict) -> dict``
#: returning the answer's fields (``ok`` is added); raise ``CommandError`` to refuse.
COMMANDS = {
    "status": "dmuserd.daemon.control:status_command",
    "merge": "dmuserd.snapshot.merge_control:merge_command",
}


class CommandError(Exception):
    """A control request that cannot be done; the message goes to the client."""


async def status_command(daemon, request: dict) -> dict:
    return {"status": daemon.status()}


async def handle_request(daemon, line: bytes) -> dict:
    import importlib

    try:
        request = json.loads(line)
        cmd = request["cmd"]
    except (ValueError, KeyError, TypeError):
        return {"ok": False, "error": 'send one JSON object per line, e.g. {"cmd": "status"}'}
    if cmd not in COMMANDS:
        return {"ok": False, "error": f"unknown command {cmd!r} (known: {', '.join(sorted(COMMANDS))})"}
    module_name, _, function = COMMANDS[cmd].partition(":")
    handler = getattr(importlib.import_module(module_name), function)
    try:
        return {"ok": True, **await handler(daemon, request)}
    except CommandError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a failing command must not take the daemon down
        log.exception("control command failed", cmd=cmd)
        return {"ok": False, "error": f"{cmd} failed: {exc}"}


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
