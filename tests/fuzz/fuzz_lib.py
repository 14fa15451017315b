"""What the fuzz storms share: a served daemon that is restarted when an input
kills it, raw socket exchanges bounded against hangs, a dm-user channel
client, the checks every storm ends with, and the hypothesis settings.

A uniquely named module (not conftest) so the test files import it by name.

How a storm runs. A test starts one daemon and runs a hypothesis-driven
function against it many times (one *example* each). After every example
:meth:`FuzzDaemon.after_example` checks that the daemon still runs, that its
log gained no traceback or internal error, and that ``{"cmd": "status"}``
still gets an answer; an example that kills or hangs the daemon fails with
the daemon's last log lines, and the daemon is started again so the next
example (hypothesis shrinking the failure, say) meets a live one. After
the storm :meth:`FuzzDaemon.check_after_storm` reads back the data written
before it, asks ``status`` once more and, where the daemon has them,
checks the ``rejected_inputs`` counters.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "daemon"))  # daemon_harness, nbd_harness

from daemon_harness import DMUSERD, terminate  # noqa: E402
from nbd_harness import stop_nbdkits  # noqa: E402

from dmuserd.daemon.service import is_dead_mount  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
HEADER = struct.Struct("<5Q")
HEADER_SIZE = 40
U64 = (1 << 64) - 1

#: How long one exchange may go unanswered before it counts as a hang.
HANG_SECONDS = float(os.environ.get("DMUSERD_FUZZ_HANG", "30"))

#: What a served daemon's log must never show: a Python traceback, or the
#: guard's word for an exception no handler expected (daemon/guard.py).
BUG_LINE = re.compile(r"Traceback \(most recent call last\)|internal[ -]error|handler failed", re.IGNORECASE)

# -- hypothesis settings ----------------------------------------------------------------------
#
# `make test` runs the "ci" profile: few examples, derandomized (the same
# examples every run), no example database, no shrinking (a failure prints the
# example that failed; `make fuzz` shrinks). `make fuzz` sets
# DMUSERD_FUZZ_PROFILE=fuzz: many more examples, random, failures saved in
# .hypothesis/ and replayed first next time. DMUSERD_FUZZ_SCALE multiplies
# the fuzz profile's example counts (e.g. 10 for a night's run).

PROFILE = os.environ.get("DMUSERD_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "fuzz"):
    raise RuntimeError(f"DMUSERD_FUZZ_PROFILE={PROFILE!r}: use ci or fuzz")
SCALE = float(os.environ.get("DMUSERD_FUZZ_SCALE", "1"))

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
             HealthCheck.function_scoped_fixture]
settings.register_profile("dmuserd-fuzz-ci", deadline=None, derandomize=True, database=None,
                          phases=[Phase.explicit, Phase.generate], suppress_health_check=_SUPPRESS,
                          print_blob=False)
settings.register_profile("dmuserd-fuzz", deadline=None, suppress_health_check=_SUPPRESS,
                          report_multiple_bugs=False, print_blob=True)


def storm_settings(ci: int, fuzz: int) -> settings:
    """Settings for one storm: ``ci`` examples under `make test`, ``fuzz`` under `make fuzz`.

    Built on the fuzz profiles without loading them, so the rest of the test
    suite keeps its own hypothesis settings.
    """
    if PROFILE == "ci":
        return settings(settings.get_profile("dmuserd-fuzz-ci"), max_examples=ci)
    return settings(settings.get_profile("dmuserd-fuzz"), max_examples=max(1, int(fuzz * SCALE)))


# -- bytes -------------------------------------------------------------------------------------


def pattern(length: int, salt: int = 0) -> bytes:
    """Deterministic, position-dependent bytes: misplaced or stale data shows."""
    unit = bytes((i * 7 + salt * 31 + (i >> 8)) & 0xFF for i in range(4096))
    return (unit * (length // 4096 + 1))[:length]


def header(seq: int, type_: int, flags: int = 0, sector: int = 0, length: int = 0) -> bytes:
    return HEADER.pack(seq & U64, type_ & U64, flags & U64, sector & U64, length & U64)


class Hang(AssertionError):
    """The daemon neither answered nor closed within :data:`HANG_SECONDS`."""


def connect(path, hang: float = HANG_SECONDS) -> socket.socket:
    """A socket connected to the Unix socket ``path`` (timeout ``hang``).

    A full listen backlog makes a Unix ``connect()`` with a timeout fail
    with EAGAIN at once: that is retried until ``hang`` seconds have passed
    (then :class:`Hang`), as a blocking client would wait.
    """
    deadline = time.monotonic() + hang
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(hang)
        try:
            sock.connect(str(path))
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise Hang(f"{path} accepted no connection for {hang:g} s (its listen backlog stays full)") from None
            time.sleep(0.005)
        except BaseException:
            sock.close()
            raise


def exchange(path, chunks, *, end: str = "shutdown", hang: float = HANG_SECONDS) -> tuple[bytes, bool]:
    """Connect to the Unix socket ``path``, send ``chunks`` (each whole, in order) and end.

    Reads whatever comes back while sending, so a daemon answering a long
    stream never deadlocks against us. ``end``:

    * ``"shutdown"``: half-close (SHUT_WR), then read until the daemon closes;
      the daemon is done with the connection when this returns;
    * ``"close"``: close at once after sending (what was sent stays readable);
    * ``"reset"``: close with SO_LINGER 0 (an RST: unread data is dropped).

    Returns ``(received bytes, whether the daemon closed first)``. A peer
    that closes early (EPIPE, ECONNRESET) just ends the sending; what it
    sent before is still read (``"shutdown"``). Raises
    :class:`Hang` when the daemon stays silent for ``hang`` seconds with
    the exchange unfinished.
    """
    sock = connect(path, hang)
    received = bytearray()
    peer_closed = False
    try:
        sock.setblocking(False)
        pending = [memoryview(c) for c in chunks if len(c)]
        deadline = time.monotonic() + hang
        while pending and not peer_closed:
            readable, writable, _ = select.select([sock], [sock], [], max(0.0, deadline - time.monotonic()))
            if readable:
                peer_closed = _drain(sock, received)
                deadline = time.monotonic() + hang
            if writable and not peer_closed:
                try:
                    sent = sock.send(pending[0][:1 << 20])
                except (BrokenPipeError, ConnectionResetError):
                    # The daemon closed the connection: nothing more goes out, but
                    # what it answered before closing is still ours to read.
                    pending = []
                    break
                except BlockingIOError:
                    continue
                pending[0] = pending[0][sent:]
                if not len(pending[0]):
                    pending.pop(0)
                deadline = time.monotonic() + hang
            if not readable and not writable and time.monotonic() >= deadline:
                raise Hang(f"the daemon took nothing and said nothing for {hang:g} s "
                           f"({sum(len(p) for p in pending)} bytes still to send)")
        if end == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return bytes(received), peer_closed
        if end == "close":
            return bytes(received), peer_closed
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        deadline = time.monotonic() + hang
        while not peer_closed:
            readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                raise Hang(f"the daemon neither answered nor closed the connection in {hang:g} s "
                           f"after we half-closed it (got {len(received)} bytes)")
            peer_closed = _drain(sock, received)
            deadline = time.monotonic() + hang
        return bytes(received), True
    finally:
        sock.close()


def _drain(sock, received: bytearray) -> bool:
    """Read what is there; True at the end of the stream."""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True
        if not chunk:
            return True
        received += chunk


def control_request(path, payload, hang: float = HANG_SECONDS) -> dict:
    """One JSON request on its own connection; the parsed answer."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode() + b"\n"
    data, _ = exchange(path, [raw], hang=hang)
    line, newline, _rest = data.partition(b"\n")
    if not newline:
        raise AssertionError(f"the control socket closed without a whole answer to {raw[:60]!r}: {data[:200]!r}")
    return json.loads(line)


