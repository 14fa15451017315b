"""Run ``dmuserd serve --export nbd:...`` and real NBD clients from tests.

A uniquely named helper module (the FUSE helpers live in ``daemon_harness``).
Both NBD fronts start the same way (:data:`FRONTS`: nbdkit with the
daemon's plugin, the default, or the daemon's own server), so one client
suite runs against either. The export's nbdkit outlives a daemon on
purpose, so :class:`NbdSession` remembers every nbdkit it saw and stops
them at the end of a test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest

from daemon_harness import DMUSERD, daemon_status, terminate
from dmuserd.daemon.nbd import state_dir_for

#: The NBD fronts, as ``server=`` names them: nbdkit + the python plugin (the default), the daemon's own server.
FRONTS = ("nbdkit", "dmuserd")


def need_tools(*tools: str) -> None:
    """Skip unless the named tools exist."""
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


def need_nbd_tools(*tools: str) -> None:
    """Skip unless nbdkit's python plugin and the named client tools exist."""
    need_tools("nbdkit", *tools)
    probe = subprocess.run(["nbdkit", "python", "--dump-plugin"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("nbdkit's python plugin is not installed (apt-get install nbdkit-plugin-python)")


def need_front_tools(front: str, *tools: str) -> None:
    """Skip unless ``front`` (one of :data:`FRONTS`) and the named client tools can run here."""
    if front == "nbdkit":
        need_nbd_tools(*tools)
    else:
        need_tools(*tools)


class NbdDaemon:
    """One ``dmuserd serve`` process with one NBD export."""

    def __init__(self, session: "NbdSession", backend: str, options: str = "", name: str = "disk",
                 launcher: Sequence[str] = ()) -> None:
        """``launcher``: a command that runs the daemon (``systemd-socket-activate ... --``), if any."""
        self.session = session
        session.starts += 1
        self.control = session.workdir / f"control{session.starts}.sock"
        self.log_path = session.workdir / f"daemon{session.starts}.log"
        self.log = open(self.log_path, "w+")
        if session.front != "nbdkit":
            options += f",server={session.front}"
        self.proc = subprocess.Popen(
            [*launcher, *DMUSERD, "serve", "--name", name, "--backend", backend,
             "--export", f"nbd:{session.where}{options}", "--control-socket", str(self.control)],
            stdout=self.log, stderr=subprocess.STDOUT,
            # Kept nbdkits register in the test's directory (unless the test chose one), not in /run.
            env={"DMUSERD_NBD_REGISTRY": str(session.workdir / "nbd-registry"), **os.environ},
        )

    def wait_ready(self, timeout: float = 30.0) -> "NbdDaemon":
        """Wait until the daemon serves (its control socket appears after every export)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            if self.control.exists():
                pid = self.session.nbdkit_pid()
                if pid is not None:
                    self.session.nbdkit_pids.add(pid)
                # The daemon's own server starts no nbdkit: none may serve this socket.
                assert pid is None or self.session.front == "nbdkit", f"nbdkit {pid} serves server={self.session.front}"
                return self
            time.sleep(0.02)
        raise AssertionError(f"daemon not ready in {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def log_events(self) -> list[dict]:
        events = []
        for line in self.log_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        return events

    def status(self) -> dict:
        return daemon_status(self.control)

    def requests(self) -> dict:
        return self.status()["targets"]["disk"]["requests"]

    def kill(self) -> None:
        """SIGKILL: the daemon dies without any clean-up."""
        self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        return terminate(self.proc, timeout)


class NbdSession:
    """Daemons serving one NBD socket, one after another, and the nbdkit they share.

    ``front``: which NBD server the daemons start (one of :data:`FRONTS`);
    ``tcp_port``: serve ``tcp:127.0.0.1:PORT`` instead of the Unix socket
    ``workdir/disk.sock``.
    """

    def __init__(self, workdir: Path, front: str = "nbdkit", tcp_port: int | None = None) -> None:
        self.workdir = workdir
        self.front = front
        self.tcp_port = tcp_port
        self.socket = workdir / "disk.sock"
        self.state_dir = state_dir_for(self.where) if tcp_port else workdir / ".disk.sock.dmuserd"
        self.daemons: list[NbdDaemon] = []
        self.nbdkit_pids: set[int] = set()
        self.starts = 0

    @property
    def where(self) -> str:
        """The export's WHERE (``nbd:WHERE``)."""
        return f"tcp:127.0.0.1:{self.tcp_port}" if self.tcp_port else str(self.socket)

    @property
    def uri(self) -> str:
        if self.tcp_port:
            return f"nbd://127.0.0.1:{self.tcp_port}/"
        return f"nbd+unix:///?socket={self.socket}"

    def start(self, backend: str, options: str = "", wait: bool = True, launcher: Sequence[str] = ()) -> NbdDaemon:
        """A daemon serving ``backend`` (``options``: the export's, each after a comma)."""
        daemon = NbdDaemon(self, backend, options, launcher=launcher)
        self.daemons.append(daemon)
        return daemon.wait_ready() if wait else daemon

    def nbdkit_pid(self) -> int | None:
        """The nbdkit the export's state names, if it runs."""
        try:
            pid = json.loads((self.state_dir / "nbdkit.json").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return None
        return pid if nbdkit_alive(pid) else None

    def cleanup(self) -> None:
        for daemon in self.daemons:
            daemon.terminate()
            daemon.log.close()
        pid = self.nbdkit_pid()
        if pid is not None:
            self.nbdkit_pids.add(pid)
        stop_nbdkits(self.nbdkit_pids)
        if self.tcp_port:
            shutil.rmtree(self.state_dir, ignore_errors=True)  # outside the test's directory


def free_tcp_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def nbdkit_alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) nbdkit."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return "(nbdkit)" in stat and stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def stop_nbdkits(pids: Iterable[int], grace: float = 10.0) -> None:
    """Stop the nbdkits of ``pids`` still running: SIGTERM, up to ``grace`` seconds to exit, then SIGKILL.

    nbdkit outlives the daemon that started it, so a test's session stops the ones it saw (a pid no longer an
    nbdkit is left alone)."""
    pids = list(pids)
    for pid in pids:
        if nbdkit_alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(nbdkit_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if nbdkit_alive(pid):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def open_session(workdir: Path, front: str = "nbdkit", *tools: str, tcp_port: int | None = None) -> Iterator[NbdSession]:
    """An :class:`NbdSession` of ``front`` in ``workdir`` (skipped unless it and ``tools`` can run); its daemons
    and nbdkit stopped at the end."""
    need_front_tools(front, *tools)
    session = NbdSession(workdir, front, tcp_port)
    try:
        yield session
    finally:
        session.cleanup()


@pytest.fixture
def nbd_session(tmp_path):
    """An :class:`NbdSession` in ``tmp_path``; daemons and nbdkit stopped afterwards."""
    with open_session(tmp_path) as session:
        yield session


def qemu_io(uri: str, *commands: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """``qemu-io -f raw -c CMD ... URI``; qemu-io exits 0 even when a command fails, so check stdout."""
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    result = subprocess.run(args + [uri], capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    if check and (result.returncode != 0 or "failed" in output or "error" in output.lower()):
        raise AssertionError(f"qemu-io {commands} failed:\n{output}")
    return result


def read_answer(sock) -> tuple[int, int, int, int, int]:
    """One dm-user answer header from a channel socket (seq, type, flags, sector, len), the spec's layout."""
    data = b""
    while len(data) < 40:
        chunk = sock.recv(40 - len(data))
        assert chunk, "the channel closed without an answer"
        data += chunk
    return struct.unpack("<5Q", data)


def fio_nbd(uri: str, cwd, *options: str, timeout: float = 120) -> dict:
    """Run fio's nbd engine on ``uri`` in ``cwd``; return the job's JSON result."""
    result = subprocess.run(
        ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", "--verify_state_save=0",
         *options],
        capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )
    try:
        report = json.loads(result.stdout[result.stdout.index("{"):])
    except ValueError:
        raise AssertionError(f"fio produced no JSON (rc {result.returncode}):\n{result.stdout}\n{result.stderr}") from None
    job = report["jobs"][0]
    job["_rc"] = result.returncode
    job["_stderr"] = result.stderr
    return job
