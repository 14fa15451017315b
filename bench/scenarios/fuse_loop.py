"""Block I/O through loop → FUSE: dmuserd against two other FUSE file servers.

What is measured
    fio on a loop device (``losetup --direct-io=on``) whose backing file is a
    FUSE file, for three servers of that file:

    * ``dmuserd``: ``dmuserd serve --backend memory:size=1G --export fuse:DIR``,
      i.e. FUSE → one typed request → dispatcher → memory backend, all of it,
      through dmuserd's own FUSE session (``daemon/_fuse_session.c`` on
      libfuse's low-level API; pyfuse3 until session 12);
    * ``dmuserd_emulate_dm_user``: the same with ``fuse:DIR,emulate=dm-user``,
      every request through the in-process dm-user kernel model (reported
      beside it: ``*_vs_dmuserd_emulate_dm_user`` is what the direct path gains);
    * ``bare_pyfuse3`` (anchor): :mod:`bench.anchors.bare_pyfuse3`, a pyfuse3
      (trio) server whose ``read`` returns a slice of a ``bytearray`` and
      nothing else, with dmuserd's FUSE options (``direct_io`` on open, same
      ``min_tasks``/``max_tasks`` dmuserd's export used with pyfuse3). It is
      the floor cost of serving a file from Python with pyfuse3: issue #20
      states its targets against it (below). dmuserd no longer runs on
      pyfuse3, so it can pass this floor: the ratio says by how much.
    * ``qemu_storage_daemon`` (anchor): ``qemu-storage-daemon --blockdev
      driver=file,... --export type=fuse,...,writable=on`` over a 1 GiB image
      on tmpfs (``/dev/shm``, else a tmpfs mounted for the run), so it serves
      from memory too. A C server: the ratios against it are reported, with
      no target. If ``qemu-storage-daemon`` is not installed this anchor is
      left out (and said so in the notes); the scenario still runs.
    * ``pyfuse3_memory_backend`` (anchor): the bare server with
      ``--memory-backend``: its handlers await dmuserd's ``memory`` backend
      directly (``read_views``, as dmuserd's FUSE read: a 4 KiB read is a
      view of the backend's chunk, not a copy), with no dm-user model and no
      dispatcher. Its rates over the
      bare server's (``backend_call_ceiling_*``) are the most that any
      pyfuse3 server calling a Python backend per request can reach against
      the bare server; dmuserd on pyfuse3 reached 0.89-0.95 of it (session
      11), and its own session is not bound by it.

    Each server's CPU time (all threads, user + system, from ``/proc``) over
    each job, per request, is in ``cpu_us_per_request``, and each anchor's
    over dmuserd's in the ratios (``cpu_per_request_*_over_dmuserd``): on a
    shared machine it moves far less than the rates, so it is the figure to
    compare runs by. "Per request" is per fio request: a 1 MiB read reaches
    every server as two 512 KiB FUSE READs (the loop device's queue takes at
    most 128 page segments), a 4 KiB read as one.

    Where a server's time goes is best seen under the job, not in a warm
    loop in process: callgrind on the serving process under fio counts its
    user-space instructions per request deterministically (session 12:
    dmuserd 22.4k, bare pyfuse3 130.7k, the ceiling anchor 136.5k; pyfuse3,
    trio and libfuse take ~125k of those per request in a pyfuse3 server).

How
    For each server in turn: start it, wait for its mount, attach
    ``losetup --find --show --direct-io=on FILE``, prefill the first 256 MiB
    (fio, sequential 1 MiB writes, fio's random buffer contents, so reads
    return real data, not holes), then run on the loop device, over those
    256 MiB, with libaio and ``--direct=1``:

    * ``randread``: ``--rw=randread --bs=4k --iodepth=32`` → IOPS;
    * ``seqread``: ``--rw=read --bs=1M --iodepth=4`` → MB/s (10**6 bytes/s).

    Targets (issue #20): ``iops_vs_bare_pyfuse3`` ≥ 0.9 and
    ``throughput_vs_bare_pyfuse3`` ≥ 0.95.

    Each job is time-based: quick mode 1 s ramp + 4 s measured, one round;
    full mode 2 s ramp + 20 s measured, two rounds (servers interleaved per
    round) and the best round kept, since on a shared machine interference
    only ever lowers a figure. Every sample is in ``samples``. After the
    runs, the daemon's counters (``dmuserd status``) must show no errors.

    Cleanup always runs (loop detached, server stopped with SIGTERM then
    SIGKILL, mount lazily unmounted if still there, temporary files removed).
    Needs root, ``/dev/fuse``, fio, losetup and pyfuse3; otherwise ``Skip``.
    Quick mode takes about 40 s.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.run import Skip
from bench.servers import READ_JOBS, ServerProcess, compare_rates, cpu_seconds, run_command, run_fio, served_requests

TITLE = "4 KiB randread IOPS (QD32) and 1 MiB seq read MB/s via loop → FUSE: dmuserd vs bare pyfuse3 vs qemu-storage-daemon"

REPO = Path(__file__).resolve().parents[2]
BARE_ANCHOR = REPO / "bench" / "anchors" / "bare_pyfuse3.py"
DEVICE_SIZE = 1 << 30
REGION = 256 << 20  # prefilled, and the span every read job covers
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

SERVERS = ("bare_pyfuse3", "dmuserd", "dmuserd_emulate_dm_user", "pyfuse3_memory_backend", "qemu_storage_daemon")
TARGETS = {"iops_vs_bare_pyfuse3": 0.9, "throughput_vs_bare_pyfuse3": 0.95}  # issue #20


# -- helpers -------------------------------------------------------------------


def _mount_points() -> list[str]:
    points = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                # the mount point is field 5, with octal escapes (\040) for odd characters
                if len(fields) > 4:
                    points.append(fields[4].encode().decode("unicode_escape"))
    except OSError:
        pass
    return points


def _is_mounted(path: str) -> bool:
    """Whether ``path`` is a mount point now (works for a file mount point too)."""
    return path in _mount_points()


def _fstype(path: str) -> str | None:
    best, kind = "", None
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fields[2]
    return kind


class _Server(ServerProcess):
    """A FUSE server process: start, wait for its mount, stop, clean up."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.mountpoint = ""  # what gets mounted (a directory or a file)
        self.file = ""  # the FUSE file the loop device sits on

    def prepare(self) -> None:
        pass

    def ready(self) -> bool:
        return _is_mounted(self.mountpoint) and os.path.exists(self.file)

    def start(self) -> str:
        self.prepare()
        self.launch(START_TIMEOUT)
        return self.file

    def stop(self) -> None:
        self.terminate(STOP_TIMEOUT)
        if self.mountpoint and _is_mounted(self.mountpoint):
            if run_command(["fusermount3", "-u", "-z", self.mountpoint]).returncode != 0:
                run_command(["umount", "-l", self.mountpoint])
        self.cleanup()

    def cleanup(self) -> None:
        pass


