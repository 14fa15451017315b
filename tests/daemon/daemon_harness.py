"""Run the real daemon (``dmuserd serve``) and real block tools from tests.

A uniquely named module (not conftest) so test files can import it without
clashing with other folders' conftest modules."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DMUSERD = [sys.executable, "-m", "dmuserd"]


def need_root_tools(*tools: str) -> None:
    """Skip unless we are root with /dev/fuse and the named tools."""
    if os.geteuid() != 0:
        pytest.skip("needs root (FUSE mount with allow_other, loop devices, mount)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing on this machine")
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


def wait_until(predicate, what: str, timeout: float = 15.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds.

    For what another process does a moment later: wait for the very thing a
    test then asserts, not for a guessed time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def run(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kwargs)


def terminate(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def pip_install(package: Path, into: Path, module: str) -> Path:
    """``pip install`` the plug-in package folder ``package`` into folder ``into`` (for ``PYTHONPATH``:
    the project's virtualenv stays as it is); ``into``, once ``module`` is there."""
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(into),
                             str(package)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (into / module).exists(), f"{module} is not where pip installed {package}"
    return into


def daemon_status(control) -> dict:
    """``dmuserd status --json`` of the daemon at control socket ``control``."""
    return json.loads(run(*DMUSERD, "status", "--json", "--control-socket", control).stdout)


class ServedDaemon:
    """A ``dmuserd serve`` subprocess with one FUSE-exported target."""

    def __init__(self, workdir: Path, backend: str, name: str = "disk", export_options: str = "") -> None:
        self.workdir = workdir
        self.fuse_dir = workdir / "fuse"
        self.control = workdir / "control.sock"
        self.path = self.fuse_dir / name
        self.log = open(workdir / "daemon.log", "w+")
        self.proc = subprocess.Popen(
            DMUSERD + ["serve", "--name", name, "--backend", backend, "--export", f"fuse:{self.fuse_dir}{export_options}",
                       "--control-socket", str(self.control)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.loops: list[str] = []
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            if self.path.exists() and self.control.exists():
                return
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready in {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def status(self) -> dict:
        return daemon_status(self.control)

    def attach_loop(self, direct_io: bool = True) -> str:
        args = ["losetup", "--find", "--show"] + (["--direct-io=on"] if direct_io else []) + [self.path]
        device = run(*args).stdout.strip()
        self.loops.append(device)
        return device

    def terminate(self, timeout: float = 30.0) -> int:
        return terminate(self.proc, timeout)

    def cleanup(self) -> None:
        for device in self.loops:
            run("losetup", "-d", device, check=False)
        self.terminate()
        if os.path.ismount(self.fuse_dir):
            run("umount", "-l", self.fuse_dir, check=False)
        self.log.close()


@contextlib.contextmanager
def mounted(device: str, mountpoint: Path):
    mountpoint.mkdir(exist_ok=True)
    run("mount", device, mountpoint)
    try:
        yield mountpoint
    finally:
        run("umount", mountpoint, check=False)
