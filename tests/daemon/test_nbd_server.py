"""What only the daemon's own NBD server (``--export nbd:WHERE,server=dmuserd``) has.

What any client sees of an export (nbdinfo, qemu-io, qemu-img, nbdcopy,
fio, trim and zero, FUA and flush, backend errors, TCP, systemd's socket)
is checked on both fronts by test_nbd_clients.py. Here: hostile clients
(garbage, a request cut short, a client that never reads its replies or
never negotiates, a thousand connections) after which the daemon still
serves; the memory budget of an export; a stop with requests in flight;
the options; structured replies, block status and fast zero byte for byte
from a raw client, and the memory backend's holes as nbdinfo and qemu-img
map see them; and, in process, the server's concurrency and stop over a
backend whose reads block, and backends that cannot zero fast or tell
their extents. No nbdkit runs anywhere here.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import time

import pytest
import trio

import json

from daemon_harness import run, wait_until
from nbd_harness import open_session, qemu_io
from peak_backend import PeakReads
from dmuserd.backends import Unsupported
from dmuserd.backends.memory import MemoryBackend
from dmuserd.daemon.config import ConfigError, DaemonSpec, ExportSpec, TargetSpec
from dmuserd.daemon.runtime import Daemon
from dmuserd.daemon.export import build
from dmuserd.daemon.nbd import NbdExport
from dmuserd.daemon.nbd_server import HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, RECEIVE_SIZE, STATUS_RANGE, NbdServerExport

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


IHAVEOPT = 0x49484156454F5054
STRUCTURED = 0x668E33EF
HOLE, DATA = 3, 0  # base:allocation: hole+zero, data
DF, REQ_ONE, FAST_ZERO = 4, 8, 0x10


def structured_handshake(path, *contexts: bytes) -> tuple[socket.socket, dict[int, list[tuple[int, bytes]]]]:
    """A raw client: structured replies, SET_META_CONTEXT with ``contexts`` (if any), then GO; the socket in
    transmission and the option replies by option: (reply type, data)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(path))
    assert recv_exactly(sock, 18)[:16] == b"NBDMAGICIHAVEOPT"
    meta = struct.pack(">II", 0, len(contexts)) + b"".join(struct.pack(">I", len(c)) + c for c in contexts)
    options = [(8, b""), *([(10, meta)] if contexts else []), (7, struct.pack(">IH", 0, 0))]
    sock.sendall(struct.pack(">I", 3) + b"".join(struct.pack(">QII", IHAVEOPT, o, len(d)) + d for o, d in options))
    replies: dict[int, list[tuple[int, bytes]]] = {}
    while not replies.get(7) or replies[7][-1][0] != 1:
        magic, option, kind, length = struct.unpack(">QIII", recv_exactly(sock, 20))
        assert magic == 0x3E889045565A9
        replies.setdefault(option, []).append((kind, recv_exactly(sock, length)))
    return sock, replies