class _Dmuserd(_Server):
    name = "dmuserd"
    #: the FUSE export's options (after its directory)
    export_options = ""

    def prepare(self) -> None:
        self.mountpoint = str(self.workdir / "dmuserd")
        os.mkdir(self.mountpoint)
        self.file = os.path.join(self.mountpoint, "disk")
        self.control = str(self.workdir / "dmuserd.sock")

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dmuserd", "serve", "--name", "disk",
                "--backend", f"memory:size={DEVICE_SIZE}", "--export", f"fuse:{self.mountpoint}{self.export_options}",
                "--control-socket", self.control]

    def status(self) -> dict:
        result = run_command([sys.executable, "-m", "dmuserd", "status", "--json", "--control-socket", self.control], timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"dmuserd status failed: {result.stderr.strip()}")
        return json.loads(result.stdout)


class _DmuserdEmulated(_Dmuserd):
    name = "dmuserd_emulate_dm_user"
    export_options = ",emulate=dm-user"


class _BarePyfuse3(_Server):
    name = "bare_pyfuse3"

    def prepare(self) -> None:
        self.mountpoint = str(self.workdir / "bare")
        os.mkdir(self.mountpoint)
        self.file = os.path.join(self.mountpoint, "disk")

    def command(self) -> list[str]:
        return [sys.executable, str(BARE_ANCHOR), "--size", str(DEVICE_SIZE), self.mountpoint]


class _Pyfuse3MemoryBackend(_BarePyfuse3):
    name = "pyfuse3_memory_backend"

    def command(self) -> list[str]:
        return [*super().command(), "--memory-backend"]


