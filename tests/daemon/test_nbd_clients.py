"""The NBD export with real clients: nbdinfo, qemu-io, qemu-img, nbdcopy, fio.

One client suite for both NBD fronts (ids ``nbdkit``: nbdkit with the
daemon's python plugin, the default; ``dmuserd``: ``server=dmuserd``, the
daemon's own NBD server): a client must not see which one serves it. One
daemon per front (memory backend) serves the tests that take ``served``;
the others start their own with the ``front`` they are given. Each test
checks what a client sees against what the backend holds or can do. A test
about one front only (nbdkit's channel, what each front reports of itself)
says so; what only the built-in server has (hostile clients, its bounds and
memory budget, its stop, its options) is in test_nbd_server.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from daemon_harness import run
from nbd_harness import FRONTS, fio_nbd, free_tcp_port, open_session, qemu_io

SIZE = 64 << 20
#: What every front advertises for a memory backend (it serves every operation).
MEMORY_FLAGS = ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache")


@pytest.fixture(scope="module", params=FRONTS)
def served(request, tmp_path_factory):
    """(session, daemon): a memory backend of SIZE served by the front ``request.param``, for the module."""
    with open_session(tmp_path_factory.mktemp(request.param), request.param,
                      "nbdinfo", "qemu-io", "qemu-img", "nbdcopy", "fio") as session:
        yield session, session.start(f"memory:size={SIZE}")


@pytest.fixture(params=FRONTS)
def front(request) -> str:
    """The front a test that starts its own daemons uses."""
    return request.param


def test_nbdinfo_reports_the_backend(served):
    session, daemon = served
    info = json.loads(run("nbdinfo", "--json", session.uri).stdout)["exports"][0]
    assert info["export-size"] == SIZE
    assert (info["block_size_minimum"], info["block_size_preferred"], info["block_size_maximum"]) == (512, 4096, 32 << 20)
    for flag in MEMORY_FLAGS:
        assert info[flag] is True, flag
    assert info["is_read_only"] is False
    assert info["is_rotational"] is False
    status = daemon.status()["targets"]["disk"]
    assert status["exports"]["nbd"] == session.uri
    # Which front serves: an nbdkit the daemon supervises, or the daemon itself (no nbdkit anywhere).
    if session.front == "nbdkit":
        assert session.nbdkit_pid() is not None
    else:
        assert status["export_status"]["nbd"]["server"] == "dmuserd"
        assert session.nbdkit_pid() is None


def test_fast_zero_is_advertised(served):
    """A memory backend zeroes at once: NBD_FLAG_SEND_FAST_ZERO lets a client (qemu-img convert -n) rely on it."""
    session, _ = served
    info = json.loads(run("nbdinfo", "--json", session.uri).stdout)["exports"][0]
    assert info["can_fast_zero"] is True


def test_structured_replies_and_base_allocation(served):
    """Structured replies are negotiated (so DF is offered) and ``base:allocation`` is the context a client
    finds; nbdinfo --map covers the export, and what it calls a hole reads as zeros (nbdkit's plugin cannot
    tell: all data; the daemon's own server: the memory backend's never-written chunks are holes)."""
    session, _ = served
    qemu_io(session.uri, "write -P 0x6d 48M 192k")  # (the module's tests share the export: their own ranges)
    report = json.loads(run("nbdinfo", "--json", session.uri).stdout)
    assert report["structured"] is True
    info = report["exports"][0]
    assert info["can_df"] is True and info["contexts"] == ["base:allocation"]
    extents = json.loads(run("nbdinfo", "--map", "--json", session.uri).stdout)
    assert extents[0]["offset"] == 0
    assert all(a["offset"] + a["length"] == b["offset"] for a, b in zip(extents, extents[1:]))
    assert extents[-1]["offset"] + extents[-1]["length"] == SIZE
    for extent in extents:
        if extent["type"] & 1:  # a hole: reads as zeros (and the written range is no hole)
            assert extent["type"] == 3 and extent["description"] == "hole,zero", extent
            assert not (extent["offset"] < (48 << 20) + (192 << 10) and 48 << 20 < extent["offset"] + extent["length"])
            qemu_io(session.uri, f"read -P 0 {extent['offset']} {min(extent['length'], 1 << 20)}")
    qemu_io(session.uri, "read -P 0x6d 48M 192k")


def test_fast_zero_of_qemu_img_convert(served, tmp_path):
    """qemu-img convert -n onto the export zeroes it first with NBD_CMD_FLAG_FAST_ZERO (the export advertises
    it), then writes the source's data: the export holds the source, old data gone, by write_zeroes."""
    session, daemon = served
    qemu_io(session.uri, "write -P 0x5e 40M 4M")
    source = tmp_path / "sparse.img"
    with open(source, "wb") as f:
        f.truncate(SIZE)
        f.seek(41 << 20)
        f.write(b"\x3c" * 65536)
    before = daemon.requests()
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, session.uri)
    assert daemon.requests()["write_zeroes"] > before["write_zeroes"]
    qemu_io(session.uri, "read -P 0 40M 1M", "read -P 0x3c 41M 64k", "read -P 0 42048k 2M")


