"""FUSE's two in-process devices: direct typed requests (the default) and the dm-user kernel model
(``emulate=dm-user``), both under a real loop device and ext4; and the options refused by name."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from daemon_harness import mounted, run


@pytest.mark.parametrize("options", ["", ",emulate=dm-user,channels=2"])
def test_both_modes_serve_a_filesystem(serve, tmp_path, options):
    daemon = serve("memory:size=64M", export_options=options)
    loop = daemon.attach_loop()
    run("mkfs.ext4", "-q", "-F", loop)
    with mounted(loop, tmp_path / "mnt") as mnt:
        data = os.urandom(3 << 20)
        (mnt / "f").write_bytes(data)
        os.sync()
    with mounted(loop, tmp_path / "mnt") as mnt:
        assert (mnt / "f").read_bytes() == data
    assert run("fsck.ext4", "-n", loop, check=False).returncode == 0
    status = daemon.status()["targets"]["disk"]
    assert status["requests"]["write"] > 0 and status["errors"] == 0


@pytest.mark.parametrize("options, message", [
    (",channels=4", "channels= is for emulate=dm-user"),
    (",emulate=nbd", "option emulate: 'nbd' is not one of dm-user"),
    (",emulate=dm-user,channels=0", "option channels: '0' is out of range (use 1 to 64)"),
    (",fast=1", "unknown option(s) fast"),
])
def test_bad_fuse_options_are_refused_by_name(tmp_path, options, message):
    result = subprocess.run([sys.executable, "-m", "dmuserd", "serve", "--backend", "memory:size=1M",
                             "--export", f"fuse:{tmp_path / 'fuse'}{options}",
                             "--control-socket", str(tmp_path / "c.sock")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
