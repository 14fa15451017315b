"""``cow merge`` throughput and memory: MB/s of changed bytes, peak RSS.

A 1 GiB base (quick: 256 MiB) of random blocks and a COW file changing
about a quarter of its blocks with every kind of op, written with the
public :class:`dmuserd.snapshot.cow.CowWriter` (v2, uncompressed): Xor runs
(a few bytes differ; some read the base at an unaligned offset, so each op
reads the block the next op overwrites), Copy chains (data moved down by a
few blocks: each op reads a block a later op of the chain overwrites, so
windows go through the scratch area), scattered single-block Copies, and
Replace and Zero runs. The ordered ops are listed as sequence data in a
safe order; the target image is computed alongside, straight from the base.

Measured in one run, all files in one temporary directory under
``/var/tmp`` (so on one filesystem), everything ``sync``-ed before each
timing so that no earlier writeback is billed to it:

* ``dmuserd cow merge --base base.img t.cow`` as a fresh child process,
  with its defaults (offload ``auto``, read-back verification on): wall
  time including interpreter start and every sync, and the child's peak
  RSS from ``os.wait4`` in a small wrapper process (its own, not the
  maximum over every child this process ever had, which ``RUSAGE_CHILDREN``
  would give, nor this process's RSS, which Linux carries across the
  child's ``execve``).
* The anchor: ``dd bs=1M conv=notrunc,fsync`` writing a file holding the
  same number of changed bytes (the new blocks, page-cached) sequentially
  into a copy of the base: the raw copy rate of those bytes on this
  filesystem. It runs before and after the merge; the faster of the two is
  the anchor, so noise from the shared machine does not flatter the ratio.

The merged base's SHA-256 must equal the target's, or the scenario fails:
a benchmark of a wrong merge is worthless. Targets (issue #7): merge ≥ 0.5
of the dd rate, and peak RSS under 256 MiB whatever the image size
(reported as ``rss_limit_vs_peak_rss`` = 256 MiB / peak RSS, target ≥ 1,
since ``bench/run.py`` checks every ratio as a lower bound).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

TITLE = "cow merge: MB/s of changed bytes vs dd of the same bytes, peak RSS (1 GiB mixed ops; quick: 256 MiB)"

BS = 4096
CHUNK = 1 << 20
RSS_LIMIT_MIB = 256
TARGETS = {"merge_vs_dd": 0.5, "rss_limit_vs_peak_rss": 1.0}
#: blocks changed per kind, as a fraction of the image's blocks (about 25 % in all)
QUOTAS = {"xor": 0.04, "chain": 0.08, "copy": 0.05, "replace": 0.06, "zero": 0.02}


def _make_base(path: str, size: int, rng: random.Random) -> None:
    with open(path, "wb") as f:
        for _ in range(size // CHUNK):
            f.write(rng.randbytes(CHUNK))


def _plan_ops(nblocks: int, rng: random.Random) -> tuple[list[tuple], list[tuple]]:
    """The ordered ops (merge order) and the Replace/Zero runs.

    Ordered: ``("xor", new, src_offset)`` / ``("copy", new, src_block)``,
    each kept only if it reads no block an earlier ordered op writes (the
    rule ``plan_merge`` enforces). Unordered: ``("replace"|"zero", start, n)``
    over blocks no ordered op writes, sorted by block.
    """
    taken = bytearray(nblocks)  # the block is some op's new block
    written = bytearray(nblocks)  # an ordered op so far writes it
    ordered: list[tuple] = []

    def add(kind: str, new: int, reads: tuple[int, ...], source: int) -> bool:
        if taken[new] or any(written[b] for b in reads):
            return False
        taken[new] = written[new] = 1
        ordered.append((kind, new, source))
        return True

    def fill(quota: float, make_run) -> None:
        goal, done = int(nblocks * quota), 0
        while done < goal:
            done += make_run(goal - done)

    def xor_run(left: int) -> int:
        n = min(rng.randrange(1, 33), left)
        x = rng.randrange(nblocks - n - 1)
        shift = 0 if rng.random() < 0.5 else rng.randrange(1, BS)  # unaligned: reads x+i and x+i+1
        done = 0
        for i in range(n):
            src = (x + i) * BS + shift
            done += add("xor", x + i, (src // BS, (src + BS - 1) // BS), src)
        return max(done, 1)

    def chain(left: int) -> int:
        n = min(rng.randrange(8, 257), left)
        k = rng.randrange(1, 65)
        s = rng.randrange(nblocks - n - k)
        return max(sum(add("copy", s + i, (s + i + k,), s + i + k) for i in range(n)), 1)

    def scattered(left: int) -> int:
        src = rng.randrange(nblocks)
        add("copy", rng.randrange(nblocks), (src,), src)
        return 1

    fill(QUOTAS["xor"], xor_run)
    fill(QUOTAS["chain"], chain)
    fill(QUOTAS["copy"], scattered)

    unordered: list[tuple] = []
    for kind in ("replace", "zero"):
        goal, done = int(nblocks * QUOTAS[kind]), 0
        while done < goal:
            start = rng.randrange(nblocks)
            n = min(rng.randrange(1, 65), nblocks - start, goal - done)
            run = 0
            for b in range(start, start + n + 1):
                if b < start + n and not taken[b]:
                    taken[b] = 1
                    run += 1
                    continue
                if run:
                    unordered.append((kind, b - run, run))
                    done += run
                    run = 0
    unordered.sort(key=lambda op: op[1])
    return ordered, unordered


def _make_cow(tmp: str, size: int, seed: int) -> dict:
    """Write ``base.img``, ``target.img``, ``t.cow`` and ``changes.bin`` (the new blocks, op by op)."""
    from dmuserd.snapshot.cow import CowWriter, xor_bytes

    rng = random.Random(seed)
    paths = {name: os.path.join(tmp, name) for name in ("base.img", "target.img", "t.cow", "changes.bin")}
    _make_base(paths["base.img"], size, rng)
    shutil.copyfile(paths["base.img"], paths["target.img"])
    ordered, unordered = _plan_ops(size // BS, rng)
    counts = {"copy": 0, "xor": 0, "replace": 0, "zero": 0}
    with open(paths["base.img"], "rb") as base, open(paths["target.img"], "r+b") as target, \
            open(paths["changes.bin"], "wb") as changes, CowWriter(paths["t.cow"]) as w:
        bfd, tfd = base.fileno(), target.fileno()
        w.add_sequence_data(op[1] for op in ordered)
        for kind, new, source in ordered:
            if kind == "copy":
                data = os.pread(bfd, BS, source * BS)
                w.add_copy(new, source)
            else:
                old = os.pread(bfd, BS, source)
                data = bytearray(old)
                i = rng.randrange(BS - 64)
                data[i : i + 64] = rng.randbytes(64)
                data = bytes(data)
                w.add_xor(new, xor_bytes(data, old), source)
            os.pwrite(tfd, data, new * BS)
            changes.write(data)
            counts[kind] += 1
        for kind, start, n in unordered:
            if kind == "zero":
                data = bytes(n * BS)
                w.add_zero(start, n)
            else:
                data = rng.randbytes(n * BS) if rng.random() < 0.5 else bytes([rng.randrange(1, 256)]) * (n * BS)
                w.add_replace(start, data)
            os.pwrite(tfd, data, start * BS)
            changes.write(data)
            counts[kind] += n
        w.finalize()
    return {"paths": paths, "counts": counts, "blocks": sum(counts.values())}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _child(args: list[str], tmp: str) -> tuple[float, float, str]:
    """Run ``args`` as a fresh child: (wall seconds, its peak RSS in MiB, its stdout)."""
    out_path = os.path.join(tmp, "child.out")
    rss_path = os.path.join(tmp, "child.rss")
    with open(out_path, "w+") as out:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _RSS_WRAPPER, rss_path, *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        proc.wait()
        seconds = time.perf_counter() - started
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}: {text[-2000:]}")
    with open(rss_path) as f:
        return seconds, int(f.read()) / 1024, text.strip()


# Linux keeps a process's peak RSS across execve, so a child forked from this
# (large) benchmark process starts with our RSS as its peak. A small wrapper
# process forks the real child instead and reports that child's own peak.
_RSS_WRAPPER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(quick: bool) -> dict:
    from bench.run import Skip

    if shutil.which("dd") is None:
        raise Skip("dd is not installed")
    size = (256 if quick else 1024) << 20
    merge_cmd = [sys.executable, "-m", "dmuserd", "cow", "merge"]
    with tempfile.TemporaryDirectory(prefix="dmuserd-bench-merge-", dir="/var/tmp") as tmp:
        made = _make_cow(tmp, size, seed=7)
        p = made["paths"]
        changed = made["blocks"] * BS
        assert os.path.getsize(p["changes.bin"]) == changed
        target_sha = _sha256(p["target.img"])
        anchor_img = os.path.join(tmp, "anchor.img")
        shutil.copyfile(p["base.img"], anchor_img)
        dd = ["dd", f"if={p['changes.bin']}", f"of={anchor_img}", "bs=1M", "conv=notrunc,fsync", "status=none"]

        os.sync()
        dd_before, _, _ = _child(dd, tmp)
        os.sync()
        merge_seconds, merge_rss, merge_out = _child([*merge_cmd, "--base", p["base.img"], p["t.cow"]], tmp)
        os.sync()
        dd_after, _, _ = _child(dd, tmp)
        # the fixed cost in the merge's time: interpreter start, imports, opening the files
        startup, _, _ = _child([*merge_cmd, "--base", p["base.img"], p["t.cow"]], tmp)

        merged_sha = _sha256(p["base.img"])
        if merged_sha != target_sha:
            raise RuntimeError(
                f"the merged base's SHA-256 {merged_sha} is not the target's {target_sha}: the merge is wrong"
            )
        cow_bytes = os.path.getsize(p["t.cow"])
    said = re.search(r"merged (\d+) ops \((\d+) blocks\)", merge_out)
    if said is None or int(said[2]) != made["blocks"]:
        raise RuntimeError(f"the merge did not report merging {made['blocks']} blocks: {merge_out[-500:]!r}")

    dd_seconds = min(dd_before, dd_after)
    mb = changed / 1e6
    figures = {
        "merge_mbps": round(mb / merge_seconds, 1),
        "merge_seconds": round(merge_seconds, 2),
        "merge_peak_rss_mib": round(merge_rss, 1),
        "merge_startup_seconds": round(startup, 2),
    }
    anchors = {"dd_fsync_mbps": round(mb / dd_seconds, 1), "dd_fsync_seconds": round(dd_seconds, 2)}
    c = made["counts"]
    return {
        "figures": figures,
        "anchors": anchors,
        "ratios": {
            "merge_vs_dd": round(dd_seconds / merge_seconds, 3),
            "rss_limit_vs_peak_rss": round(RSS_LIMIT_MIB / merge_rss, 3),
        },
        "targets": TARGETS,
        "units": {
            "merge_mbps": "MB/s of changed bytes", "merge_seconds": "s", "merge_peak_rss_mib": "MiB",
            "merge_startup_seconds": "s", "dd_fsync_mbps": "MB/s", "dd_fsync_seconds": "s",
        },
        "notes": (
            f"{size >> 20} MiB base in /var/tmp; "
            f"{changed / (1 << 20):.0f} MiB changed ({made['blocks']} blocks): {c['copy']} copy, {c['xor']} xor, "
            f"{c['replace']} replace, {c['zero']} zero; v2 uncompressed COW of {cow_bytes >> 20} MiB; "
            f"merge said: {said[0]}; "
            f"dd runs {dd_before:.2f} s before and {dd_after:.2f} s after the merge (anchor: the faster); "
            f"merge time includes {startup:.2f} s of interpreter start and imports (a rerun on the merged file); "
            f"RSS limit {RSS_LIMIT_MIB} MiB; merged base SHA-256 equals the target's"
        ),
    }
