"""The ``rbd`` backend over NBD, on a local single-node Ceph cluster (full run only).

``scripts/ceph-dev`` starts a throw-away cluster (one mon, one mgr, one
memstore OSD on 127.0.0.1) and a 1 GiB image is filled with ``rbd bench``.
On that image: 4 KiB random reads at QD32 and 1 MiB sequential reads
(fio's nbd engine) of dmuserd's NBD export of an ``rbd`` backend, through
nbdkit (``dmuserd``, the default ``server=nbdkit``) and through the
daemon's own NBD server (``dmuserd_server``, ``server=dmuserd``), against
(a) ``qemu-nbd`` with qemu's ``rbd`` driver on the same image
(``qemu-block-extra``) and (b) fio's own ``rbd`` engine calling librbd
directly, no NBD at all: the client library's limit. Goals (issue #25):
at least 2x (a), at least 0.5x (b), for both dmuserd rows. A further
anchor, dmuserd's nbdkit export of the ``memory`` backend, is that NBD
path's own ceiling (what the ``rbd`` backend would reach if it cost
nothing).

The cluster runs on the same cores as the clients and the servers, so CPU
per request decides the rates on a small machine: during each job the CPU
time (user + system, all threads, ``/proc/PID/stat``) of every serving
process (dmuserd's daemon and its nbdkit, qemu-nbd, the fio process of the
rbd engine, and the ceph-osd) is reported per request
(``cpu_us_per_4k_read``, ``cpu_us_per_1m_read``), which says where the
time goes more steadily than the rates on a busy machine. Two rounds,
servers interleaved, each server's best round kept (interference only
lowers a figure); the CPU figures are the last round's.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.run import Skip
from bench.servers import READ_JOBS, ServerProcess, compare_rates, cpu_seconds, run_command, run_fio

TITLE = ("rbd backend over NBD on a local Ceph cluster: 4 KiB randread IOPS, 1 MiB read MB/s, CPU per request "
         "(anchors: qemu-nbd rbd, fio rbd engine)")

ROOT = Path(__file__).resolve().parents[2]
CEPH_DEV = ROOT / "scripts" / "ceph-dev"
IMAGE = "bench"
#: The goal ratios of issue #25, for each dmuserd row (prefix ``dmuserd_server_`` for the built-in server's).
GOALS = {"iops_vs_qemu_nbd_rbd": 2.0, "throughput_vs_qemu_nbd_rbd": 2.0,
         "iops_vs_fio_rbd_engine": 0.5, "throughput_vs_fio_rbd_engine": 0.5}


class _Server(ServerProcess):
    """An NBD server on a Unix socket in ``workdir``."""

    def __init__(self, workdir: Path, conf: str) -> None:
        super().__init__(workdir)
        self.conf = conf
        self.socket = workdir / f"{self.name}.sock"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def pids(self) -> dict[str, int]:
        """The processes serving requests, by role (for CPU per request)."""
        return {self.name: self.proc.pid}


class _Dmuserd(_Server):
    """dmuserd's NBD export of the ``rbd`` backend, behind nbdkit (the default ``server=nbdkit``)."""

    name = "dmuserd"
    export_options = "on-stop=stop"

    def __init__(self, workdir: Path, conf: str) -> None:
        super().__init__(workdir, conf)
        self.control = workdir / f"{self.name}-control.sock"

    def backend(self) -> str:
        return f"rbd:pool=rbd,image={IMAGE},conf={self.conf}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dmuserd", "serve", "--name", "disk", "--backend", self.backend(),
                "--export", f"nbd:{self.socket},{self.export_options}", "--control-socket", str(self.control)]

    def ready(self) -> bool:
        return self.control.exists()  # created once every export is live

    def pids(self) -> dict[str, int]:
        state = json.loads((self.workdir / f".{self.socket.name}.dmuserd" / "nbdkit.json").read_text())
        return {"daemon": self.proc.pid, "nbdkit": state["pid"]}


class _DmuserdServer(_Dmuserd):
    """The same backend served by the daemon's own NBD server (``server=dmuserd``, no nbdkit)."""

    name = "dmuserd_server"
    export_options = "server=dmuserd"

    def pids(self) -> dict[str, int]:
        return {"daemon": self.proc.pid}


