"""Torture: the offline merge SIGKILLed at random points, resumed every time.

Real merge processes (forked by ``merge_forkserver.py``, so each costs
milliseconds) merge torture COW files (Copy chains inside and across
scratch windows, Xor ops, Replace/Zero runs; v2 and v3 lz4 with multi-block
chunks) and are killed with SIGKILL at random instants: 80 kills
in the default run, 500 in the slow one, a part of them aimed at the start
of a run, inside the resume of the previous kill. Every merge that
completes must leave the base equal to the target (SHA-256).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from merge_testlib import merge_progress, sha256, torture_cow

HERE = Path(__file__).parent


class ForkServer:
    def __init__(self, workdir: Path) -> None:
        self.stderr = open(workdir / "forkserver.err", "w+")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "merge_forkserver.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1)

    def merge(self, base, cow, engine: str, marks: Path, kill_after: float | None) -> tuple[int, str]:
        marks.write_text("")
        self.proc.stdin.write(f"merge {base} {cow} {engine} {marks}\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().split()
        assert reply[0] == "pid", reply
        pid = int(reply[1])
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)  # alive or a zombie: the server has not reaped it yet
        self.proc.stdin.write("wait\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().split()
        assert reply[0] == "exit", reply
        return int(reply[1]), marks.read_text()

    def errors(self) -> str:
        self.stderr.flush()
        return Path(self.stderr.name).read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)
        self.stderr.close()


def _torture(tmp_path: Path, kills_wanted: int, seed: int, resume_kills: int, window_kills: int) -> dict:
    """Kill merges until ``kills_wanted`` kills, of which at least
    ``resume_kills`` inside a resume and ``window_kills`` leaving a durable
    scratch window (timing is noisy on a shared machine, so the loop runs
    on until both are seen, within a bound)."""
    cases = []
    for name, options, engine in (
        ("v2", dict(version=2, buffer_size=64 << 10), "auto"),
        ("v3", dict(version=3, compression="lz4", buffer_size=2 << 20, factor=4 << 12), "emulated"),
    ):
        d = tmp_path / name
        d.mkdir()
        t = torture_cow(d, seed + len(cases), nblocks=1024, **options)
        assert t["counts"]["copy"] and t["counts"]["xor"] and t["counts"]["replace"] and t["counts"]["zero"]
        cases.append((t, engine, d / "work.img", d / "work.cow"))
    server = ForkServer(tmp_path)
    rng = random.Random(seed)
    stats = {"kills": 0, "kills_in_resume": 0, "windows_left": 0, "completed": 0, "runs": 0}
    try:
        work, startup = {}, {}
        for t, engine, base, cow in cases * 2:
            # an uninterrupted merge, timed; then a run with nothing left: the start-up alone
            shutil.copy(t["base"], base)
            shutil.copy(t["cow"], cow)
            started = time.monotonic()
            code, _ = server.merge(base, cow, engine, tmp_path / "marks", None)
            full = time.monotonic() - started
            assert code == 0, server.errors()
            assert sha256(base) == t["target_sha"]
            started = time.monotonic()
            code, _ = server.merge(base, cow, engine, tmp_path / "marks", None)
            idle = time.monotonic() - started
            assert code == 0, server.errors()
            startup[engine] = min(startup.get(engine, 1e9), idle)
            work[engine] = min(work.get(engine, 1e9), max(full - idle, 0.005))
        case = 0
        t, engine, base, cow = cases[case]
        shutil.copy(t["base"], base)
        shutil.copy(t["cow"], cow)
        killed_last = False
        while (stats["kills"] < kills_wanted or stats["kills_in_resume"] < resume_kills
               or stats["windows_left"] < window_kills) and stats["runs"] < 20 * kills_wanted:
            merged_ops, state = merge_progress(cow)
            resuming = merged_ops > 0 or state == 2
            # aim within what is left of the merge, or (after a kill) at the resume itself
            left = 1.0 - merged_ops / t["total_ops"]
            if killed_last and rng.random() < 0.3:
                delay = startup[engine] * rng.uniform(0.5, 1.3)
            else:
                delay = startup[engine] * rng.uniform(0.8, 1.0) + rng.uniform(0, work[engine] * max(left, 0.05))
            code, marks = server.merge(base, cow, engine, tmp_path / "marks", delay)
            stats["runs"] += 1
            if code == -signal.SIGKILL:
                stats["kills"] += 1
                stats["kills_in_resume"] += resuming and marks == "S"
                stats["windows_left"] += merge_progress(cow)[1] == 2
                killed_last = True
                continue
            assert code == 0, f"merge exited with {code}: {server.errors()}"
            killed_last = False
            assert sha256(base) == t["target_sha"], f"{cow}: the merged base differs from the target"
            stats["completed"] += 1
            case = (case + 1) % len(cases)
            t, engine, base, cow = cases[case]
            shutil.copy(t["base"], base)
            shutil.copy(t["cow"], cow)
        # finish the last one
        code, _ = server.merge(base, cow, engine, tmp_path / "marks", None)
        assert code == 0, server.errors()
        assert sha256(base) == t["target_sha"]
        stats["completed"] += 1
    finally:
        server.close()
    return stats


def test_merge_survives_sigkill(tmp_path):
    stats = _torture(tmp_path, 80, seed=100, resume_kills=3, window_kills=3)
    print(stats)
    assert stats["kills"] >= 80
    assert stats["kills_in_resume"] >= 3, stats  # killed again before the resume had recovered
    assert stats["windows_left"] >= 3, stats  # killed while a durable scratch window was live
    assert stats["completed"] >= 2, stats


@pytest.mark.slow
def test_merge_survives_sigkill_slow(tmp_path):
    stats = _torture(tmp_path, 500, seed=200, resume_kills=10, window_kills=10)
    print(stats)
    assert stats["kills"] >= 500
    assert stats["kills_in_resume"] >= 10, stats
    assert stats["windows_left"] >= 10, stats
    assert stats["completed"] >= 5, stats
