"""Fixtures of the fuzz storms (issue #21): served daemons and the files they use.

Every storm runs against a real daemon; see ``fuzz_lib`` for how a storm
runs and what it checks, and for the hypothesis settings (`make test`: few
examples, derandomized; `make fuzz`: many, random).
"""

from __future__ import annotations

import os

import pytest

from fuzz_lib import MiB, FuzzDaemon, pattern  # noqa: F401 - fuzz_lib also puts tests/daemon on sys.path
from nbd_harness import need_nbd_tools


@pytest.fixture(scope="module")
def snapshot_files(tmp_path_factory):
    """A valid snapshot (``base.img`` + ``s.cow``, 1 MiB, v2) and files that are not one.

    Returns a dict of names to paths: ``base``, ``target``, ``cow`` (valid),
    ``other`` (an image the size of base), ``garbage`` (random bytes),
    ``empty``, ``fifo`` (a named pipe: opening it blocks until a writer
    comes), ``dir`` (their directory).
    """
    from dmuserd.snapshot._cow_tools import create_cow

    d = tmp_path_factory.mktemp("snap")
    base = bytearray(pattern(1 * MiB, 3))
    target = bytearray(base)
    target[8192:12288] = pattern(4096, 4)
    target[200 * 4096: 203 * 4096] = pattern(3 * 4096, 5)
    (d / "base.img").write_bytes(base)
    (d / "target.img").write_bytes(target)
    create_cow(d / "base.img", d / "target.img", d / "s.cow", version=2, progress=False)
    (d / "other.img").write_bytes(bytes(1 * MiB))
    (d / "garbage.cow").write_bytes(os.urandom(64 * 1024))
    (d / "empty.cow").write_bytes(b"")
    os.mkfifo(d / "fifo")
    return {"base": d / "base.img", "target": d / "target.img", "cow": d / "s.cow", "other": d / "other.img",
            "garbage": d / "garbage.cow", "empty": d / "empty.cow", "fifo": d / "fifo", "dir": d}


@pytest.fixture
def nbd_daemon():
    """A served daemon: target ``disk`` (memory, 8 MiB) over NBD, reference data written."""
    need_nbd_tools()
    daemon = FuzzDaemon("nbd")
    yield daemon
    daemon.cleanup()


@pytest.fixture
def control_daemon(snapshot_files, tmp_path):
    """A served daemon for the control socket storms: ``disk`` over NBD and a snapshot target ``snap``.

    ``snap`` (base + COW, over NBD too) gives ``merge`` something to merge;
    its base is a copy per test, so merges the storm starts stay its own.
    """
    need_nbd_tools()
    base = tmp_path / "base.img"
    base.write_bytes(snapshot_files["base"].read_bytes())
    extra = ("[targets.snap]\n"
             f'backend = {{ type = "snapshot", base = "{base}", cow = "{snapshot_files["cow"]}" }}\n'
             'exports = ["nbd:{workdir}/snap.sock,on-stop=stop"]\n')
    daemon = FuzzDaemon("nbd", extra_toml=extra, extra_nbd=("snap",))
    yield daemon
    daemon.cleanup()


@pytest.fixture
def fuse_daemon():
    """A served daemon: target ``disk`` (memory, 8 MiB, 4 KiB blocks) as a file in a FUSE mount (root)."""
    from daemon_harness import need_root_tools

    need_root_tools()
    daemon = FuzzDaemon("fuse", block_size=4096)
    yield daemon
    daemon.cleanup()
