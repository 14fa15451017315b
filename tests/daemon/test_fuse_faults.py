"""A failing backend fails exactly the requests it fails; the device stays up."""

from __future__ import annotations

import errno
import os

import pytest

BLOCK = 4096


def test_injected_failures_give_eio_only_there(serve):
    # Blocks 10 and 300 fail; everything else is a working RAM disk.
    daemon = serve(f"faulty:size=4M,fail={10 * BLOCK}+{BLOCK}/{300 * BLOCK}+{BLOCK},ops=read/write")
    fd = os.open(daemon.path, os.O_RDWR)
    try:
        for block in (10, 300):
            with pytest.raises(OSError) as excinfo:
                os.pread(fd, BLOCK, block * BLOCK)
            assert excinfo.value.errno == errno.EIO
            with pytest.raises(OSError) as excinfo:
                os.pwrite(fd, b"x" * BLOCK, block * BLOCK)
            assert excinfo.value.errno == errno.EIO
        for block in (0, 9, 11, 299, 301, 1023):
            payload = bytes([block % 251]) * BLOCK
            assert os.pwrite(fd, payload, block * BLOCK) == BLOCK
            assert os.pread(fd, BLOCK, block * BLOCK) == payload
        # A read spanning a failing block fails as a whole...
        with pytest.raises(OSError):
            os.pread(fd, 3 * BLOCK, 9 * BLOCK)
    finally:
        os.close(fd)
    # ...and the daemon is still up and counted each failure.
    status = daemon.status()["targets"]["disk"]
    assert status["errors"] == 5
    assert daemon.proc.poll() is None


def test_out_of_range_and_truncate_are_refused(serve):
    daemon = serve("memory:size=1M")
    fd = os.open(daemon.path, os.O_RDWR)
    try:
        assert os.pread(fd, 4096, 1024 * 1024) == b""  # reading at the end: EOF
        with pytest.raises(OSError) as excinfo:
            os.pwrite(fd, b"x" * 4096, 1024 * 1024)
        assert excinfo.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as excinfo:
            os.ftruncate(fd, 4096)
        assert excinfo.value.errno == errno.EPERM
        # Unaligned I/O works (read-modify-write of the covering sectors).
        os.pwrite(fd, b"hello", 1000)
        assert os.pread(fd, 7, 999) == b"\0hello\0"
    finally:
        os.close(fd)
    assert os.path.getsize(daemon.path) == 1024 * 1024