class _DmuserdMemory(_Dmuserd):
    """dmuserd's nbdkit export of the ``memory`` backend: that NBD path's own ceiling here, no cluster."""

    name = "dmuserd_memory"

    def backend(self) -> str:
        return "memory:size=1G"


class _QemuNbd(_Server):
    name = "qemu_nbd_rbd"

    def command(self) -> list[str]:
        return ["qemu-nbd", "-f", "raw", "--persistent", "--shared=8", f"--socket={self.socket}",
                f"rbd:rbd/{IMAGE}:conf={self.conf}"]

    def ready(self) -> bool:
        return self.socket.exists()


SERVERS = (_Dmuserd, _DmuserdServer, _QemuNbd, _DmuserdMemory)


def _check_tools() -> None:
    for tool in ("fio", "qemu-nbd", "nbdkit", "ceph-mon", "ceph-osd", "ceph-mgr", "rbd"):
        if not shutil.which(tool):
            raise Skip(f"{tool} is not installed (scripts/system-packages.txt)")
    engines = run_command(["fio", "--enghelp"]).stdout
    if "rbd" not in engines or "nbd" not in engines:
        raise Skip("this fio lacks the rbd or nbd engine")
    from dmuserd.backends._librbd import libs

    try:
        libs()
    except OSError as exc:
        raise Skip(str(exc)) from None


def _children_cpu() -> float:
    """CPU seconds of this process's waited-for children (fio and the job processes it waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _job(name: str, target: list[str], job: str, timing: list[str], pids: dict[str, int]) -> tuple[dict, dict]:
    """One fio job: (its read report, µs of CPU per request of each process in ``pids`` and of fio itself).

    fio's own CPU counts only where it is the server (the rbd engine: ``pids`` has no entry then).
    """
    before = {role: cpu_seconds(pid) for role, pid in pids.items()}
    fio_before = _children_cpu()
    read = run_fio(f"{name}-{job}", target, READ_JOBS[job] + timing)["read"]
    spent = {role: cpu_seconds(pid) - before[role] for role, pid in pids.items()}
    if "fio" not in pids:
        spent["fio"] = _children_cpu() - fio_before
    requests = read["total_ios"] or 1
    return read, {role: round(seconds / requests * 1e6, 1) for role, seconds in spent.items()}


def _osd_pid(cluster: Path) -> int:
    return int(next((cluster / "run").glob("osd.*.pid")).read_text())


def measure(workdir: Path, conf: str, osd: int, size_mb: int, timing: list[str], rounds: int,
            servers=SERVERS) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Both jobs on each server and on fio's rbd engine, ``rounds`` times, servers interleaved.

    Returns ``({name: [{"iops", "mb_s"}, ...]}, {name: {"cpu_us_per_4k_read": {...}, "cpu_us_per_1m_read": {...}}})``
    (CPU: the last round's). The image ``rbd/bench`` of ``size_mb`` MiB must exist, written, on the cluster of
    ``conf``; ``osd`` is its ceph-osd's pid.
    """
    size = [f"--size={size_mb}M"]
    samples: dict[str, list[dict]] = {}
    cpu: dict[str, dict] = {}
    for round_ in range(rounds):
        for server_cls in servers:
            rdir = workdir / f"r{round_}-{server_cls.name}"
            rdir.mkdir()
            server = server_cls(rdir, conf)
            server.launch(timeout=60)
            try:
                pids = server.pids() | ({} if server_cls is _DmuserdMemory else {"osd": osd})
                target = ["--ioengine=nbd", f"--uri={server.uri}", *size]
                rand, rand_cpu = _job(server.name, target, "randread", timing, pids)
                seq, seq_cpu = _job(server.name, target, "seqread", timing, pids)
            finally:
                server.terminate(30)
            for info in (rand_cpu, seq_cpu):
                info.pop("fio")  # the client: the same fio nbd engine for every server
            samples.setdefault(server.name, []).append(
                {"iops": round(rand["iops"]), "mb_s": round(seq["bw_bytes"] / 1e6)})
            cpu[server.name] = {"cpu_us_per_4k_read": rand_cpu, "cpu_us_per_1m_read": seq_cpu}
        direct = ["--ioengine=rbd", "--clientname=admin", "--pool=rbd", f"--rbdname={IMAGE}", *size]
        os.environ["CEPH_CONF"] = conf  # fio's rbd engine finds the cluster through it
        try:
            rand, rand_cpu = _job("fio_rbd", direct, "randread", timing, {"osd": osd})
            seq, seq_cpu = _job("fio_rbd", direct, "seqread", timing, {"osd": osd})
        finally:
            os.environ.pop("CEPH_CONF", None)
        samples.setdefault("fio_rbd_engine", []).append(
            {"iops": round(rand["iops"]), "mb_s": round(seq["bw_bytes"] / 1e6)})
        cpu["fio_rbd_engine"] = {"cpu_us_per_4k_read": rand_cpu, "cpu_us_per_1m_read": seq_cpu}
    return samples, cpu