def test_nbdinfo_read_only_backend(tmp_path, front):
    """``zero`` serves reads (and flush) only: the export is read-only, without trim, zero or FUA; it reads zeros."""
    with open_session(tmp_path, front, "nbdinfo", "nbdcopy") as session:
        session.start("zero:size=1M,block_size=4096")
        info = json.loads(run("nbdinfo", "--json", session.uri).stdout)["exports"][0]
        assert info["export-size"] == 1 << 20
        assert info["block_size_minimum"] == 4096
        assert info["is_read_only"] is True
        assert info["can_trim"] is False and info["can_zero"] is False and info["can_fast_zero"] is False
        assert info["can_fua"] is False
        assert info["can_flush"] is True  # the zero backend has a (no-op) flush
        out = tmp_path / "out.img"
        run("nbdcopy", session.uri, out)
        assert out.read_bytes() == bytes(1 << 20)


def test_qemu_io_patterns_at_odd_offsets(served):
    session, _ = served
    spans = [(1, 1, 0x11), (511, 2, 0x22), (4095, 4099, 0x33), (65537, 131071, 0x44), (1_000_003, 7, 0x55),
             (3 << 20, 1 << 20, 0x66)]
    qemu_io(session.uri, *[f"write -P {p:#x} {o} {n}" for o, n, p in spans])
    qemu_io(session.uri, *[f"read -P {p:#x} {o} {n}" for o, n, p in spans])
    # What lies between the spans is untouched.
    qemu_io(session.uri, "read -P 0 0 1", "read -P 0 2 509", "read -P 0 513 3582", "read -P 0 8194 57343",
            "read -P 0 1000010 2145718", "read -P 0 4M 1M")


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
    job = fio_nbd(session.uri, tmp_path, "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=16M",
                  "--verify=crc32c", "--do_verify=1", "--randrepeat=0")
    assert job["_rc"] == 0, job["_stderr"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 16 << 20
    assert job["read"]["io_bytes"] >= 16 << 20  # the verify pass read it all back
    # 1 MiB requests, a few in flight: each one's data is split and joined again on the way.
    job = fio_nbd(session.uri, tmp_path, "--rw=write", "--bs=1M", "--iodepth=4", "--size=16M",
                  "--verify=crc32c", "--do_verify=1")
    assert job["_rc"] == 0 and job["error"] == 0, job["_stderr"]
    assert job["read"]["io_bytes"] >= 16 << 20


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


def test_file_backend_fua_and_flush(tmp_path, front):
    """A FUA write and a flush reach a file backend as such; the data is in the file."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    with open_session(tmp_path, front, "qemu-io") as session:
        daemon = session.start(f"file:path={image}")
        qemu_io(session.uri, "write -f -P 0xa5 0 64k", "write -P 0x5a 1M 64k", "flush")
        requests = daemon.requests()
        assert requests["write"] >= 2 and requests["flush"] >= 1
        with open(image, "rb") as f:
            assert f.read(65536) == b"\xa5" * 65536
            f.seek(1 << 20)
            assert f.read(65536) == b"\x5a" * 65536


def test_backend_errors_reach_the_client(tmp_path, front):
    """A failing read is EIO at the client; the export keeps serving."""
    with open_session(tmp_path, front, "qemu-io") as session:
        daemon = session.start("faulty:size=4M,fail=1M+4K,ops=read")
        result = qemu_io(session.uri, "read 1M 4k", check=False)
        assert "Input/output error" in result.stdout + result.stderr
        qemu_io(session.uri, "write -P 0x5a 0 4k", "read -P 0x5a 0 4k")
        assert daemon.status()["targets"]["disk"]["errors"] >= 1


def test_nbd_socket_is_owner_only(served):
    session, _ = served
    assert subprocess.run(["test", "-S", str(session.socket)]).returncode == 0
    assert os.stat(session.socket).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("served", ["nbdkit"], indirect=True)
def test_channel_sockets_are_owner_only(served):
    """nbdkit's front only: the channel between nbdkit's plugin and the daemon (the daemon's own server has
    no second process, so no channel) lives in a private directory."""
    session, _ = served
    assert os.stat(session.state_dir).st_mode & 0o777 == 0o700
    assert os.stat(session.state_dir / "ch.sock").st_mode & 0o777 == 0o600
    nbdkit = session.nbdkit_pid()
    assert nbdkit is not None
    # nbdkit runs the plugin from this tree with the channel in the private directory.
    cmdline = open(f"/proc/{nbdkit}/cmdline", "rb").read().split(b"\0")
    assert f"channel={session.state_dir / 'ch.sock'}".encode() in cmdline


def test_tcp_export(tmp_path, front):
    """``nbd:tcp:HOST:PORT``: the same export on a TCP socket, stopped with the daemon here."""
    port = free_tcp_port()
    with open_session(tmp_path, front, "nbdinfo", "qemu-io", tcp_port=port) as session:
        # nbdkit's front keeps nbdkit (and the socket) after a stop unless on-stop=stop; the daemon's own
        # server has no such option: its listener goes with the export.
        daemon = session.start("memory:size=3M", ",on-stop=stop" if front == "nbdkit" else "")
        info = json.loads(run("nbdinfo", "--json", session.uri).stdout)["exports"][0]
        assert info["export-size"] == 3 << 20
        qemu_io(session.uri, "write -P 0x3c 12k 8k", "read -P 0x3c 12k 8k")
        if front == "nbdkit":
            assert os.stat(session.state_dir).st_mode & 0o777 == 0o700  # nbdkit's private state
        assert daemon.terminate() == 0, daemon.log_text()
    # Nothing listens on the port any more.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_systemd_socket_activation(tmp_path, front):
    """A socket passed by systemd (``LISTEN_FDS``) is served (by nbdkit, or by the daemon): the first client
    starts it all."""
    with open_session(tmp_path, front, "nbdinfo", "systemd-socket-activate") as session:
        daemon = session.start(
            "memory:size=5M", wait=False,
            launcher=["systemd-socket-activate", "-l", str(session.socket), "-E", "DMUSERD_NBD_REGISTRY", "--"])
        for _ in range(600):
            if session.socket.exists():
                break
            time.sleep(0.05)
        # This connection waits in the listen queue while the daemon (and nbdkit) start.
        size = run("nbdinfo", "--size", session.uri, timeout=60).stdout.strip()
        assert size == str(5 << 20)
        daemon.wait_ready()
        assert "using the NBD socket systemd passed" in daemon.log_text(), daemon.log_text()
