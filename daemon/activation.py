"""systemd socket activation: take over listening sockets passed in ``LISTEN_FDS``.

systemd passes sockets as file descriptors 3, 4, ... and says so in
``LISTEN_PID``/``LISTEN_FDS`` (sd_listen_fds(3)). We match each to the
address a export or the control socket would bind, so a unit's
``ListenStream=/run/dmuserd/disk.sock`` simply replaces the bind.
"""

from __future__ import annotations

import contextlib
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


#: The longest path a Unix socket binds to (``sun_path`` holds 108 bytes with its NUL).
_SUN_PATH_MAX = 107


def bind_private_unix(path: str, backlog: int) -> socket.socket:
    """A Unix stream socket listening at ``path``, with mode 0600 from the start.

    It is bound and listens under a temporary name beside ``path``, then is
    renamed to it: the file appears only once connections are accepted, so
    a client that waits for the file and then connects (a readiness check,
    a test) is never refused, as it could be between ``bind()`` and
    ``listen()``. The umask is narrowed around ``bind()`` so the socket file
    never exists with wider permissions, not even between bind and a chmod.
    (Where the temporary name would be too long for a socket, ``path`` is
    bound directly.)
    """
    temp = f"{path}.{os.getpid()}"
    if len(os.fsencode(temp)) > _SUN_PATH_MAX:
        temp = path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        if temp != path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)  # left by a process of this pid that died between bind and rename
        sock.bind(temp)
        sock.listen(backlog)
        if temp != path:
            os.rename(temp, path)
    except BaseException:
        sock.close()
        if temp != path:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        raise
    finally:
        os.umask(old_umask)
    return sock