class _QemuStorageDaemon(_Server):
    name = "qemu_storage_daemon"

    def __init__(self, workdir: Path, image_dir: str) -> None:
        super().__init__(workdir)
        self.image = os.path.join(image_dir, f"dmuserd-bench-fuse-loop-{os.getpid()}.img")

    def prepare(self) -> None:
        self.mountpoint = self.file = str(self.workdir / "qsd.img")
        Path(self.file).touch()  # qsd's FUSE export mounts over a regular file
        with open(self.image, "wb") as f:
            f.truncate(DEVICE_SIZE)

    def command(self) -> list[str]:
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=f,filename={self.image}",
                "--export", f"type=fuse,id=e,node-name=f,mountpoint={self.mountpoint},writable=on"]

    def cleanup(self) -> None:
        try:
            os.unlink(self.image)
        except FileNotFoundError:
            pass


def _attach_loop(path: str) -> str:
    result = run_command(["losetup", "--find", "--show", "--direct-io=on", path])
    if result.returncode != 0:
        raise RuntimeError(f"losetup {path} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def _loop_dio(device: str) -> bool:
    try:
        return Path(f"/sys/block/{os.path.basename(device)}/loop/dio").read_text().strip() == "1"
    except OSError:
        return False


def _detach_loop(device: str) -> None:
    for _ in range(20):
        if run_command(["losetup", "-d", device]).returncode == 0:
            return
        time.sleep(0.1)


def _fio(device: str, name: str, args: list[str]) -> dict:
    return run_fio(name, [f"--filename={device}", "--ioengine=libaio", "--direct=1", f"--size={REGION}"], args)


def _fio_with_cpu(server: _Server, device: str, name: str, args: list[str]) -> tuple[dict, float]:
    """Run a read job; return fio's read figures and the server's CPU seconds per second meanwhile."""
    cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
    read = _fio(device, name, args)["read"]
    return read, (cpu_seconds(server.proc.pid) - cpu0) / (time.monotonic() - t0)


def _measure(server: _Server, ramp: int, runtime: int) -> tuple[dict, dict]:
    """Start ``server``, prefill, run both jobs; return (figures, extra info)."""
    device = None
    try:
        path = server.start()
        device = _attach_loop(path)
        info = {"loop_dio": _loop_dio(device)}
        prefill = _fio(device, "prefill", ["--rw=write", "--bs=1M", "--iodepth=8"])
        info["prefill_mb_s"] = round(prefill["write"]["bw_bytes"] / 1e6, 1)
        timed = [f"--ramp_time={ramp}", f"--runtime={runtime}", "--time_based"]
        rand, rand_cpu = _fio_with_cpu(server, device, "randread", READ_JOBS["randread"] + timed)
        seq, seq_cpu = _fio_with_cpu(server, device, "seqread", READ_JOBS["seqread"] + timed)
        figures = {
            "iops": round(rand["iops"]),
            "mb_s": round(seq["bw_bytes"] / 1e6, 1),
            "randread_clat_p99_us": round(rand["clat_ns"]["percentile"].get("99.000000", 0) / 1000, 1),
            # The server's CPU per request (all its threads, user + system):
            # less disturbed by other load on the machine than the rates.
            "randread_cpu_us_per_req": round(rand_cpu / rand["iops"] * 1e6, 1) if rand["iops"] else None,
            "seqread_cpu_us_per_req": round(seq_cpu / seq["iops"] * 1e6, 1) if seq["iops"] else None,
        }
        if isinstance(server, _Dmuserd):
            info["requests"] = served_requests(server.status())
        return figures, info
    finally:
        if device:
            _detach_loop(device)
        server.stop()


def _memory_dir(workdir: Path) -> tuple[str, str | None]:
    """A directory on tmpfs for the qemu image; (dir, a tmpfs we mounted or None)."""
    if os.path.isdir("/dev/shm") and _fstype("/dev/shm") == "tmpfs":
        return "/dev/shm", None
    mnt = workdir / "tmpfs"
    mnt.mkdir()
    result = run_command(["mount", "-t", "tmpfs", "-o", f"size={DEVICE_SIZE + (64 << 20)}", "tmpfs", str(mnt)])
    if result.returncode != 0:
        raise RuntimeError(f"mounting a tmpfs for the qemu image failed: {result.stderr.strip()}")
    return str(mnt), str(mnt)


def _check_tools() -> list[str]:
    if os.geteuid() != 0:
        raise Skip("needs root (losetup, FUSE mounts with allow_other)")
    if not os.path.exists("/dev/fuse"):
        raise Skip("/dev/fuse is missing (modprobe fuse)")
    for tool in ("fio", "losetup"):
        if shutil.which(tool) is None:
            raise Skip(f"{tool} is not installed")
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        raise Skip("pyfuse3 is not installed in this Python") from None
    notes = []
    if shutil.which("qemu-storage-daemon") is None:
        notes.append("qemu-storage-daemon not installed: its anchor is left out")
    return notes


# -- the scenario ----------------------------------------------------------------


def run(quick: bool) -> dict:
    notes = _check_tools()
    ramp, runtime, rounds = (1, 4, 1) if quick else (2, 20, 2)
    servers = [s for s in SERVERS if s != "qemu_storage_daemon" or shutil.which("qemu-storage-daemon")]
    samples: dict[str, list[dict]] = {s: [] for s in servers}
    infos: dict[str, dict] = {}
    workdir = Path(tempfile.mkdtemp(prefix="dmuserd-bench-fuse-loop-"))
    own_tmpfs = None
    try:
        image_dir = None
        if "qemu_storage_daemon" in servers:
            image_dir, own_tmpfs = _memory_dir(workdir)
        for round_ in range(rounds):
            for name in servers:
                rdir = workdir / f"r{round_}-{name}"
                rdir.mkdir()
                server = {
                    "bare_pyfuse3": lambda: _BarePyfuse3(rdir),
                    "dmuserd": lambda: _Dmuserd(rdir),
                    "dmuserd_emulate_dm_user": lambda: _DmuserdEmulated(rdir),
                    "pyfuse3_memory_backend": lambda: _Pyfuse3MemoryBackend(rdir),
                    "qemu_storage_daemon": lambda: _QemuStorageDaemon(rdir, image_dir),
                }[name]()
                figures, info = _measure(server, ramp, runtime)
                samples[name].append(figures)
                infos[name] = info
    finally:
        if own_tmpfs and _is_mounted(own_tmpfs):
            run_command(["umount", "-l", own_tmpfs])
        if not any(p.startswith(str(workdir) + "/") for p in _mount_points()):
            shutil.rmtree(workdir, ignore_errors=True)

    compared = compare_rates(samples)
    ratios = compared["ratios"]
    # CPU per request of each server: the anchors' over dmuserd's is what
    # the rate ratios would be if each server had a core to itself.
    cpu_keys = {"randread_4k": "randread_cpu_us_per_req", "seqread_1m": "seqread_cpu_us_per_req"}
    cpu = {name: {job: min((s[key] for s in runs if s[key]), default=None) for job, key in cpu_keys.items()}
           for name, runs in samples.items()}
    for job in cpu_keys:
        ours = cpu["dmuserd"][job]
        for name in servers:
            other = cpu[name][job]
            if ours and other and name != "dmuserd":
                ratios[f"cpu_per_request_{job}_{name}_over_dmuserd"] = round(other / ours, 3)

    floor, bare = compared["anchors"], "bare_pyfuse3"
    for figure, what in (("4k_randread_iops", "iops"), ("1m_seqread_mb_s", "throughput")):
        if floor.get(f"pyfuse3_memory_backend_{figure}") and floor.get(f"{bare}_{figure}"):
            ratios[f"backend_call_ceiling_{what}_vs_{bare}"] = round(
                floor[f"pyfuse3_memory_backend_{figure}"] / floor[f"{bare}_{figure}"], 3)

    notes[:0] = [
        f"fio libaio --direct=1 on loop (--direct-io=on) over each server's FUSE file (1 GiB); "
        f"prefilled and read over the first {REGION >> 20} MiB; randread 4k QD32, seqread 1M QD4; "
        f"{ramp} s ramp + {runtime} s per job, {rounds} round(s), best round kept",
        "dmuserd: memory backend, its own libfuse session, FUSE requests straight to the dispatcher; "
        "dmuserd_emulate_dm_user: the same "
        "through the in-process dm-user model; bare_pyfuse3: bench/anchors/bare_pyfuse3.py; "
        "pyfuse3_memory_backend: the bare server awaiting dmuserd's memory backend in its handlers; "
        "qemu_storage_daemon: driver=file image on tmpfs, FUSE export",
        "loop direct I/O: " + ", ".join(f"{n} {'on' if i.get('loop_dio') else 'OFF'}" for n, i in infos.items()),
        "prefill MB/s: " + ", ".join(f"{n} {i.get('prefill_mb_s')}" for n, i in infos.items()),
    ]
    return {
        **compared,
        "targets": {k: v for k, v in TARGETS.items() if k in ratios},
        "cpu_us_per_request": cpu,
        "samples": samples,
        "notes": "; ".join(notes),
    }