def read_chunk(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """One structured reply chunk: (flags, type, cookie, payload)."""
    magic, flags, kind, cookie, length = struct.unpack(">IHHQI", recv_exactly(sock, 20))
    assert magic == STRUCTURED, hex(magic)
    return flags, kind, cookie, recv_exactly(sock, length)


def read_simple(sock: socket.socket) -> tuple[int, int]:
    """One simple reply without data: (error, cookie)."""
    magic, error, cookie = struct.unpack(">IIQ", recv_exactly(sock, 16))
    assert magic == 0x67446698, hex(magic)
    return error, cookie


def error_of(chunk: tuple[int, int, int, bytes]) -> tuple[int, str]:
    """(error, message) of a final ERROR chunk."""
    flags, kind, _, payload = chunk
    assert (flags, kind) == (1, 0x8001)
    error, length = struct.unpack_from(">IH", payload)
    assert len(payload) == 6 + length
    return error, payload[6:].decode()


def _connections(daemon) -> int:
    return daemon.status()["targets"]["disk"]["export_status"]["nbd"]["connections"]


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
    wait_until(lambda: not _connections(daemon), "the reset connections end", 30)  # then their errors are counted
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
    wait_until(lambda: not _connections(daemon), "the closed connections end", 30)
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


# -- structured replies, block status, fast zero --------------------------------------------


def test_structured_replies_byte_for_byte(served):
    """A client that negotiates structured replies and base:allocation: the export offers DF and FAST_ZERO, a
    READ is one final OFFSET_DATA chunk (DF or not), an error an ERROR chunk with its reason, a BLOCK_STATUS the
    memory backend's chunks (never written: hole,zero), REQ_ONE one extent; other successes are simple replies."""
    session, _ = served
    base = 60 << 20  # the module's other tests stay below
    sock, replies = structured_handshake(session.socket, b"base:allocation")
    with sock:
        assert replies[8] == [(1, b"")]
        assert replies[10] == [(4, struct.pack(">I", 1) + b"base:allocation"), (1, b"")]
        info = next(data for kind, data in replies[7] if kind == 3 and data[:2] == b"\0\0")
        size, flags = struct.unpack(">QH", info[2:])
        assert size == SIZE and flags & (1 << 7) and flags & (1 << 11)  # SEND_DF, SEND_FAST_ZERO
        data = bytes(range(256)) * 16
        sock.sendall(request(1, 1, base + 65536, 4096) + data)
        assert read_simple(sock) == (0, 1)
        for cookie, flags in ((2, 0), (3, DF)):
            sock.sendall(request(0, cookie, base + 65536, 4096, flags))
            chunk = read_chunk(sock)
            assert chunk[:3] == (1, 1, cookie) and chunk[3] == struct.pack(">Q", base + 65536) + data
        sock.sendall(request(0, 4, SIZE, 4096))
        assert error_of(read_chunk(sock)) == (22, f"range {SIZE}+4096 ends beyond the export size {SIZE}")
        sock.sendall(request(7, 5, base, 3 * 65536) + request(7, 6, base, 3 * 65536, REQ_ONE)
                     + request(7, 7, base + 65536, 8192, REQ_ONE))
        want = {5: [(65536, HOLE), (65536, DATA), (65536, HOLE)], 6: [(65536, HOLE)], 7: [(8192, DATA)]}
        for _ in range(3):
            flags, kind, cookie, payload = read_chunk(sock)
            assert (flags, kind) == (1, 5) and struct.unpack_from(">I", payload)[0] == 1
            assert list(struct.iter_unpack(">II", payload[4:])) == want.pop(cookie)
        sock.sendall(request(6, 8, base + 65536, 4096, FAST_ZERO) + request(0, 9, base + 65536, 4096))
        assert read_simple(sock) == (0, 8)
        assert read_chunk(sock)[3] == struct.pack(">Q", base + 65536) + bytes(4096)
        sock.sendall(request(2, 10, 0, 0))
        assert sock.recv(16) == b""


def test_block_status_without_a_context_is_einval(served):
    """Structured replies without SET_META_CONTEXT: BLOCK_STATUS is an EINVAL chunk saying why; a client without
    structured replies gets a simple EINVAL. Each connection goes on."""
    session, _ = served
    sock, replies = structured_handshake(session.socket)
    with sock:
        assert 10 not in replies
        sock.sendall(request(7, 1, 0, 4096) + request(0, 2, 0, 512))
        error, message = error_of(read_chunk(sock))
        assert error == 22 and "metadata context" in message
        assert read_chunk(sock)[:3] == (1, 1, 2)
    with handshake(session.socket) as sock:
        sock.sendall(request(7, 1, 0, 4096) + request(0, 2, 0, 512))
        assert read_simple(sock) == (22, 1)
        assert read_simple(sock) == (0, 2) and len(recv_exactly(sock, 512)) == 512


def test_holes_as_nbdinfo_and_qemu_img_map_see_them(tmp_path):
    """The memory backend's never-written chunks are holes for nbdinfo --map and qemu-img map, and nbdcopy leaves
    them out of its copy; a backend that cannot tell (zero) is all data."""
    with open_session(tmp_path, "dmuserd", "nbdinfo", "qemu-io", "qemu-img", "nbdcopy") as session:
        daemon = session.start("memory:size=8M")
        qemu_io(session.uri, "write -P 1 1M 64k", "write -P 2 5M 4k")
        extents = json.loads(run("nbdinfo", "--map", "--json", session.uri).stdout)
        mib = 1 << 20
        assert [(e["offset"], e["length"], e["type"]) for e in extents] == [
            (0, mib, HOLE), (mib, 65536, DATA), (mib + 65536, 4 * mib - 65536, HOLE), (5 * mib, 65536, DATA),
            (5 * mib + 65536, 3 * mib - 65536, HOLE)]
        mapped = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", session.uri).stdout)
        assert [(m["start"], m["length"], m["data"], m["zero"]) for m in mapped] == [
            (e["offset"], e["length"], e["type"] == DATA, e["type"] == HOLE) for e in extents]
        # nbdcopy asks the same and reads the data only: the file holds the export, sparse where it has holes.
        copy = tmp_path / "copy.img"
        before = daemon.status()["targets"]["disk"]["bytes_read"]
        run("nbdcopy", session.uri, copy)
        assert daemon.status()["targets"]["disk"]["bytes_read"] - before < mib  # not the 8 MiB
        want = bytearray(8 * mib)
        want[mib:mib + 65536] = b"\x01" * 65536
        want[5 * mib:5 * mib + 4096] = b"\x02" * 4096
        assert copy.read_bytes() == want
        assert copy.stat().st_blocks * 512 <= 1 * mib, copy.stat()
        assert daemon.terminate() == 0
    (tmp_path / "zero").mkdir()
    with open_session(tmp_path / "zero", "dmuserd", "nbdinfo") as session:
        session.start("zero:size=1M")
        extents = json.loads(run("nbdinfo", "--map", "--json", session.uri).stdout)
        assert [(e["offset"], e["length"], e["type"]) for e in extents] == [(0, 1 << 20, DATA)]


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


# -- in process: backends that cannot zero fast, or tell their extents ------------------------


class SlowZeroes(MemoryBackend):
    """Has write_zeroes, yet answers UNSUPPORTED (as a backend that finds it cannot zero without writing)."""

    async def write_zeroes(self, offset, length, may_unmap=False):
        raise Unsupported("cannot zero here without writing")


class BlindExtents(MemoryBackend):
    """Its extents fail."""

    async def extents(self, offset, length):
        raise RuntimeError("allocation map unreadable")


class HeldExtents(MemoryBackend):
    """Its extents wait until ``answer`` is set (a query in flight at a stop)."""

    def __init__(self, size):
        super().__init__(size)
        self.asked = trio.Event()
        self.answer = trio.Event()

    async def extents(self, offset, length):
        self.asked.set()
        await self.answer.wait()
        return await super().extents(offset, length)


async def test_a_block_status_in_flight_at_a_stop_is_waited_for_and_answered(tmp_path):
    """BLOCK_STATUS takes a request slot as every request does: one in flight counts, the stop waits for it (the
    target is not drained while it runs) and it is answered before the connection closes; one sent after
    admission closed is answered ESHUTDOWN at once, not held."""
    backend = HeldExtents(1 << 20)
    async with _served(tmp_path, backend) as (daemon, nursery, target, _):
        dispatcher = target.dispatcher
        sock, _ = await trio.to_thread.run_sync(structured_handshake, tmp_path / "d.sock", b"base:allocation")
        with sock:
            await trio.to_thread.run_sync(sock.sendall, request(7, 1, 0, 65536))
            await backend.asked.wait()
            assert dispatcher.stats.in_flight == 1
            removed = trio.Event()

            async def remove():
                await daemon.remove_target("disk")
                removed.set()

            nursery.start_soon(remove)
            while dispatcher.admitting:
                await trio.sleep(0.01)
            await trio.to_thread.run_sync(sock.sendall, request(7, 2, 0, 65536))
            assert error_of(await trio.to_thread.run_sync(read_chunk, sock)) == (108, "the server is stopping")
            assert dispatcher.stats.refused == 1
            assert not dispatcher.drained.is_set() and not removed.is_set()  # the stop waits for the query
            backend.answer.set()
            flags, kind, cookie, payload = await trio.to_thread.run_sync(read_chunk, sock)
            assert (flags, kind, cookie) == (1, 5, 1)
            assert list(struct.iter_unpack(">II", payload[4:])) == [(65536, HOLE)]
            await removed.wait()
            assert dispatcher.drained.is_set() and dispatcher.stats.in_flight == 0
            assert await trio.to_thread.run_sync(sock.recv, 16) == b""  # then the connection closes


async def test_fast_zero_the_backend_cannot_do_is_enotsup(tmp_path):
    """FAST_ZERO answered UNSUPPORTED by the backend: ENOTSUP, the data left as it was; without FAST_ZERO the spec
    forbids ENOTSUP once fast zero is advertised: EIO, with its reason."""
    backend = SlowZeroes(1 << 20)
    await backend.write(0, b"\x77" * 4096)
    async with _served(tmp_path, backend) as _:
        sock, _ = await trio.to_thread.run_sync(structured_handshake, tmp_path / "d.sock")
        with sock:
            await trio.to_thread.run_sync(sock.sendall, request(6, 1, 0, 4096, FAST_ZERO) + request(6, 2, 0, 4096)
                                          + request(0, 3, 0, 4096))
            assert error_of(await trio.to_thread.run_sync(read_chunk, sock)) == (
                95, "the backend does not support this operation")
            assert error_of(await trio.to_thread.run_sync(read_chunk, sock)) == (5, "the backend could not zero")
            assert (await trio.to_thread.run_sync(read_chunk, sock))[3][8:] == b"\x77" * 4096


async def test_extents_that_fail_are_eio_for_that_request(tmp_path):
    async with _served(tmp_path, BlindExtents(1 << 20)) as _:
        sock, _ = await trio.to_thread.run_sync(structured_handshake, tmp_path / "d.sock", b"base:allocation")
        with sock:
            await trio.to_thread.run_sync(sock.sendall, request(7, 1, 0, 65536) + request(0, 2, 0, 512))
            assert error_of(await trio.to_thread.run_sync(read_chunk, sock)) == (
                5, "the backend could not tell what is allocated")
            assert (await trio.to_thread.run_sync(read_chunk, sock))[:3] == (1, 1, 2)


async def test_a_block_status_reply_is_bounded(tmp_path):
    """A query of 4 GiB - 64 KiB over a memory disk written every other chunk in its first 4 MiB: the reply
    describes STATUS_RANGE at most (the alternating chunks, then one hole), the client asks again from there."""
    backend = MemoryBackend(8 << 30)
    for start in (0, STATUS_RANGE):
        for chunk in range(start // 65536, (start + (4 << 20)) // 65536, 2):
            await backend.write(chunk * 65536, b"\x01" * 512)
    alternating = [(65536, DATA if i % 2 == 0 else HOLE) for i in range(64)]
    want = {1: alternating[:63] + [(STATUS_RANGE - (4 << 20) + 65536, HOLE)], 2: alternating[:16]}  # merged holes
    async with _served(tmp_path, backend) as _:
        sock, _ = await trio.to_thread.run_sync(structured_handshake, tmp_path / "d.sock", b"base:allocation")
        with sock:
            await trio.to_thread.run_sync(sock.sendall, request(7, 1, 0, (4 << 30) - 65536)
                                          + request(7, 2, STATUS_RANGE, 1 << 20))
            for _ in range(2):
                flags, kind, cookie, payload = await trio.to_thread.run_sync(read_chunk, sock)
                assert (flags, kind) == (1, 5)
                assert list(struct.iter_unpack(">II", payload[4:])) == want.pop(cookie)


def test_a_large_read_starts_its_own_sendmsg_aligned_and_counts_done_with_its_data():
    """The writer's batches: a 1 MiB READ's data behind a 28-byte structured header (or anything not a multiple
    of 64 bytes) goes in the next sendmsg, so it starts the socket's buffers aligned; small data stays batched;
    a reply counts as sent only with its data (a stop waits for it)."""
    from dmuserd.daemon import nbd_server

    conn = object.__new__(nbd_server._Connection)  # only the queue is needed to cut batches
    small_head, big_head, status = b"h" * 28, b"H" * 28, b"s" * 40
    small, big = bytearray(4096), bytearray(1 << 20)
    conn._replies = [small_head, small, big_head, big, status]
    first = conn._next_batch()
    assert first == ([small_head, small, big_head], 4096, 56, 1)  # cut before the big data; its header not done yet
    second = conn._next_batch()
    assert second == ([big, status], 1 << 20, 40, 2)  # the data first, at offset 0; the READ and the status done
    assert conn._replies == []
    conn._replies = [b"x" * 16, bytearray(1 << 16), b"y" * 64, bytearray(1 << 16)]
    # 16 bytes before the first data: cut; then 64 KiB + 64 bytes, a multiple of 64, before the second: no cut
    assert [len(b) for b in conn._next_batch()[0]] == [16]
    assert [len(b) for b in conn._next_batch()[0]] == [1 << 16, 64, 1 << 16]
