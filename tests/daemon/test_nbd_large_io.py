"""32 MiB requests (the NBD maximum block size) through the NBD export, byte for byte.

A 32 MiB WRITE arrives at the daemon in many socket reads and is one
dm-user message; a 32 MiB READ answer leaves it in one ``sendmsg`` and the
plugin receives it straight into nbdkit's buffer. These tests check the
bytes, and that each request really crossed as one message.
"""

from __future__ import annotations

import os
import subprocess

from nbd_harness import need_nbd_tools, qemu_io

MAX_REQUEST = 32 << 20


def test_32mib_write_then_read_back_with_qemu_io(nbd_session):
    need_nbd_tools("qemu-io")
    daemon = nbd_session.start(f"memory:size={2 * MAX_REQUEST}")
    before = daemon.status()["targets"]["disk"]
    qemu_io(nbd_session.uri, f"write -P 0xab 512 {MAX_REQUEST}", f"read -P 0xab 512 {MAX_REQUEST}",
            "read -P 0 0 512", f"read -P 0 {MAX_REQUEST + 512} 512")
    after = daemon.status()["targets"]["disk"]
    # One WRITE and one READ of the whole 32 MiB (besides the two small reads).
    assert after["requests"]["write"] - before["requests"]["write"] == 1
    assert after["bytes_written"] - before["bytes_written"] == MAX_REQUEST
    assert after["bytes_read"] - before["bytes_read"] == MAX_REQUEST + 1024
    assert after["errors"] == 0


def test_32mib_random_image_round_trip_with_nbdcopy(nbd_session, tmp_path):
    need_nbd_tools("nbdcopy")
    nbd_session.start(f"memory:size={2 * MAX_REQUEST}")
    source = tmp_path / "in.img"
    source.write_bytes(os.urandom(2 * MAX_REQUEST))
    out = tmp_path / "out.img"
    for args in ([source, nbd_session.uri], [nbd_session.uri, out]):
        subprocess.run(["nbdcopy", f"--request-size={MAX_REQUEST}", "--requests=2", *map(str, args)],
                       check=True, capture_output=True, timeout=120)
    assert out.read_bytes() == source.read_bytes()
