"""Block I/O over NBD: dmuserd's nbdkit export and its own NBD server against nbdkit alone.

What is measured
    fio's ``nbd`` engine (libnbd, one connection) against three NBD servers
    on a Unix socket, each serving a 1 GiB RAM disk:

    * ``dmuserd``: ``dmuserd serve --backend memory:size=1G --export
      nbd:SOCK``, i.e. nbdkit → dmuserd's python plugin → dm-user channels
      (Unix sockets, the data through the shared pool: ``data=shm``) → the
      daemon's dispatcher → memory backend;
    * ``dmuserd_socket`` (no target): the same with ``data=socket``, every
      byte on the channel sockets (``iops_vs_dmuserd_socket`` and
      ``throughput_vs_dmuserd_socket`` are what the shared pool gains);
    * ``dmuserd_sparse`` (targets): ``dmuserd`` again, read without the
      prefill, so every read meets a never-written region of the memory
      disk; ``sparse_iops_vs_written`` and ``sparse_throughput_vs_written``
      (its figures over ``dmuserd``'s) should be about 1 (≥ 0.9: a sparse
      disk must read as fast as a written one; its CPU per request says the
      same without the noise);
    * ``nbdkit_python`` (anchor, with targets): nbdkit's python plugin
      running :mod:`bench.anchors.nbdkit_trivial_memory`, a ``bytearray``
      disk served directly by the callbacks: the floor cost of Python inside
      nbdkit. dmuserd pays that and a hop to a second process on top; the
      targets (issue #20) are ``iops_vs_nbdkit_python`` ≥ 0.9 and
      ``throughput_vs_nbdkit_python`` ≥ 1.0;
    * ``dmuserd_server`` (targets): ``--export nbd:SOCK,server=dmuserd``,
      the daemon speaking NBD itself (:mod:`dmuserd.daemon.nbd_server`, no
      nbdkit, no second process) over the same memory backend; its CPU per
      request is the daemon's alone. Issue #20's targets for it:
      ``server_iops_vs_nbdkit_python`` ≥ 0.9 and
      ``server_throughput_vs_nbdkit_python`` ≥ 1.0;
    * ``nbdkit_memory`` (anchor, no target): nbdkit's C ``memory`` plugin,
      the ceiling of nbdkit itself on this machine;
    * ``plugin_hop_floor`` (anchor, no target): nbdkit with dmuserd's own
      plugin on plain channels (no ``shm=``), its channels answered by
      :file:`bench/anchors/dmuser_memory_responder.c`, a RAM disk in C
      with nothing between socket and disk: the most any daemon behind the
      plugin can deliver with 1 MiB reads, where the time goes into moving
      data. ``hop_floor_throughput_vs_nbdkit_python`` is the price of the
      socket hop itself (the exact dm-user wire format on a Unix socket: one
      more copy of every byte), the best ``dmuserd_socket`` can be; the
      shared pool is meant to beat it. Not a floor for 4 KiB reads (its IOPS are reported, with
      no ratio): answers that come back at once make nbdkit's threads
      fight over its GIL, and nbdkit's CPU per request doubles. Not run
      (noted) without a C compiler.

    Every server runs nbdkit with the same ``--threads`` (:data:`THREADS`):
    the NBD export's default, so dmuserd runs as a user gets it and the
    anchors with as many threads contending for their GIL.

How
    For each server: start it, prefill the first 256 MiB (sequential 1 MiB
    writes with fio's random buffers, so reads return data; not for
    ``dmuserd_sparse``), then run over
    those 256 MiB:

    * ``randread``: ``--rw=randread --bs=4k --iodepth=32`` → IOPS;
    * ``seqread``: ``--rw=read --bs=1M --iodepth=4`` → MB/s (10**6 bytes/s).

    Quick mode: 1 s ramp + 4 s per job, one round. Full mode: 2 s ramp +
    15 s, two rounds (servers interleaved), best round kept (on a shared
    machine interference only lowers a figure). During each job the CPU
    time of each serving process is sampled (``/proc/PID/stat``) and
    reported per request (``cpu_us_per_4k_read``, ``cpu_us_per_1m_read``:
    dmuserd's daemon and its nbdkit, or the anchor's nbdkit), which says
    where the time goes more steadily than the rates on a busy machine. Afterwards dmuserd's
    counters must show no errors. Servers are stopped with SIGTERM (the
    dmuserd export with ``on-stop=stop``, so its nbdkit goes too). Needs
    fio with the nbd engine and nbdkit's python plugin, else ``Skip``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import subprocess
import tempfile
import time
from pathlib import Path

from bench.run import Skip
from dmuserd.daemon.nbd import DEFAULT_THREADS
from bench.servers import (
    READ_JOBS,
    ServerProcess,
    compare_rates,
    cpu_seconds,
    log_tail,
    run_command,
    run_fio,
    served_requests,
)

TITLE = ("4 KiB randread IOPS (QD32) and 1 MiB seq read MB/s over NBD (fio nbd engine): dmuserd (nbdkit, "
         "server=dmuserd) vs nbdkit python vs nbdkit memory")

REPO = Path(__file__).resolve().parents[2]
ANCHOR = REPO / "bench" / "anchors" / "nbdkit_trivial_memory.py"
DEVICE_SIZE = 1 << 30
REGION = 256 << 20
THREADS = DEFAULT_THREADS
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

RESPONDER_SOURCE = REPO / "bench" / "anchors" / "dmuser_memory_responder.c"
PLUGIN = REPO / "daemon" / "nbdkit_plugin.py"

SERVERS = ("nbdkit_python", "dmuserd", "dmuserd_socket", "dmuserd_sparse", "dmuserd_server", "nbdkit_memory",
           "plugin_hop_floor")
TARGETS = {"iops_vs_nbdkit_python": 0.9, "throughput_vs_nbdkit_python": 1.0,
           "sparse_iops_vs_written": 0.9, "sparse_throughput_vs_written": 0.9,
           "server_iops_vs_nbdkit_python": 0.9, "server_throughput_vs_nbdkit_python": 1.0}


class _Server(ServerProcess):
    #: Whether the first REGION bytes are written before the reads.
    prefill = True

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.socket = workdir / f"{self.name}.sock"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def ready(self) -> bool:
        return self.socket.exists()

    def start(self) -> None:
        self.launch(START_TIMEOUT)

    def pids(self) -> dict[str, int]:
        """The processes serving requests, by role (for CPU per request)."""
        return {"nbdkit": self.proc.pid}

    def stop(self) -> None:
        self.terminate(STOP_TIMEOUT)


class _Nbdkit(_Server):
    def plugin(self) -> list[str]:
        raise NotImplementedError

    def command(self) -> list[str]:
        # --foreground: nbdkit then exits with us (it sets PR_SET_PDEATHSIG).
        return ["nbdkit", "--foreground", "--threads", str(THREADS), "--unix", str(self.socket), *self.plugin()]


class _NbdkitPython(_Nbdkit):
    name = "nbdkit_python"

    def plugin(self) -> list[str]:
        return ["python", str(ANCHOR), f"size={DEVICE_SIZE}"]


class _NbdkitMemory(_Nbdkit):
    name = "nbdkit_memory"

    def plugin(self) -> list[str]:
        return ["memory", str(DEVICE_SIZE)]


class _PluginHopFloor(_Nbdkit):
    """nbdkit + dmuserd's plugin, its channels answered by the C responder."""

    name = "plugin_hop_floor"

    def __init__(self, workdir: Path, responder: Path) -> None:
        super().__init__(workdir)
        self.responder = responder
        self.channel = workdir / "channel.sock"
        self.responder_proc: subprocess.Popen | None = None

    def plugin(self) -> list[str]:
        return ["python", str(PLUGIN), f"channel={self.channel}", f"size={DEVICE_SIZE}", "block_size=512",
                "caps=read,write,flush", "timeout=4"]

    def start(self) -> None:
        with open(self.workdir / "responder.log", "wb") as log:
            self.responder_proc = subprocess.Popen([str(self.responder), str(self.channel), str(DEVICE_SIZE)],
                                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                   start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.channel.exists():
            if self.responder_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the C responder did not start: {log_tail(self.workdir / 'responder.log')}")
            time.sleep(0.02)
        super().start()

    def pids(self) -> dict[str, int]:
        return {"nbdkit": self.proc.pid, "responder": self.responder_proc.pid}

    def stop(self) -> None:
        super().stop()
        if self.responder_proc is not None:
            self.responder_proc.kill()
            self.responder_proc.wait()


def _build_responder(workdir: Path) -> Path | None:
    """Compile the C responder into ``workdir``; None when there is no C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    binary = workdir / "dmuser_memory_responder"
    result = run_command([cc, "-O2", "-o", str(binary), str(RESPONDER_SOURCE)])
    if result.returncode != 0:
        raise RuntimeError(f"compiling {RESPONDER_SOURCE.name} failed: {result.stderr.strip()}")
    return binary


class _Dmuserd(_Server):
    name = "dmuserd"
    data = "shm"  # the export's data= option

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.control = workdir / "dmuserd-control.sock"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dmuserd", "serve", "--name", "disk",
                "--backend", f"memory:size={DEVICE_SIZE}",
                "--export", f"nbd:{self.socket},on-stop=stop,threads={THREADS},data={self.data}",
                "--control-socket", str(self.control)]

    def ready(self) -> bool:
        return self.control.exists()  # created once every export is live

    def pids(self) -> dict[str, int]:
        state = json.loads((self.workdir / f".{self.socket.name}.dmuserd" / "nbdkit.json").read_text())
        return {"daemon": self.proc.pid, "nbdkit": state["pid"]}

    def status(self) -> dict:
        result = run_command([sys.executable, "-m", "dmuserd", "status", "--json", "--control-socket", str(self.control)],
                      timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"dmuserd status failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def stop(self) -> None:
        state = self.workdir / f".{self.socket.name}.dmuserd" / "nbdkit.json"
        try:
            nbdkit = json.loads(state.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            nbdkit = None
        super().stop()
        if nbdkit is not None:  # on-stop=stop took it down; make sure
            try:
                os.kill(nbdkit, signal.SIGKILL)
            except ProcessLookupError:
                pass


class _DmuserdSocket(_Dmuserd):
    name = "dmuserd_socket"
    data = "socket"


class _DmuserdSparse(_Dmuserd):
    name = "dmuserd_sparse"
    prefill = False


class _DmuserdServer(_Dmuserd):
    """The daemon's own NBD server (``server=dmuserd``): no nbdkit."""

    name = "dmuserd_server"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dmuserd", "serve", "--name", "disk",
                "--backend", f"memory:size={DEVICE_SIZE}",
                "--export", f"nbd:{self.socket},server=dmuserd", "--control-socket", str(self.control)]

    def pids(self) -> dict[str, int]:
        return {"daemon": self.proc.pid}

    def stop(self) -> None:
        _Server.stop(self)


