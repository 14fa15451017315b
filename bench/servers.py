"""What the server-against-anchors scenarios share: commands and server processes.

A scenario subclasses :class:`ServerProcess` once per server it measures
(dmuserd and each anchor), saying how to start it (:meth:`command`) and how
to tell it is serving (:meth:`ready`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


#: The two read jobs of the FUSE and NBD scenarios, the same for every server
#: (4 KiB random reads at queue depth 32 → IOPS, 1 MiB sequential → MB/s).
READ_JOBS = {
    "randread": ["--rw=randread", "--bs=4k", "--iodepth=32", "--norandommap", "--randrepeat=0"],
    "seqread": ["--rw=read", "--bs=1M", "--iodepth=4"],
}


def run_command(args: list[str], *, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run a tool to completion, capturing its output; never raises on its exit code."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def log_tail(path: Path, lines: int = 15) -> str:
    """The end of a server's log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ServerProcess:
    """A server started in its own session, its output in ``WORKDIR/NAME.log``."""

    name = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def launch(self, timeout: float) -> None:
        """Start the server and wait until :meth:`ready`; raise with its log's tail if it is not."""
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd="/", start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before it was ready: "
                                   f"{log_tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready within {timeout} s: {log_tail(self.log)}")
            time.sleep(0.05)

    def terminate(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL if it is still there after ``timeout``."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, all threads (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_fio(name: str, target: list[str], args: list[str]) -> dict:
    """Run one fio job (``target``: its engine and file or URI options); return fio's job report."""
    result = run_command(["fio", f"--name={name}", *target, "--output-format=json", *args], timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"fio {name} failed ({result.returncode}): {result.stderr.strip() or result.stdout[-500:]}")
    text = result.stdout
    job = json.loads(text[text.index("{"):])["jobs"][0]  # fio may print warnings before the JSON
    if job.get("error"):
        raise RuntimeError(f"fio {name}: error {job['error']}")
    return job


def served_requests(status: dict, target: str = "disk") -> int:
    """The requests ``target`` served, from ``dmuserd status --json``.

    Raises if it counted errors or unsupported requests: a benchmark of a
    device that failed requests measures nothing worth reporting.
    """
    counters = status["targets"][target]
    if counters["errors"] or counters["unsupported"]:
        raise RuntimeError(f"dmuserd counted {counters['errors']} errors, {counters['unsupported']} unsupported")
    return counters["total_requests"]


def compare_rates(samples: dict[str, list[dict]], ours: str = "dmuserd") -> dict:
    """Figures, anchors, ratios and units of a 4 KiB IOPS + 1 MiB MB/s scenario.

    ``samples`` maps each server to its rounds (``{"iops": ..., "mb_s": ...}``);
    each server's best round counts, since interference on a shared machine
    only ever lowers a figure. Ratios are ``ours`` over each other server.
    """
    best = {name: {"iops": max(s["iops"] for s in runs), "mb_s": max(s["mb_s"] for s in runs)}
            for name, runs in samples.items()}
    figures = {f"{ours}_4k_randread_iops": best[ours]["iops"], f"{ours}_1m_seqread_mb_s": best[ours]["mb_s"]}
    anchors, ratios = {}, {}
    for name, figure in best.items():
        if name == ours:
            continue
        anchors[f"{name}_4k_randread_iops"] = figure["iops"]
        anchors[f"{name}_1m_seqread_mb_s"] = figure["mb_s"]
        if figure["iops"]:
            ratios[f"iops_vs_{name}"] = round(best[ours]["iops"] / figure["iops"], 3)
        if figure["mb_s"]:
            ratios[f"throughput_vs_{name}"] = round(best[ours]["mb_s"] / figure["mb_s"], 3)
    units = {key: "IOPS" if key.endswith("_iops") else "MB/s" for key in (*figures, *anchors)}
    return {"figures": figures, "anchors": anchors, "ratios": ratios, "units": units}
