"""What only the daemon's own NBD server (``--export nbd:WHERE,server=dmuserd``) has.

What any client sees of an export (nbdinfo, qemu-io, qemu-img, nbdcopy,
fio, trim and zero, FUA and flush, backend errors, TCP, systemd's socket)
is checked on both fronts by test_nbd_clients.py. Here: hostile clients
(garbage, a request cut short, a client that never reads its replies or
never negotiates, a thousand connections) after which the daemon still
serves; the memory budget of an export; a stop with requests in flight;
the options; and, in process, the server's concurrency and stop over a
backend whose reads block. No nbdkit runs anywhere here.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import time

import pytest
import trio

from nbd_harness import open_session, qemu_io
from peak_backend import PeakReads
from dmuserd.daemon.config import ConfigError, DaemonSpec, ExportSpec, TargetSpec
from dmuserd.daemon.runtime import Daemon
from dmuserd.daemon.export import build
from dmuserd.daemon.nbd import NbdExport
from dmuserd.daemon.nbd_server import HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, RECEIVE_SIZE, NbdServerExport

SIZE = 64 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(session, daemon): a memory backend of SIZE served by server=dmuserd, for the module."""
    with open_session(tmp_path_factory.mktemp("nbds"), "dmuserd", "qemu-io") as session:
        yield session, session.start(f"memory:size={SIZE}")


