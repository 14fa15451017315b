"""The ``rbd`` backend over NBD, on a local single-node Ceph cluster (full run only).

``scripts/ceph-dev`` starts a throw-away cluster (one mon, one mgr, one
memstore OSD on 127.0.0.1) and a 1 GiB image (quick: 256 MiB) is filled
with ``rbd bench``. On that image, one run: 4 KiB random reads at QD32 and
1 MiB sequential reads (fio's nbd engine) of dmuserd's NBD export of an
``rbd`` backend, against (a) ``qemu-nbd`` with qemu's ``rbd`` driver on the
same image (``qemu-block-extra``) and (b) fio's own ``rbd`` engine calling
librbd directly, no NBD at all: the client library's limit. Goals (issue
#25): at least 2x (a), at least 0.5x (b). A third anchor, dmuserd's NBD
export of the ``memory`` backend, is the NBD path's own ceiling (what the
``rbd`` backend would reach if it cost nothing). The cluster runs on the
same cores as the clients.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.run import Skip
from bench.servers import READ_JOBS, ServerProcess, compare_rates, run_command, run_fio

TITLE = "rbd backend over NBD on a local Ceph cluster: 4 KiB randread IOPS, 1 MiB read MB/s (anchors: qemu-nbd rbd, fio rbd engine)"

ROOT = Path(__file__).resolve().parents[2]
CEPH_DEV = ROOT / "scripts" / "ceph-dev"
IMAGE = "bench"


class _Dmuserd(ServerProcess):
    name = "dmuserd"

    def __init__(self, workdir: Path, conf: str) -> None:
        super().__init__(workdir)
        self.conf = conf
        self.socket = workdir / "dmuserd.sock"
        self.control = workdir / "control.sock"

    def command(self):
        import sys

        return [sys.executable, "-m", "dmuserd", "serve", "--name", "disk",
                "--backend", f"rbd:pool=rbd,image={IMAGE},conf={self.conf}",
                "--export", f"nbd:{self.socket},on-stop=stop", "--control-socket", str(self.control)]

    def ready(self):
        return self.control.exists()

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.socket}"


class _DmuserdMemory(_Dmuserd):
    """dmuserd's NBD export of the ``memory`` backend: the NBD path's own ceiling here, no cluster."""

    name = "dmuserd_memory"

    def command(self):
        command = super().command()
        command[command.index("--backend") + 1] = "memory:size=1G"
        return command


class _QemuNbd(ServerProcess):
    name = "qemu_nbd_rbd"

    def __init__(self, workdir: Path, conf: str) -> None:
        super().__init__(workdir)
        self.conf = conf
        self.socket = workdir / "qemu.sock"

    def command(self):
        return ["qemu-nbd", "-f", "raw", "--persistent", "--shared=8", f"--socket={self.socket}",
                f"rbd:rbd/{IMAGE}:conf={self.conf}"]

    def ready(self):
        return self.socket.exists()

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.socket}"


def _sample(job: dict) -> dict:
    read = job["read"]
    return {"iops": round(read["iops"]), "mb_s": round(read["bw_bytes"] / 1e6)}


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


def measure(workdir: Path, conf: str, size_mb: int, timing: list[str],
            servers=(_Dmuserd, _QemuNbd, _DmuserdMemory)) -> dict:
    """One round of both jobs on each server and on fio's rbd engine: ``{name: [{"iops", "mb_s"}]}``.

    The image ``rbd/bench`` of ``size_mb`` MiB must exist, written, on the cluster of ``conf``.
    """
    size = [f"--size={size_mb}M"]
    samples: dict[str, list[dict]] = {}
    for server_cls in servers:
        server = server_cls(workdir, conf)
        server.launch(timeout=60)
        try:
            runs = {job: run_fio(f"{server.name}-{job}", ["--ioengine=nbd", f"--uri={server.uri}", *size],
                                 READ_JOBS[job] + timing) for job in ("randread", "seqread")}
        finally:
            server.terminate(30)
        samples[server.name] = [{"iops": _sample(runs["randread"])["iops"], "mb_s": _sample(runs["seqread"])["mb_s"]}]
    direct = ["--ioengine=rbd", "--clientname=admin", "--pool=rbd", f"--rbdname={IMAGE}", *size]
    os.environ["CEPH_CONF"] = conf  # fio's rbd engine finds the cluster through it
    try:
        rr = run_fio("fio_rbd-randread", direct, READ_JOBS["randread"] + timing)
        sr = run_fio("fio_rbd-seqread", direct, READ_JOBS["seqread"] + timing)
    finally:
        os.environ.pop("CEPH_CONF", None)
    samples["fio_rbd_engine"] = [{"iops": _sample(rr)["iops"], "mb_s": _sample(sr)["mb_s"]}]
    return samples


def run(quick: bool) -> dict:
    if quick:  # the cluster's start alone (about 20 s) would take a third of the quick set's minute
        raise Skip("full run only: it starts a Ceph cluster (about 20 s) and measures for about a minute")
    _check_tools()
    size_mb = 256 if quick else 1024
    runtime = "3" if quick else "10"
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
        result = compare_rates(measure(workdir, conf, size_mb, timing), ours="dmuserd")
        result["targets"] = {"iops_vs_qemu_nbd_rbd": 2.0, "throughput_vs_qemu_nbd_rbd": 2.0,
                             "iops_vs_fio_rbd_engine": 0.5, "throughput_vs_fio_rbd_engine": 0.5}
        result["notes"] = (f"{size_mb} MiB image on a memstore OSD (scripts/ceph-dev), fio {runtime} s per job, "
                           f"randread 4k QD32, read 1M QD4; cluster and clients share {os.cpu_count()} CPUs")
        return result
    finally:
        run_command([str(CEPH_DEV), "stop", str(cluster)], timeout=120)
        shutil.rmtree(workdir, ignore_errors=True)
