"""Online merge through the real daemon: ``dmuserd serve`` exporting a snapshot
target over FUSE, readers checking every block they read against the
target while ``dmuserd merge start|pause|resume|status`` drive the merge."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

from daemon_harness import DMUSERD, ServedDaemon, need_root_tools  # noqa: E402
from merge_testlib import sha256, torture_cow  # noqa: E402
from cow_helpers import BS  # noqa: E402
from dmuserd.daemon.control import request  # noqa: E402


def _cli(daemon: ServedDaemon, *args) -> subprocess.CompletedProcess:
    return subprocess.run(DMUSERD + ["merge", *args, "--control-socket", str(daemon.control)],
                          capture_output=True, text=True, timeout=120)


def _readers(path: Path, target: bytes, stop: threading.Event, stats: dict, n: int = 3) -> list[threading.Thread]:
    def read_loop(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(path, os.O_RDONLY)
        try:
            blocks = len(target) // BS
            while not stop.is_set():
                block = rng.randrange(blocks)
                count = min(rng.choice((1, 1, 4, 16, 64)), blocks - block)
                data = os.pread(fd, count * BS, block * BS)
                with stats["lock"]:
                    stats["reads"] += 1
                    if data != target[block * BS : (block + count) * BS]:
                        stats["mismatches"].append((block, count))
        except OSError as exc:
            stats["errors"].append(repr(exc))
        finally:
            os.close(fd)

    threads = [threading.Thread(target=read_loop, args=(seed,), daemon=True) for seed in range(n)]
    for thread in threads:
        thread.start()
    return threads


def _wait_reads(stats: dict, more: int) -> None:
    want = stats["reads"] + more
    deadline = time.monotonic() + 60
    while stats["reads"] < want and time.monotonic() < deadline and not stats["errors"]:
        time.sleep(0.01)
    assert stats["reads"] >= want, stats["errors"]


def test_online_merge_through_the_daemon(tmp_path):
    need_root_tools()
    t = torture_cow(tmp_path, 51, nblocks=8192, buffer_size=64 << 10)
    target = t["target_bytes"]
    daemon = ServedDaemon(tmp_path, f"snapshot:base={t['base']},cow={t['cow']},offload=cpu")
    stop = threading.Event()
    stats = {"reads": 0, "mismatches": [], "errors": [], "lock": threading.Lock()}
    threads: list[threading.Thread] = []
    try:
        assert daemon.status()["targets"]["disk"]["merge"]["state"] == "not-started"
        threads = _readers(daemon.path, target, stop, stats)
        _wait_reads(stats, 20)
        started = _cli(daemon, "start", "disk", "--json")
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["state"] in ("merging", "merged")
        pauses = 0
        while pauses < 3:
            answer = request(str(daemon.control), {"cmd": "merge", "action": "pause", "target": "disk"})
            if not answer["ok"]:  # finished before we could pause it again
                assert "merged" in answer["error"], answer
                break
            pauses += 1
            deadline = time.monotonic() + 60
            while not answer["parked"] and time.monotonic() < deadline:
                time.sleep(0.01)
                answer = request(str(daemon.control), {"cmd": "merge", "action": "status", "target": "disk"})
            assert answer["parked"] and answer["state"] == "paused", answer
            _wait_reads(stats, 30)  # served while parked
            status = _cli(daemon, "status", "disk", "--json")
            assert json.loads(status.stdout)["merged_ops"] == answer["merged_ops"]
            resumed = _cli(daemon, "resume", "disk")
            assert resumed.returncode == 0 and "merging" in resumed.stdout, resumed.stdout + resumed.stderr
            _wait_reads(stats, 10)
        assert pauses >= 1
        print("pauses", pauses, "reads", stats["reads"])
        done = _cli(daemon, "status", "disk", "--wait")
        assert done.returncode == 0, done.stderr
        assert "disk: merged, 100.0%" in done.stdout
        _wait_reads(stats, 30)  # reads after the switch to the base
        stop.set()
        for thread in threads:
            thread.join(30)
        assert stats["errors"] == [] and stats["mismatches"] == []
        assert stats["reads"] > 100
        merge = daemon.status()["targets"]["disk"]["merge"]
        assert merge["state"] == "merged" and merge["percent"] == 100.0 and merge["error"] is None
        again = _cli(daemon, "start", "disk")
        assert again.returncode == 1 and "already merged" in again.stderr
        missing = _cli(daemon, "status", "nope")
        assert missing.returncode == 1 and "no target 'nope'" in missing.stderr
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        daemon.cleanup()
    assert sha256(t["base"]) == t["target_sha"]


def test_daemon_killed_during_online_merge_resumes(tmp_path):
    """SIGKILL the daemon in the middle of an online merge (at a random
    progress, twice): each new daemon serves the target (every byte
    checked) before it resumes the merge, and the last one finishes it."""
    need_root_tools()
    t = torture_cow(tmp_path, 52, nblocks=16384, buffer_size=64 << 10)
    target = t["target_bytes"]
    rng = random.Random(52)
    backend = f"snapshot:base={t['base']},cow={t['cow']},offload=cpu"
    progress, kills = [], 0
    for round_ in range(6):
        workdir = tmp_path / f"run{round_}"
        workdir.mkdir()
        daemon = ServedDaemon(workdir, backend)
        try:
            with open(daemon.path, "rb", buffering=0) as f:
                assert f.read() == target  # the target, whatever the interrupted merge left in the base
            state = daemon.status()["targets"]["disk"]["merge"]
            progress.append(state["merged_ops"])
            if state["state"] == "merged":
                break
            ask = {"cmd": "merge", "action": "start", "target": "disk"}
            answer = request(str(daemon.control), ask)
            assert answer["ok"], answer
            if kills < 2:
                aim = state["percent"] + rng.uniform(5, 40)
                ask["action"] = "status"
                while answer["state"] == "merging" and answer["percent"] < aim:
                    time.sleep(0.002)
                    answer = request(str(daemon.control), ask)
                daemon.proc.kill()  # SIGKILL: no orderly stop
                daemon.proc.wait(30)
                kills += answer["state"] == "merging"
                # the dead daemon's FUSE mount stays until unmounted ("transport endpoint is not connected")
                subprocess.run(["umount", "-l", str(daemon.fuse_dir)], capture_output=True)
            else:
                done = _cli(daemon, "status", "disk", "--wait")
                assert "disk: merged, 100.0%" in done.stdout, done.stdout + done.stderr
        finally:
            daemon.cleanup()
    assert kills == 2
    assert progress[0] == 0 and progress == sorted(progress) and progress[-1] == t["total_ops"]
    assert sha256(t["base"]) == t["target_sha"]