def handshake(path) -> socket.socket:
    """A raw client through NBD_OPT_EXPORT_NAME (fixed newstyle, NO_ZEROES); the socket in transmission."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(path))
    greeting = recv_exactly(sock, 18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 0))
    size, _flags = struct.unpack(">QH", recv_exactly(sock, 10))
    assert size == SIZE
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def request(command: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, command, cookie, offset, length)


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_hostile_clients_leave_the_daemon_serving(served):
    session, daemon = served
    path = session.socket
    # Garbage instead of a request: that connection ends.
    with handshake(path) as sock:
        sock.sendall(b"\xde\xad" * 64)
        assert sock.recv(100) == b""
    # Garbage instead of the client flags (unknown ones): closed too.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        recv_exactly(sock, 18)
        sock.sendall(b"\xff" * 64)
        assert sock.recv(100) == b""
    # A request refused alone: past the end (EINVAL), a WRITE past the end (ENOSPC, payload skipped),
    # an unknown command (EINVAL), over 32 MiB (EOVERFLOW); then a good READ on the same connection.
    with handshake(path) as sock:
        sock.sendall(request(0, 1, SIZE, 4096) + request(1, 2, SIZE, 512) + b"x" * 512 + request(42, 3, 0, 0)
                     + request(0, 4, 0, 64 << 20) + request(0, 5, 0, 4096))
        errors = {}
        for _ in range(5):
            magic, error, cookie = struct.unpack(">IIQ", recv_exactly(sock, 16))
            assert magic == 0x67446698
            errors[cookie] = error
            if cookie == 5:
                assert len(recv_exactly(sock, 4096)) == 4096
        assert errors == {1: 22, 2: 28, 3: 22, 4: 75, 5: 0}
    # A WRITE cut short, then the client goes away.
    with handshake(path) as sock:
        sock.sendall(request(1, 7, 0, 1 << 20) + b"y" * 1000)
    rejected = daemon.status()["rejected_inputs"]["nbd-client"]
    assert rejected["protocol-error"] >= 2 and rejected["request-refused"] >= 4
    qemu_io(session.uri, "write -P 0x42 0 4k", "read -P 0x42 0 4k")


def test_client_gone_with_replies_due(served):
    """A client that leaves with READs unanswered: the sends fail, only that connection ends, no bug is counted."""
    session, daemon = served
    for _ in range(5):
        with handshake(session.socket) as sock:
            sock.sendall(b"".join(request(0, i, 0, 1 << 20) for i in range(32)))
            recv_exactly(sock, 16)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
    deadline = time.monotonic() + 30
    while daemon.status()["targets"]["disk"]["export_status"]["nbd"]["connections"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "internal-error" not in daemon.status()["rejected_inputs"].get("nbd-client", {})
    qemu_io(session.uri, "read 0 64k")


def test_client_that_never_reads_is_bounded(served):
    session, daemon = served
    pid = daemon.proc.pid
    before = rss_kib(pid)
    with handshake(session.socket) as sock:
        sock.setblocking(False)
        burst = b"".join(request(0, i, 0, 32 << 20) for i in range(64))
        sent = 0
        # 10 GiB of replies asked for; the daemon stops reading once its bound is held.
        for _ in range(160):
            try:
                sock.sendall(burst)
                sent += 64
            except BlockingIOError:
                break
        time.sleep(1)
        grown = rss_kib(pid) - before
        assert grown < 400 * 1024, f"RSS grew {grown} KiB for a client that reads nothing ({sent} requests sent)"
        qemu_io(session.uri, "read 0 64k")  # another client is served meanwhile


def test_clients_that_never_read_share_one_budget(tmp_path):
    """16 clients ask for 2 GiB of READs each and read nothing: the export holds its memory= budget (plus one
    request per connection), not 16 x the per-connection bound; another client is served meanwhile."""
    with open_session(tmp_path, "dmuserd", "qemu-io") as session:
        daemon = session.start(f"memory:size={SIZE}", ",memory=64M")
        pid = daemon.proc.pid
        before = rss_kib(pid)
        clients = [handshake(session.socket) for _ in range(16)]
        burst = b"".join(request(0, i, (i % 64) << 20, 1 << 20) for i in range(512))
        for sock in clients:
            sock.setblocking(False)
            for _ in range(4):  # 2 GiB of replies asked for per client, as far as the daemon reads
                try:
                    sock.sendall(burst)
                except BlockingIOError:
                    break
        deadline = time.monotonic() + 30
        status = daemon.status()["targets"]["disk"]["export_status"]["nbd"]
        while status["memory_held"] < status["memory_limit"] and time.monotonic() < deadline:
            time.sleep(0.1)
            status = daemon.status()["targets"]["disk"]["export_status"]["nbd"]
        time.sleep(1)
        status = daemon.status()["targets"]["disk"]["export_status"]["nbd"]
        assert status["memory_limit"] == 64 << 20 and status["connections"] == 16
        # the budget is spent, by at most one 1 MiB request and one receive of requests per connection over it
        assert 64 << 20 <= status["memory_held"] <= (64 << 20) + 16 * ((1 << 20) + RECEIVE_SIZE), status
        grown = rss_kib(pid) - before
        assert grown < 200 * 1024, f"RSS grew {grown} KiB for 16 clients that read nothing (budget 64 MiB)"
        qemu_io(session.uri, "read -P 0 0 1M", "write -P 7 1M 64k", "read -P 7 1M 64k")
        for sock in clients:
            sock.close()
        deadline = time.monotonic() + 30
        while (status := daemon.status()["targets"]["disk"]["export_status"]["nbd"])["connections"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert status["memory_held"] == 0, status  # every connection gave its share back


def test_a_client_that_never_negotiates_is_dropped(served):
    session, daemon = served
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(HANDSHAKE_TIMEOUT + 30)
        sock.connect(str(session.socket))
        recv_exactly(sock, 18)
        sock.sendall(struct.pack(">I", 3))  # client flags, then silence
        assert sock.recv(100) == b""  # closed by the daemon once the handshake's time is up
    assert daemon.status()["rejected_inputs"]["nbd-client"]["handshake-timeout"] >= 1


def test_a_thousand_connections(served):
    session, daemon = served
    socks = []
    try:
        for _ in range(1000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            socks.append(sock)
            try:
                sock.connect(str(session.socket))
            except (BlockingIOError, OSError):
                pass  # the backlog is full: refused, as it should be
        time.sleep(0.5)
        assert daemon.proc.poll() is None
        assert daemon.status()["targets"]["disk"]["export_status"]["nbd"]["connections"] <= MAX_CONNECTIONS
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 30
    while daemon.status()["targets"]["disk"]["export_status"]["nbd"]["connections"] and time.monotonic() < deadline:
        time.sleep(0.1)
    qemu_io(session.uri, "read 0 64k")


def test_stop_with_requests_in_flight(tmp_path):
    with open_session(tmp_path, "dmuserd", "fio") as session:
        daemon = session.start(f"memory:size={SIZE}")
        fio = subprocess.Popen(["fio", "--name=busy", "--ioengine=nbd", f"--uri={session.uri}", "--rw=randrw",
                                "--bs=64k", "--iodepth=32", "--size=32M", "--time_based", "--runtime=60"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.monotonic() + 30
        while daemon.status()["targets"]["disk"]["total_requests"] < 1000:
            assert time.monotonic() < deadline and fio.poll() is None
            time.sleep(0.1)
        assert daemon.terminate() == 0
        fio.wait(60)  # its connection ended: fio stops (with errors for what was cut off)
        events = daemon.log_events()
        assert not [e for e in events if e.get("level") in ("error", "critical")], events
        assert any(e.get("event") == "admission closed: new requests are answered ERROR" for e in events)
        assert not session.socket.exists()  # the listener went with the export


@pytest.mark.parametrize("options, message", [
    ({"server": "dmuserd", "threads": "4"}, "option threads is nbdkit's"),
    ({"server": "dmuserd", "on-stop": "keep"}, "option on-stop is nbdkit's"),
    ({"server": "dmuserd", "bogus": "1"}, "unknown option(s) bogus"),
    ({"server": "qemu"}, "server"),
    ({"server": "dmuserd", "memory": "0"}, "memory=0 must be at least 1 byte"),
    ({"server": "dmuserd", "memory": "lots"}, "memory"),
    ({"memory": "64M"}, "memory"),  # server=nbdkit has no such budget
])
def test_options_checked_before_anything_starts(options, message):
    with pytest.raises(ConfigError) as err:
        build(ExportSpec("nbd", "/tmp/x.sock", options), host=None)
    assert message in str(err.value)


def test_memory_budget_option():
    assert build(ExportSpec("nbd", "/tmp/x.sock", {"server": "dmuserd", "memory": "64M"}), host=None).budget.limit \
        == 64 << 20
    assert build(ExportSpec("nbd", "/tmp/x.sock", {"server": "dmuserd"}), host=None).budget.limit == 256 << 20


def test_server_nbdkit_is_the_default():
    assert type(build(ExportSpec("nbd", "/tmp/x.sock", {}), host=None)) is NbdExport
    assert type(build(ExportSpec("nbd", "/tmp/x.sock", {"server": "nbdkit"}), host=None)) is NbdExport
    assert type(build(ExportSpec("nbd", "/tmp/x.sock", {"server": "dmuserd"}), host=None)) is NbdServerExport


# -- in process: a backend whose reads block -------------------------------------------------


class BlockingReads(PeakReads):
    """PeakReads whose ``readinto`` (what the NBD server calls) blocks as its ``read`` does."""

    async def readinto(self, offset, buffer):
        buffer[:] = await self.read(offset, len(buffer))


async def _trio_handshake(path) -> trio.SocketStream:
    stream = await trio.open_unix_socket(str(path))
    await _trio_recv(stream, 18)
    await stream.send_all(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 0))
    await _trio_recv(stream, 10)
    return stream


async def _trio_recv(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, f"closed after {len(data)} of {n} bytes"
        data += chunk
    return data


async def _replies(stream: trio.SocketStream, count: int, length: int) -> dict[int, int]:
    """cookie -> error of ``count`` replies (a successful READ's ``length`` bytes read too)."""
    errors = {}
    for _ in range(count):
        magic, error, cookie = struct.unpack(">IIQ", await _trio_recv(stream, 16))
        assert magic == 0x67446698
        if not error:
            await _trio_recv(stream, length)
        errors[cookie] = error
    return errors


@contextlib.asynccontextmanager
async def _served(tmp_path, backend):
    """``backend`` served with server=dmuserd by a daemon in process, one client connected: (daemon, nursery,
    target, stream); the daemon stops at the end."""
    daemon = Daemon(DaemonSpec([]), control_socket=str(tmp_path / "control.sock"))
    path = tmp_path / "d.sock"
    spec = TargetSpec("disk", "memory", {}, [ExportSpec("nbd", str(path), {"server": "dmuserd"})])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            target = await daemon.add_target(spec, backend=backend)
            stream = await _trio_handshake(path)
            yield daemon, nursery, target, stream
            await stream.aclose()
            await daemon.stop()


async def test_requests_of_one_connection_run_concurrently(tmp_path):
    """32 pipelined READs over a backend that blocks: workers serve them at once, every answer arrives."""
    backend = BlockingReads(1 << 20, delay=0.05)
    async with _served(tmp_path, backend) as (_, _, _, stream):
        await stream.send_all(b"".join(request(0, i, i * 4096, 4096) for i in range(32)))
        assert await _replies(stream, 32, 4096) == {i: 0 for i in range(32)}
        assert backend.peak > 1


async def test_a_request_refused_at_a_stop_is_eshutdown(tmp_path):
    """Once admission is closed, a new request on a live connection is answered ESHUTDOWN; the one in flight
    finishes."""
    backend = BlockingReads(1 << 20, delay=1.0)
    async with _served(tmp_path, backend) as (daemon, nursery, target, stream):
        await stream.send_all(request(0, 1, 0, 4096))
        while not backend.active:
            await trio.sleep(0.01)
        nursery.start_soon(daemon.remove_target, "disk")
        while target.dispatcher.admitting:
            await trio.sleep(0.01)
        await stream.send_all(request(0, 2, 4096, 4096))
        assert await _replies(stream, 2, 4096) == {1: 0, 2: 108}
        assert not (tmp_path / "d.sock").exists()  # the listener closed


async def test_every_request_in_flight_at_a_stop_is_answered(tmp_path):
    """40 pipelined READs over a backend that blocks (32 run, 8 wait for a worker), then a stop: every READ is
    answered before the connection closes (the ones running with their data, the others ESHUTDOWN). With 1 MiB
    READs (40 MiB of replies, more than the socket buffers hold) and a client that reads only once the requests
    are done, the writer is still sending when the stop would cancel it."""
    for length, late in ((4096, False), (1 << 20, False), (1 << 20, True)):
        backend = BlockingReads(64 << 20, delay=0.3)
        async with _served(tmp_path, backend) as (daemon, nursery, target, stream):
            await stream.send_all(b"".join(request(0, i, i * length, length) for i in range(40)))
            while backend.active < 32:
                await trio.sleep(0.01)
            nursery.start_soon(daemon.remove_target, "disk")
            if late:
                await target.dispatcher.drained.wait()
                await trio.sleep(0.1)
            errors = await _replies(stream, 40, length)
            assert set(errors) == set(range(40))
            assert set(errors.values()) <= {0, 108} and list(errors.values()).count(0) >= 32, errors
            assert await stream.receive_some(16) == b""  # then the connection closes