def _fio(uri: str, name: str, args: list[str]) -> dict:
    return run_fio(name, ["--ioengine=nbd", f"--uri={uri}", f"--size={REGION}"], args)


def _measure(server: _Server, ramp: int, runtime: int) -> tuple[dict, dict]:
    try:
        server.start()
        info = {}
        if server.prefill:
            prefill = _fio(server.uri, "prefill", ["--rw=write", "--bs=1M", "--iodepth=8"])
            info["prefill_mb_s"] = round(prefill["write"]["bw_bytes"] / 1e6, 1)
        timed = [f"--ramp_time={ramp}", f"--runtime={runtime}", "--time_based"]
        pids = server.pids()
        # CPU per request of each process, per job (fio's ramp included, so a little high).
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        rand = _fio(server.uri, "randread", READ_JOBS["randread"] + timed)["read"]
        info["cpu_us_per_4k_read"] = _cpu_per_request(pids, before, rand["total_ios"])
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        seq = _fio(server.uri, "seqread", READ_JOBS["seqread"] + timed)["read"]
        info["cpu_us_per_1m_read"] = _cpu_per_request(pids, before, seq["total_ios"])
        figures = {
            "iops": round(rand["iops"]),
            "mb_s": round(seq["bw_bytes"] / 1e6, 1),
            "randread_clat_p99_us": round(rand["clat_ns"]["percentile"].get("99.000000", 0) / 1000, 1),
        }
        if isinstance(server, _Dmuserd):
            info["requests"] = served_requests(server.status())
        return figures, info
    finally:
        server.stop()


