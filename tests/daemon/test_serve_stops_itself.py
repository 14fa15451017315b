"""A daemon told to stop over its control socket (snapuserd's ``stop``) exits.

``stop`` has no reply: the client can only see the process end, with its
FUSE mount gone and what it acknowledged written.
"""

from __future__ import annotations

import os
import socket
import subprocess


def test_snapuserd_stop_ends_the_serve_process(serve, tmp_path):
    image = tmp_path / "disk.img"
    daemon = serve(f"file:path={image},size=4M,create=yes")
    with open(daemon.path, "r+b", buffering=0) as f:
        f.write(b"s" * 4096)
        os.fsync(f.fileno())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(daemon.control))
        sock.sendall(b"stop")
    try:
        code = daemon.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the daemon did not exit after 'stop':\n{daemon.log_text()}") from None
    assert code == 0, daemon.log_text()
    assert not os.path.ismount(daemon.fuse_dir)
    assert image.read_bytes()[:4096] == b"s" * 4096
