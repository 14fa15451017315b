"""The NBD export with real clients: nbdinfo, qemu-io, qemu-img, nbdcopy, fio.

One daemon (memory backend) serves the whole module; each test checks what
a client sees against what the backend holds or can do.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from daemon_harness import DMUSERD, run
from dmuserd.daemon.nbd import state_dir_for
from nbd_harness import NbdSession, fio_nbd, need_nbd_tools, qemu_io

SIZE = 64 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    need_nbd_tools("nbdinfo", "qemu-io", "qemu-img", "nbdcopy", "fio")
    session = NbdSession(tmp_path_factory.mktemp("nbd"))
    daemon = session.start(f"memory:size={SIZE}")
    yield session, daemon
    session.cleanup()


def test_nbdinfo_reports_the_backend(served):
    session, daemon = served
    info = json.loads(run("nbdinfo", "--json", session.uri).stdout)["exports"][0]
    assert info["export-size"] == SIZE
    assert (info["block_size_minimum"], info["block_size_preferred"], info["block_size_maximum"]) == (512, 4096, 32 << 20)
    # memory serves every operation: all of it is advertised.
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn", "can_cache"):
        assert info[flag] is True, flag
    assert info["is_read_only"] is False
    assert info["is_rotational"] is False
    assert daemon.status()["targets"]["disk"]["exports"]["nbd"] == session.uri


def test_nbdinfo_read_only_backend(tmp_path):
    """``zero`` serves reads (and flush) only: the export is read-only, without trim or zero."""
    need_nbd_tools("nbdinfo")
    session = NbdSession(tmp_path)
    try:
        session.start("zero:size=1M,block_size=4096")
        info = json.loads(run("nbdinfo", "--json", session.uri).stdout)["exports"][0]
        assert info["export-size"] == 1 << 20
        assert info["block_size_minimum"] == 4096
        assert info["is_read_only"] is True
        assert info["can_trim"] is False and info["can_zero"] is False and info["can_fast_zero"] is False
        assert info["can_flush"] is True  # the zero backend has a (no-op) flush
    finally:
        session.cleanup()


def test_qemu_io_patterns_at_odd_offsets(served):
    session, _ = served
    spans = [(1, 1, 0x11), (511, 2, 0x22), (4095, 4099, 0x33), (65537, 131071, 0x44), (1_000_003, 7, 0x55)]
    qemu_io(session.uri, *[f"write -P {p:#x} {o} {n}" for o, n, p in spans])
    qemu_io(session.uri, *[f"read -P {p:#x} {o} {n}" for o, n, p in spans])
    # What lies between the spans is untouched.
    qemu_io(session.uri, "read -P 0 0 1", "read -P 0 2 509", "read -P 0 513 3582", "read -P 0 8194 57343")


def test_qemu_img_convert_round_trip(served, tmp_path):
    session, _ = served
    source = tmp_path / "in.img"
    source.write_bytes(os.urandom(8 << 20))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, session.uri)
    out = tmp_path / "out.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", session.uri, out)
    assert out.stat().st_size == SIZE
    with open(out, "rb") as f:
        head = f.read(8 << 20)
    assert head == source.read_bytes()
    run("cmp", "-n", str(8 << 20), source, out)


def test_nbdcopy_both_ways(served, tmp_path):
    session, _ = served
    source = tmp_path / "src.img"
    source.write_bytes(os.urandom(SIZE))
    run("nbdcopy", source, session.uri)
    back = tmp_path / "back.img"
    run("nbdcopy", session.uri, back)
    run("cmp", source, back)


def test_fio_random_write_verify(served, tmp_path):
    session, _ = served
    job = fio_nbd(session.uri, tmp_path, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M",
                  "--verify=crc32c", "--do_verify=1", "--randrepeat=0")
    assert job["_rc"] == 0, job["_stderr"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 16 << 20
    assert job["read"]["io_bytes"] >= 16 << 20  # the verify pass read it all back


def test_trim_and_zero_reach_the_backend(served):
    session, daemon = served
    before = daemon.requests()
    qemu_io(session.uri, "write -P 0x77 1M 256k", "discard 1M 64k", "write -z 1280k 64k",
            "write -z -u 1344k 64k", "flush")
    after = daemon.requests()
    assert after["discard"] > before["discard"]
    assert after["write_zeroes"] >= before["write_zeroes"] + 2
    assert after["flush"] > before["flush"]
    # memory zeroes discarded ranges, so all of it reads back as zeros now.
    qemu_io(session.uri, "read -P 0 1M 64k", "read -P 0 1280k 128k", "read -P 0x77 1088k 192k")


def test_backend_errors_reach_the_client(tmp_path):
    """A failing read is EIO at the client; the export keeps serving."""
    need_nbd_tools("qemu-io")
    session = NbdSession(tmp_path)
    try:
        daemon = session.start("faulty:size=4M,fail=1M+4K,ops=read")
        result = qemu_io(session.uri, "read 1M 4k", check=False)
        assert "Input/output error" in result.stdout + result.stderr
        qemu_io(session.uri, "write -P 0x5a 0 4k", "read -P 0x5a 0 4k")
        assert daemon.status()["targets"]["disk"]["errors"] >= 1
    finally:
        session.cleanup()


def test_private_sockets_are_owner_only(served):
    session, _ = served
    assert os.stat(session.state_dir).st_mode & 0o777 == 0o700
    assert os.stat(session.state_dir / "ch.sock").st_mode & 0o777 == 0o600
    nbdkit = session.nbdkit_pid()
    assert nbdkit is not None
    # nbdkit runs the plugin from this tree with the channel in the private directory.
    cmdline = open(f"/proc/{nbdkit}/cmdline", "rb").read().split(b"\0")
    assert f"channel={session.state_dir / 'ch.sock'}".encode() in cmdline
    assert subprocess.run(["test", "-S", str(session.socket)]).returncode == 0


def test_tcp_export(tmp_path):
    """``nbd:tcp:HOST:PORT``: the same export on a TCP socket (stopped with the daemon here)."""
    need_nbd_tools("nbdinfo")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    where = f"tcp:127.0.0.1:{port}"
    control = tmp_path / "control.sock"
    log = open(tmp_path / "daemon.log", "w+")
    proc = subprocess.Popen(DMUSERD + ["serve", "--backend", "memory:size=3M", "--export", f"nbd:{where},on-stop=stop",
                                       "--control-socket", str(control)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if control.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert control.exists(), (tmp_path / "daemon.log").read_text()
        info = json.loads(run("nbdinfo", "--json", f"nbd://127.0.0.1:{port}").stdout)["exports"][0]
        assert info["export-size"] == 3 << 20
        assert os.stat(state_dir_for(where)).st_mode & 0o777 == 0o700
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, (tmp_path / "daemon.log").read_text()
        log.close()
        shutil.rmtree(state_dir_for(where), ignore_errors=True)
    # on-stop=stop: nothing listens on the port any more.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_systemd_socket_activation(tmp_path):
    """A socket passed by systemd (``LISTEN_FDS``) becomes nbdkit's: the first client starts it all."""
    need_nbd_tools("nbdinfo", "systemd-socket-activate")
    session = NbdSession(tmp_path)
    control = tmp_path / "control.sock"
    log = open(tmp_path / "daemon.log", "w+")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(session.socket), "--", *DMUSERD, "serve",
         "--backend", "memory:size=5M", "--export", f"nbd:{session.socket}", "--control-socket", str(control)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if session.socket.exists():
                break
            time.sleep(0.05)
        # This connection waits in the listen queue while the daemon and nbdkit start.
        size = run("nbdinfo", "--size", session.uri, timeout=60).stdout.strip()
        assert size == str(5 << 20)
        text = (tmp_path / "daemon.log").read_text()
        assert "using the NBD socket systemd passed" in text, text
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        session.cleanup()