def _cpu_per_request(pids: dict[str, int], before: dict[str, float], requests: int) -> dict[str, float]:
    """µs of CPU each process spent per request since ``before``."""
    return {name: round((cpu_seconds(pid) - before[name]) / (requests or 1) * 1e6, 1) for name, pid in pids.items()}


def _check_tools() -> None:
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            raise Skip(f"{tool} is not installed")
    if "nbd" not in run_command(["fio", "--enghelp"]).stdout:
        raise Skip("this fio has no nbd engine (it needs libnbd)")
    if run_command(["nbdkit", "python", "--dump-plugin"]).returncode != 0:
        raise Skip("nbdkit's python plugin is not installed (nbdkit-plugin-python)")


def run(quick: bool) -> dict:
    _check_tools()
    ramp, runtime, rounds = (1, 4, 1) if quick else (2, 15, 2)
    infos: dict[str, dict] = {}
    workdir = Path(tempfile.mkdtemp(prefix="dmuserd-bench-nbd-"))
    try:
        responder = _build_responder(workdir)
        classes = {"nbdkit_python": _NbdkitPython, "dmuserd": _Dmuserd, "dmuserd_socket": _DmuserdSocket,
                   "dmuserd_sparse": _DmuserdSparse, "dmuserd_server": _DmuserdServer, "nbdkit_memory": _NbdkitMemory,
                   "plugin_hop_floor": lambda rdir: _PluginHopFloor(rdir, responder)}
        servers = [name for name in SERVERS if name != "plugin_hop_floor" or responder is not None]
        samples: dict[str, list[dict]] = {s: [] for s in servers}
        for round_ in range(rounds):
            for name in servers:
                rdir = workdir / f"r{round_}-{name}"
                rdir.mkdir()
                figures, info = _measure(classes[name](rdir), ramp, runtime)
                samples[name].append(figures)
                infos[name] = info
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    compared = compare_rates(samples)
    # The sparse disk against the written one (compare_rates' ratios are the other way round).
    for kind, figure in (("iops", "4k_randread_iops"), ("throughput", "1m_seqread_mb_s")):
        del compared["ratios"][f"{kind}_vs_dmuserd_sparse"]
        written = compared["figures"][f"dmuserd_{figure}"]
        if written:
            compared["ratios"][f"sparse_{kind}_vs_written"] = round(compared["anchors"][f"dmuserd_sparse_{figure}"]
                                                                    / written, 3)
    # The daemon's own server is ours too: its figures, and its ratios against the python anchor.
    for kind, figure in (("iops", "4k_randread_iops"), ("throughput", "1m_seqread_mb_s")):
        del compared["ratios"][f"{kind}_vs_dmuserd_server"]
        value = compared["figures"][f"dmuserd_server_{figure}"] = compared["anchors"].pop(f"dmuserd_server_{figure}")
        python = compared["anchors"][f"nbdkit_python_{figure}"]
        if python:
            compared["ratios"][f"server_{kind}_vs_nbdkit_python"] = round(value / python, 3)
    if responder is not None:
        # A floor for 1 MiB reads only: with 4 KiB ones, answers that come back at once make nbdkit's
        # threads fight over its GIL (nbdkit's CPU per request doubles), so its IOPS bound nothing.
        del compared["ratios"]["iops_vs_plugin_hop_floor"]
        floor, python = (compared["anchors"][f"{name}_1m_seqread_mb_s"] for name in ("plugin_hop_floor", "nbdkit_python"))
        if python:
            compared["ratios"]["hop_floor_throughput_vs_nbdkit_python"] = round(floor / python, 3)
    notes = [
        f"fio --ioengine=nbd (one connection) on a Unix socket; 1 GiB RAM disks, prefilled (but dmuserd_sparse) "
        f"and read over the first "
        f"{REGION >> 20} MiB; randread 4k QD32, seqread 1M QD4; {ramp} s ramp + {runtime} s per job, "
        f"{rounds} round(s), best kept; nbdkit --threads {THREADS} for every server",
        "dmuserd: memory backend behind nbdkit + daemon/nbdkit_plugin.py (data=shm; dmuserd_socket: data=socket); "
        "dmuserd_server: the daemon serving NBD itself (server=dmuserd, no nbdkit; CPU: the daemon only); "
        "nbdkit_python: "
        "bench/anchors/nbdkit_trivial_memory.py; nbdkit_memory: nbdkit's C memory plugin; plugin_hop_floor: "
        + ("nbdkit + daemon/nbdkit_plugin.py answered by bench/anchors/dmuser_memory_responder.c"
           if responder is not None else "not run (no C compiler)"),
        "prefill MB/s: " + ", ".join(f"{n} {i.get('prefill_mb_s')}" for n, i in infos.items()),
        "CPU µs per 4k read: " + ", ".join(f"{n} {i.get('cpu_us_per_4k_read')}" for n, i in infos.items()),
        "CPU µs per 1M read: " + ", ".join(f"{n} {i.get('cpu_us_per_1m_read')}" for n, i in infos.items()),
    ]
    return {
        **compared,
        "targets": TARGETS,
        "samples": samples,
        "cpu_us_per_4k_read": {n: i.get("cpu_us_per_4k_read") for n, i in infos.items()},
        "cpu_us_per_1m_read": {n: i.get("cpu_us_per_1m_read") for n, i in infos.items()},
        "notes": "; ".join(notes),
    }
