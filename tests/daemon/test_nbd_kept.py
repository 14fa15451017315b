"""A kept nbdkit ends by itself once it has outlived its purpose; ``dmuserd nbd list`` / ``stop``.

Real daemons, real nbdkit, real clients. Every test registers its nbdkit in
a registry of its own (``$DMUSERD_NBD_REGISTRY``), so ``nbd list`` and
``nbd stop --all`` here never see (or stop) another test's nbdkit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from daemon_harness import DMUSERD, run, wait_until
from dmuserd.backends.memory import MemoryBackend
from dmuserd.daemon.config import parse_export
from dmuserd.daemon.nbd import DEFAULT_IDLE_EXIT, NbdError, _nbdkit_command, settings_for
from nbd_harness import NbdSession, nbdkit_alive, need_nbd_tools


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Path:
    """This test's registry; daemons and ``dmuserd nbd`` started from here use it."""
    path = tmp_path / "registry"
    monkeypatch.setenv("DMUSERD_NBD_REGISTRY", str(path))
    return path


def nbd_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(DMUSERD + ["nbd", *args], capture_output=True, text=True, timeout=60)


def listed() -> list[dict]:
    result = nbd_cli("list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def exit_reason(session: NbdSession) -> str:
    """The plugin's last word in ``nbdkit.log``."""
    lines = [line for line in (session.state_dir / "nbdkit.log").read_text().splitlines() if "exiting:" in line]
    assert lines, "nbdkit did not say why it exited"
    return lines[-1]


class _Target:
    backend = MemoryBackend(1 << 20, 4096)


def test_idle_exit_option():
    def idle_exit(options: str) -> float:
        return settings_for(_Target(), parse_export(f"nbd:/tmp/d.sock{options}")).idle_exit

    assert idle_exit("") == DEFAULT_IDLE_EXIT == 600
    assert idle_exit(",idle-exit=0") == 0
    assert idle_exit(",idle-exit=2.5") == 2.5
    for bad in ("-1", "x", "inf", "nan"):
        with pytest.raises(NbdError, match="idle-exit"):
            idle_exit(f",idle-exit={bad}")


def test_the_socket_path_is_watched_only_where_the_daemon_bound_it(tmp_path):
    need_nbd_tools()
    settings = settings_for(_Target(), parse_export(f"nbd:{tmp_path}/d.sock,idle-exit=7"))
    own = _nbdkit_command(settings, tmp_path)
    assert f"nbd_socket={tmp_path}/d.sock" in own and "idle_exit=7.0" in own
    assert not [arg for arg in _nbdkit_command(settings, tmp_path, systemd_socket=True) if "nbd_socket=" in arg]
    tcp = settings_for(_Target(), parse_export("nbd:tcp:127.0.0.1:10809"))
    assert not [arg for arg in _nbdkit_command(tcp, tmp_path) if "nbd_socket=" in arg]


@pytest.mark.parametrize("remove", ["unlink the socket", "delete its directory"])
def test_a_kept_nbdkit_exits_when_its_socket_is_gone(nbd_session, registry, remove):
    session = nbd_session
    if remove == "delete its directory":
        session.socket = session.workdir / "exports" / "disk.sock"
        session.state_dir = session.socket.parent / ".disk.sock.dmuserd"
    daemon = session.start("memory:size=1M", ",idle-exit=0")  # never idle: only the socket can end it
    nbdkit = session.nbdkit_pid()
    assert daemon.terminate() == 0
    assert nbdkit_alive(nbdkit)  # kept (on-stop=keep)
    if remove == "unlink the socket":
        session.socket.unlink()
    else:
        shutil.rmtree(session.socket.parent)
    wait_until(lambda: not nbdkit_alive(nbdkit), "the kept nbdkit exits")
    assert not (registry / f"{nbdkit}.json").exists()
    if remove == "unlink the socket":
        assert "NBD socket" in exit_reason(session) and "is gone" in exit_reason(session)
        assert not (session.state_dir / "nbdkit.json").exists()
    # The next daemon starts an nbdkit of its own, and serves.
    session.start("memory:size=1M")
    assert session.nbdkit_pid() not in (None, nbdkit)
    assert run("nbdinfo", "--size", session.uri, timeout=30).stdout.strip() == str(1 << 20)


def test_an_unclaimed_kept_nbdkit_exits_after_idle_exit(nbd_session, registry):
    need_nbd_tools("nbdinfo")
    daemon = nbd_session.start("memory:size=1M", ",idle-exit=1")
    nbdkit = nbd_session.nbdkit_pid()
    assert daemon.terminate() == 0
    wait_until(lambda: not nbdkit_alive(nbdkit), "the kept nbdkit exits after idle-exit")
    assert "(idle-exit)" in exit_reason(nbd_session)
    # It took its state along: the socket it served, nbdkit.json, its record.
    assert not nbd_session.socket.exists()
    assert not (nbd_session.state_dir / "nbdkit.json").exists()
    assert list(registry.glob("*.json")) == []
    nbd_session.start("memory:size=2M")  # a different size: it would be refused by a live nbdkit
    assert nbd_session.nbdkit_pid() not in (None, nbdkit)
    assert run("nbdinfo", "--size", nbd_session.uri, timeout=30).stdout.strip() == str(2 << 20)


def test_an_attached_daemon_keeps_it(nbd_session, registry):
    need_nbd_tools("nbdinfo")
    daemon = nbd_session.start("memory:size=1M", ",idle-exit=1")
    nbdkit = nbd_session.nbdkit_pid()
    time.sleep(3)  # idle-exit three times over: the watch looked a few times
    assert nbd_session.nbdkit_pid() == nbdkit
    assert run("nbdinfo", "--size", nbd_session.uri, timeout=30).stdout.strip() == str(1 << 20)
    assert [v["daemon_attached"] for v in listed()] == [True]
    # The timer was armed all along: without the daemon, it goes.
    assert daemon.terminate() == 0
    wait_until(lambda: not nbdkit_alive(nbdkit), "the kept nbdkit exits once the daemon left")


def test_a_connected_client_keeps_it(nbd_session, registry):
    need_nbd_tools("qemu-io")
    daemon = nbd_session.start("memory:size=1M", ",idle-exit=1")
    nbdkit = nbd_session.nbdkit_pid()
    # qemu-io reading commands from a pipe holds its connection until "quit" (read-only: no flush then).
    client = subprocess.Popen(["qemu-io", "-r", "-f", "raw", nbd_session.uri], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: [v["clients"] for v in listed()] == [1], "the record counts the client")
        assert daemon.terminate() == 0
        wait_until(lambda: [v["daemon_attached"] for v in listed()] == [False], "the record says the daemon left")
        time.sleep(2.5)  # past idle-exit (and a watch interval) without a daemon
        assert nbdkit_alive(nbdkit)
        assert [v["idle_exit_in"] for v in listed()] == [None]  # not idle
    finally:
        out, _ = client.communicate("quit\n", timeout=30)
    assert client.returncode == 0, out
    wait_until(lambda: not nbdkit_alive(nbdkit), "the kept nbdkit exits once its client left")
    assert "(idle-exit)" in exit_reason(nbd_session)


def test_nbd_list_shows_a_kept_one_and_nbd_stop_stops_it(nbd_session, registry):
    daemon = nbd_session.start("memory:size=1M")  # the default idle-exit
    nbdkit = nbd_session.nbdkit_pid()
    socket = str(nbd_session.socket)
    (view,) = listed()
    assert (view["export"], view["pid"], view["daemon_attached"], view["idle_exit"]) == (socket, nbdkit, True, 600)
    refused = nbd_cli("stop", socket)  # the daemon would only start another
    assert refused.returncode == 1 and "stop that daemon first" in refused.stderr, refused.stderr
    assert nbdkit_alive(nbdkit)

    assert daemon.terminate() == 0
    wait_until(lambda: [v["daemon_attached"] for v in listed()] == [False], "the record says the daemon left")
    (view,) = listed()
    assert view["pid"] == nbdkit and view["clients"] == 0 and 0 < view["idle_exit_in"] <= 600
    table = nbd_cli("list").stdout
    assert socket in table and str(nbdkit) in table and "none" in table
    # A record whose process is gone (here: our pid, another start time) is not listed, and removed.
    stale = registry / f"{os.getpid()}.json"
    stale.write_text(json.dumps({"pid": os.getpid(), "starttime": 0, "export": "/gone.sock"}))
    assert [v["pid"] for v in listed()] == [nbdkit]
    assert not stale.exists()

    stopped = nbd_cli("stop", socket)
    assert stopped.returncode == 0 and f"stopped nbdkit {nbdkit}" in stopped.stdout, stopped.stderr
    assert not nbdkit_alive(nbdkit)
    assert listed() == []
    assert not (nbd_session.state_dir / "nbdkit.json").exists()
    assert not nbd_session.socket.exists()
    assert nbd_cli("stop", socket).returncode == 1  # nothing left to stop


def test_nbd_stop_all_leaves_the_nbdkit_of_a_running_daemon(tmp_path, registry):
    need_nbd_tools()
    kept, served = NbdSession(tmp_path / "kept"), NbdSession(tmp_path / "served")
    try:
        for session in (kept, served):
            session.workdir.mkdir()
            session.start("memory:size=1M")
        kept_pid, served_pid = kept.nbdkit_pid(), served.nbdkit_pid()
        assert kept.daemons[0].terminate() == 0
        result = nbd_cli("stop", "--all")
        assert result.returncode == 0, result.stderr
        assert f"stopped nbdkit {kept_pid}" in result.stdout
        assert str(served.socket) in result.stderr and "left running" in result.stderr
        assert not nbdkit_alive(kept_pid) and nbdkit_alive(served_pid)
        assert [v["pid"] for v in listed()] == [served_pid]
    finally:
        kept.cleanup()
        served.cleanup()


def test_the_socket_of_systemd_is_left_to_systemd(tmp_path, registry):
    """A socket passed by systemd (here systemd-socket-activate): removing its file does not end nbdkit."""
    need_nbd_tools("nbdinfo", "systemd-socket-activate")
    session = NbdSession(tmp_path)
    control = tmp_path / "control.sock"
    log = open(tmp_path / "daemon.log", "w+")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(session.socket), "-E", "DMUSERD_NBD_REGISTRY",  # it passes few
         "--", *DMUSERD, "serve", "--backend", "memory:size=1M",
         "--export", f"nbd:{session.socket},idle-exit=2", "--control-socket", str(control)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(session.socket.exists, "systemd-socket-activate listens")
        # This client waits in the listen queue while the daemon and nbdkit start.
        assert run("nbdinfo", "--size", session.uri, timeout=60).stdout.strip() == str(1 << 20)
        wait_until(control.exists, "the daemon is ready")
        nbdkit = session.nbdkit_pid()
        session.nbdkit_pids.add(nbdkit)
        assert [v["pid"] for v in listed()] == [nbdkit]
        proc.terminate()
        assert proc.wait(30) == 0
        session.socket.unlink()  # as systemd does when its socket unit stops (RemoveOnStop=yes)
        wait_until(lambda: not nbdkit_alive(nbdkit), "the kept nbdkit exits after idle-exit")
        assert "(idle-exit)" in exit_reason(session)  # not the socket's removal
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        session.cleanup()