class ChannelClient:
    """A dm-user peer on the NBD export's channel socket, one request at a time (as the plugin)."""

    def __init__(self, path) -> None:
        self.sock = connect(path)
        self.seq = 0

    def request(self, type_: int, offset: int, length: int, flags: int = 0, payload: bytes = b"") -> tuple[int, bytes]:
        self.seq += 1
        self.sock.sendall(header(self.seq, type_, flags, offset // 512, length) + payload)
        head = self._read(HEADER_SIZE)
        seq, rtype, _flags, _sector, _length = HEADER.unpack(head)
        assert seq == self.seq, f"answer for seq {seq}, asked {self.seq}"
        data = self._read(length) if type_ == 0 and rtype == 0 else b""
        return rtype, data

    def _read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise AssertionError(f"the channel closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        rtype, _ = self.request(1, offset, len(data), payload=data)
        assert rtype == 0, f"WRITE at {offset} answered {rtype}"

    def read(self, offset: int, length: int) -> bytes:
        rtype, data = self.request(0, offset, length)
        assert rtype == 0, f"READ at {offset} answered {rtype}"
        return data

    def close(self) -> None:
        self.sock.close()


# -- the served daemon -------------------------------------------------------------------------

#: The memory target every served daemon has: reference data in the first
#: REF_SIZE bytes (written before a storm, never written by one), the storms'
#: own writes go to [SCRATCH, SIZE).
SIZE = 8 * MiB
REF_SIZE = 1 * MiB
SCRATCH = 4 * MiB
REF_DATA = pattern(REF_SIZE, 0x5A)


class FuzzDaemon:
    """``dmuserd serve --config`` with a memory target ``disk`` (and maybe more), as a subprocess.

    ``export`` is ``"nbd"`` (nbdkit in front, the channel socket reachable)
    or ``"fuse"`` (root). ``extra_toml`` adds targets to the config. All
    state lives in a short temporary directory (Unix socket paths are
    limited to 107 bytes), removed by :meth:`cleanup` with every process
    and mount the daemons left.
    """

    def __init__(self, export: str = "nbd", *, block_size: int = 512, extra_toml: str = "",
                 extra_nbd: tuple[str, ...] = ()) -> None:
        self.export = export
        self.block_size = block_size
        self.extra_toml = extra_toml
        self.workdir = Path(tempfile.mkdtemp(prefix="dmuserd-fuzz-"))
        #: targets exported over NBD (each has its nbdkit)
        self.nbd_names = (("disk",) if export == "nbd" else ()) + tuple(extra_nbd)
        self.nbdkit_pids: set[int] = set()
        self.logs: list[Path] = []
        self.incarnation = 0
        self.proc: subprocess.Popen | None = None
        self.deaths: list[str] = []
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise

    # paths

    @property
    def fuse_dir(self) -> Path:
        return self.workdir / "fuse"

    @property
    def disk_file(self) -> Path:
        return self.fuse_dir / "disk"

    def nbd_socket(self, name: str = "disk") -> Path:
        return self.workdir / f"{name}.sock"

    def state_dir(self, name: str = "disk") -> Path:
        return self.workdir / f".{name}.sock.dmuserd"

    def channel_socket(self, name: str = "disk") -> Path:
        return self.state_dir(name) / "ch.sock"

    @property
    def nbd_uri(self) -> str:
        return f"nbd+unix:///?socket={self.nbd_socket()}"

    # life

    def start(self) -> None:
        self.incarnation += 1
        n = self.incarnation
        self.control = self.workdir / f"control{n}.sock"
        if self.export == "fuse":
            disk_export = f'"fuse:{self.fuse_dir}"'
        else:
            disk_export = f'"nbd:{self.nbd_socket()},on-stop=stop"'
        config = self.workdir / f"daemon{n}.toml"
        config.write_text(
            "[targets.disk]\n"
            f'backend = {{ type = "memory", size = "{SIZE}", block_size = "{self.block_size}" }}\n'
            f"exports = [{disk_export}]\n" + self.extra_toml.replace("{workdir}", str(self.workdir))
        )
        self.log_path = self.workdir / f"daemon{n}.log"
        self.logs.append(self.log_path)
        self._log_seen = 0
        self._internal_seen: dict[str, int] = {}
        env = dict(os.environ, DMUSERD_LOG_LEVEL="info")  # the guard's tracebacks are debug-level
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(DMUSERD + ["serve", "--config", str(config),
                                                    "--control-socket", str(self.control)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()
        self._remember_nbdkits()
        self.write_reference()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.proc.returncode} at start:\n{self.log_text()}")
            if self.control.exists():  # created after every export is live
                return
            time.sleep(0.02)
        raise AssertionError(f"the daemon was not ready in {timeout} s:\n{self.log_text()}")

    def _remember_nbdkits(self) -> None:
        for name in self.nbd_names:
            try:
                self.nbdkit_pids.add(json.loads((self.state_dir(name) / "nbdkit.json").read_text())["pid"])
            except (OSError, ValueError, KeyError):
                pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _restart(self, why: str) -> str:
        """Note why this incarnation ended, stop what is left of it, start the next one."""
        tail = "\n".join(self.log_text().splitlines()[-40:])
        self.deaths.append(f"{why}\n{tail}")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._unmount()
        self.start()
        return tail

    def _unmount(self) -> None:
        if self.export == "fuse" and (os.path.ismount(self.fuse_dir) or is_dead_mount(str(self.fuse_dir))):
            subprocess.run(["umount", "-l", str(self.fuse_dir)], capture_output=True)

    def cleanup(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
        self._unmount()
        self._remember_nbdkits()
        stop_nbdkits(self.nbdkit_pids)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # logs

    def log_text(self, *, all_incarnations: bool = False) -> str:
        paths = self.logs if all_incarnations else [self.log_path]
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def new_log(self) -> str:
        """What this incarnation logged since the last call."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_seen)
            data = f.read()
        # only whole lines: a line being written shows next time
        whole = data[: data.rfind(b"\n") + 1]
        self._log_seen += len(whole)
        return whole.decode(errors="replace")

    # the data written before a storm

    def write_reference(self) -> None:
        if self.export == "fuse":
            fd = os.open(self.disk_file, os.O_RDWR)
            try:
                assert os.pwrite(fd, REF_DATA, 0) == REF_SIZE
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        client = ChannelClient(self.channel_socket())
        try:
            for offset in range(0, REF_SIZE, 256 * KiB):
                client.write(offset, REF_DATA[offset: offset + 256 * KiB])
        finally:
            client.close()

    def read_reference(self) -> bytes:
        if self.export == "fuse":
            fd = os.open(self.disk_file, os.O_RDONLY)
            try:
                return os.pread(fd, REF_SIZE, 0)
            finally:
                os.close(fd)
        client = ChannelClient(self.channel_socket())
        try:
            return b"".join(client.read(o, 256 * KiB) for o in range(0, REF_SIZE, 256 * KiB))
        finally:
            client.close()

    # checks

    def status(self) -> dict:
        answer = control_request(self.control, {"cmd": "status"})
        assert answer.get("ok") is True, f"status was refused: {answer}"
        return answer["status"]

    def rejected(self, status: dict | None = None) -> dict | None:
        """``rejected_inputs`` of ``status`` (asked now if None), or None if this daemon has none."""
        status = self.status() if status is None else status
        return status.get("rejected_inputs")

    def run_example(self, fn, *args):
        """Run one example (``fn(*args)``) against the live daemon, then :meth:`after_example`.

        A daemon the previous example left dead or hung is started again
        first, so each example meets a live daemon.
        """
        if not self.alive():
            self._restart("found dead before an example")
        try:
            result = fn(*args)
        except Hang as exc:
            tail = self._restart(f"hang: {exc}")
            raise Hang(f"{exc}\nthe daemon's log ends:\n{tail}") from None
        except Exception as exc:
            # A socket refused us, an answer was missing or wrong: is the daemon going down?
            if self._exits_soon(10.0 if isinstance(exc, OSError) else 2.0):
                self._died(f"seen first: {type(exc).__name__}: {str(exc)[:300]}")
            raise
        self.after_example()
        return result

    def _exits_soon(self, within: float = 10.0) -> bool:
        """Whether the daemon process ends within ``within`` seconds (it is being torn down)."""
        try:
            self.proc.wait(within)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _died(self, seen: str = ""):
        code = self.proc.returncode
        tail = self._restart(f"died with exit code {code}")
        raise AssertionError(f"the daemon died (exit code {code}) on this input{'; ' + seen if seen else ''}; "
                             f"its log ends:\n{tail}") from None

    def after_example(self) -> None:
        """The checks after each example (see the module doc)."""
        if not self.alive():
            self._died()
        try:
            status = self.status()
        except (OSError, AssertionError, ValueError) as exc:
            if self._exits_soon():
                self._died(f"status then failed: {exc}")
            tail = self._restart(f"status failed: {exc}")
            raise AssertionError(f"the control socket no longer answers status ({exc}); log:\n{tail}") from None
        bugs = [line for line in self.new_log().splitlines() if BUG_LINE.search(line)]
        internal = _internal_errors(self.rejected(status))
        new = {s: n - self._internal_seen.get(s, 0) for s, n in internal.items() if n > self._internal_seen.get(s, 0)}
        self._internal_seen = internal
        if bugs or new:
            raise AssertionError(f"the daemon logged a traceback or an internal error on this input "
                                 f"(new internal errors counted: {new or 'none'}):\n" + "\n".join(bugs[:20]))

    def check_after_storm(self, surfaces: tuple[str, ...] = (), before: dict | None = None) -> None:
        """Alive, the reference data intact, status answers, no bug in any log; counted rejections.

        ``surfaces``: where the storm sent input that must have been
        rejected at least once; checked when the daemon has counters.
        ``before``: :meth:`rejected` before the storm.
        """
        assert not self.deaths, "the daemon died or hung during the storm:\n\n" + "\n\n".join(self.deaths)
        assert self.alive(), f"the daemon is gone; its log:\n{self.log_text()[-4000:]}"
        data = self.read_reference()
        if data != REF_DATA:
            first = next((i for i, (a, b) in enumerate(zip(data, REF_DATA)) if a != b), min(len(data), REF_SIZE))
            raise AssertionError(f"the data written before the storm changed: first difference at byte {first} "
                                 f"(read {len(data)} bytes)")
        status = self.status()
        assert status["targets"]["disk"]["size"] == SIZE
        text = self.log_text(all_incarnations=True)
        bugs = [line for line in text.splitlines() if BUG_LINE.search(line)]
        assert not bugs, "the daemon logged tracebacks or internal errors:\n" + "\n".join(bugs[:20])
        rejected = self.rejected(status)
        if rejected is None:
            return  # a daemon without counters (before issue #21's guard)
        internal = _internal_errors(rejected)
        assert not internal, f"the guard caught exceptions no handler expected: {internal}"
        for surface in surfaces:
            now = sum(rejected.get(surface, {}).values())
            was = sum(((before or {}).get(surface) or {}).values())
            assert now > was, f"no rejected input was counted for {surface}: {rejected}"


def _internal_errors(rejected: dict | None) -> dict[str, int]:
    """``{surface: count}`` of the guard's internal errors (exceptions no handler expected)."""
    return {s: r["internal-error"] for s, r in (rejected or {}).items() if r.get("internal-error")}

