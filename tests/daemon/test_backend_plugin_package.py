"""A backend in a package of its own, installed with pip, served for real.

The package is the README's example (``docs/examples/pattern-backend``): pip
builds and installs it (into a folder on ``PYTHONPATH``, so the project's
virtualenv stays as it is), and ``dmuserd serve --backend pattern:...``
finds it through the ``dmuserd.backends`` entry point and serves it over FUSE.
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_harness import DMUSERD, ServedDaemon, need_root_tools, pip_install

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "pattern-backend"
SIZE = 64 << 20


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    return pip_install(EXAMPLE, tmp_path_factory.mktemp("site"), "dmuserd_pattern.py")


def expected(offset: int, length: int) -> bytes:
    first = offset - offset % 8
    words = b"".join(struct.pack(">Q", n) for n in range(first, offset + length + 8, 8))
    return words[offset - first : offset - first + length]


def test_the_installed_package_is_found_by_name(installed):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    code = ("import trio; from dmuserd.backends import from_spec\n"
            "b = from_spec('pattern:size=1M,block_size=4K')\n"
            "print(b.size, b.block_size, sorted(op.value for op in b.capabilities), trio.run(b.read, 4096, 16).hex())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1048576", "4096", "['read']", expected(4096, 16).hex()]

    # An option it does not take is refused by name, in one line, before anything is served.
    bad = subprocess.run(DMUSERD + ["serve", "--backend", "pattern:size=1M,colour=red", "--export", "fuse:/nonexistent"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    assert "colour" in bad.stderr and "Traceback" not in bad.stderr


def test_served_over_fuse(installed, tmp_path, monkeypatch):
    need_root_tools()
    monkeypatch.setenv("PYTHONPATH", str(installed))
    daemon = ServedDaemon(tmp_path, f"pattern:size={SIZE}")
    try:
        assert daemon.path.stat().st_size == SIZE
        fd = os.open(daemon.path, os.O_RDWR)
        try:
            for offset, length in ((0, 4096), (12345, 777), (SIZE - 1000, 1000), (5 << 20, 1 << 20)):
                assert os.pread(fd, length, offset) == expected(offset, length), (offset, length)
            # No write in the backend: the write fails alone, reads go on.
            with pytest.raises(OSError) as failed:
                os.pwrite(fd, b"x" * 4096, 8192)
            assert failed.value.errno in (errno.EIO, errno.EOPNOTSUPP)
            assert os.pread(fd, 4096, 8192) == expected(8192, 4096)
        finally:
            os.close(fd)
        target = daemon.status()["targets"]["disk"]
        assert target["unsupported"] >= 1 and target["errors"] == 0
        assert target["bytes_read"] >= 4096 + (1 << 20)
    finally:
        daemon.cleanup()
