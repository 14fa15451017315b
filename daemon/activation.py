"""systemd socket activation: take over listening sockets passed in ``LISTEN_FDS``.

systemd passes sockets as file descriptors 3, 4, ... and says so in
``LISTEN_PID``/``LISTEN_FDS`` (sd_listen_fds(3)). We match each to the
address a export or the control socket would bind, so a unit's
``ListenStream=/run/dmuserd/disk.sock`` simply replaces the bind.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3

_inherited: dict[str, socket.socket] | None = None


def _collect() -> dict[str, socket.socket]:
    sockets: dict[str, socket.socket] = {}
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return sockets
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return sockets
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        os.set_inheritable(fd, False)
        address = sock.getsockname()
        key = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        sockets[key] = sock
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return sockets


def inherited_socket(address: str) -> socket.socket | None:
    """The listening socket systemd passed for ``address`` (a path, or ``HOST:PORT``), if any."""
    global _inherited
    if _inherited is None:
        _inherited = _collect()
    return _inherited.pop(os.path.abspath(address) if address.startswith("/") else address, None)


def bind_private_unix(path: str) -> socket.socket:
    """A Unix stream socket bound at ``path`` with mode 0600 from the start.

    The umask is narrowed around ``bind()`` so the socket file never exists
    with wider permissions, not even between bind and a chmod.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return sock