def _with_server_ratios(compared: dict) -> dict:
    """``compare_rates``' result with the built-in server's ratios against the anchors (``dmuserd_server_*``)
    instead of the nbdkit row's ratios against it."""
    ratios, anchors = compared["ratios"], compared["anchors"]
    for kind in ("iops", "throughput"):
        ratios.pop(f"{kind}_vs_dmuserd_server", None)
    for anchor in ("qemu_nbd_rbd", "fio_rbd_engine"):
        for kind, figure in (("iops", "4k_randread_iops"), ("throughput", "1m_seqread_mb_s")):
            theirs = anchors.get(f"{anchor}_{figure}")
            ours = anchors.get(f"dmuserd_server_{figure}")
            if theirs and ours is not None:
                ratios[f"dmuserd_server_{kind}_vs_{anchor}"] = round(ours / theirs, 3)
    return compared


def run(quick: bool) -> dict:
    if quick:  # the cluster's start alone (about 20 s) would take a third of the quick set's minute
        raise Skip("full run only: it starts a Ceph cluster (about 20 s) and measures for about five minutes")
    _check_tools()
    size_mb, runtime, rounds = 1024, 10, 2
    timing = ["--time_based", f"--runtime={runtime}", "--ramp_time=1"]
    workdir = Path(tempfile.mkdtemp(prefix="dmuserd-bench-rbd-"))
    cluster = workdir / "ceph"
    started = run_command([str(CEPH_DEV), "start", str(cluster)], timeout=300)
    try:
        if started.returncode != 0:
            raise RuntimeError(f"scripts/ceph-dev start failed: {started.stderr.strip()[-500:]}")
        conf = started.stdout.strip().splitlines()[-1]
        subprocess.run(["rbd", "--conf", conf, "create", "--size", f"{size_mb}M", f"rbd/{IMAGE}"], check=True,
                       capture_output=True)
        subprocess.run(["rbd", "--conf", conf, "bench", "--io-type", "write", "--io-size", "4M",
                        "--io-total", f"{size_mb}M", f"rbd/{IMAGE}"], check=True, capture_output=True)
        samples, cpu = measure(workdir, conf, _osd_pid(cluster), size_mb, timing, rounds)
        result = _with_server_ratios(compare_rates(samples, ours="dmuserd"))
        result["targets"] = GOALS | {f"dmuserd_server_{key}": goal for key, goal in GOALS.items()}
        result["samples"] = samples
        for key in ("cpu_us_per_4k_read", "cpu_us_per_1m_read"):
            result[key] = {name: info[key] for name, info in cpu.items()}
        result["notes"] = "; ".join([
            f"{size_mb} MiB image on a memstore OSD (scripts/ceph-dev), fio {runtime} s per job (1 s ramp), "
            f"randread 4k QD32, read 1M QD4, {rounds} rounds interleaved, best kept; cluster, servers and clients "
            f"share {os.cpu_count()} CPUs",
            "dmuserd: rbd backend behind nbdkit (server=nbdkit); dmuserd_server: the same behind the daemon's own "
            "NBD server (server=dmuserd); dmuserd_memory: memory backend behind nbdkit",
            *(f"CPU µs per {size} read: " + ", ".join(f"{n} {info[key]}" for n, info in cpu.items())
              for size, key in (("4k", "cpu_us_per_4k_read"), ("1M", "cpu_us_per_1m_read"))),
        ])
        return result
    finally:
        run_command([str(CEPH_DEV), "stop", str(cluster)], timeout=120)
        shutil.rmtree(workdir, ignore_errors=True)
