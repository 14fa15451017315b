"""Shared parts of the dm-user VM tests: the VM runner, the case layout, data patterns.

Standard library only at import: the guest drivers (:mod:`dmuser_guest`,
:mod:`dmuser_edge_guest`) import it inside the VM, where every import costs
~8x; what runs on the host only (:func:`make_snapshot`, :func:`run_guest`)
imports the rest when called.

The *cases* are the dm-user behaviours checked both on the real kernel (in
the VM) and on the in-process model (:class:`~dmuserd.daemon.emulated.EmulatedDmUser`
over :class:`~dmuserd.protocol.KernelTarget`); each yields an outcome
``{"result": "ok" | errno name, "sha": hex digest of the data read}`` and the
differential test compares the two.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KERNEL_DIR = Path(os.environ.get("DMUSERD_VM_KERNEL_DIR", REPO.parent / "shared" / "kernel"))
RUN_IN_VM = KERNEL_DIR / "run-in-vm"

MiB = 1 << 20
T1_SIZE = 256 * MiB  # the main target (file backend with stall/fail ranges)
T2_SIZE = 4 * MiB  # I/O queued before its daemon attaches
T3_SIZE = 4 * MiB  # never served: I/O times out
#: Served by the guest itself, byte by byte (no daemon): what the kernel does
#: with many outstanding messages (T5), with each message's timer (T6, T7),
#: with swap-out BIOs (T8, a swap device).
RAW_TABLES = {"t5": 4 * MiB, "t6": 4 * MiB, "t7": 4 * MiB, "t8": 64 * MiB}

PATTERN_OFF, PATTERN_LEN, PATTERN_SEED = 1 * MiB, 1 * MiB, 1
DSYNC_OFF, DSYNC_LEN, DSYNC_SEED = 8 * MiB, 64 * 1024, 2
FAIL_OFF = 250 * MiB  # reads here fail in the backend (past what mkfs/e2fsck read)
STALL_OFF = 251 * MiB  # reads here stall in the backend until the daemon dies
EARLY_LEN, EARLY_SEED = 64 * 1024, 7  # T2: read at 0, prefilled in its backing file
PROBE_LEN = 4096
#: More reads in flight at once than dm-user.c's message reserve (128).
BEYOND_RESERVE = 200
#: T6: the second read is queued this long after the first (both wait for a daemon).
SECOND_AFTER = 0.5
#: T7: a channel opens this long after the read was queued, stays open past its
#: deadline, and closes; then the read is checked again this long after.
OPEN_AFTER, HOLD_OPEN, CHECK_AFTER = 0.3, 1.5, 1.5
RAW_SEED = 21
#: T8: a process limited to SWAP_LIMIT of memory (a cgroup) touches SWAP_HOG bytes.
SWAP_LIMIT, SWAP_HOG = 16 * MiB, 48 * MiB

#: The daemon-attach timeout while the VM tests run (a Python daemon needs a
#: few seconds to start under TCG), and the short one of the timeout case.
LONG_TIMEOUT_MS = 90000
SHORT_TIMEOUT_MS = 1000

#: The cases of the differential test, in the order they run.
CASES = (
    "pattern_rw",  # write a pattern (direct I/O), read it back
    "dsync_durable",  # an O_DSYNC write is in the backing file when it returns
    "failing_read",  # the backend fails a read: EIO
    "killed_in_flight",  # the daemon dies while it holds a read: EIO
    "after_kill_new_io",  # no daemon (it died): new I/O fails
    "no_daemon_timeout",  # no daemon ever: I/O fails after the timeout
    "before_attach",  # I/O queued before the daemon attached completes
    "restart_read",  # a new daemon serves the data the old one wrote
    "after_stop",  # the daemon stopped: new I/O fails
    "beyond_reserve",  # 200 reads outstanding at once: all reach the daemon before one is answered
    "timer_per_message",  # no daemon: each read fails at its own deadline, counted from its mapping
    "spent_timer_not_rearmed",  # a read whose timer fired while a channel was open survives its closing
    "swap_write_killed",  # a swap-out BIO (REQ_SWAP) is killed by the kernel, never a message
)


class Steps:
    """A guest driver's bookkeeping: each step timed, its failure recorded, ``results.json`` saved after it.

    Mixed into the guests (:mod:`dmuser_guest`, :mod:`dmuser_edge_guest`,
    :mod:`snapuserd_guest`), which set ``self.work`` and ``self.results``.
    """

    work: str
    results: dict

    def save(self) -> None:
        import json

        tmp = os.path.join(self.work, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1)
        os.replace(tmp, os.path.join(self.work, "results.json"))

    def step(self, name: str, function) -> None:
        import time
        import traceback

        start = time.monotonic()
        try:
            function()
        except Exception:  # noqa: BLE001 - record and go on: later steps may still say something
            self.results.setdefault("errors", {})[name] = traceback.format_exc()
        self.results["steps"].append([name, round(time.monotonic() - start, 2)])
        self.save()


def direct_io(device: str, offset: int, length: int, data: bytes | None = None, *, dsync: bool = False,
              head: bool = False) -> dict:
    """One O_DIRECT read (or write of ``data``) → ``{"result": "ok"|errno name, "sha": ...}`` (and the
    first 16 bytes in hex as ``head`` when asked). Reads open the device read-only."""
    import errno
    import mmap

    flags = (os.O_RDWR if data is not None else os.O_RDONLY) | os.O_DIRECT | (os.O_DSYNC if dsync else 0)
    buf = mmap.mmap(-1, length)
    try:
        fd = os.open(device, flags)
    except OSError as exc:
        return {"result": errno.errorcode.get(exc.errno, str(exc.errno))}
    try:
        if data is not None:
            buf[:] = data
            done = os.pwritev(fd, [buf], offset)
            return {"result": "ok" if done == length else f"short:{done}"}
        done = os.preadv(fd, [buf], offset)
        if done != length:
            return {"result": f"short:{done}"}
        return {"result": "ok", "sha": sha(buf[:length]), **({"head": buf[:16].hex()} if head else {})}
    except OSError as exc:
        return {"result": errno.errorcode.get(exc.errno, str(exc.errno))}
    finally:
        os.close(fd)


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


SNAP_SIZE = 4 * MiB


def make_snapshot(work: Path) -> dict:
    """base.img, target.img and a COW turning one into the other (copies, replaces, zeros), made on the host."""
    from dmuserd.snapshot._cow_tools import create_cow

    base = bytearray(pattern(40, SNAP_SIZE))
    target = bytearray(base)
    bs = 4096
    for block in range(0, SNAP_SIZE // bs, 7):  # replaced blocks
        target[block * bs : (block + 1) * bs] = pattern(1000 + block, bs)
    for block in range(3, 200, 11):  # copies of other base blocks
        src = (block * 37) % (SNAP_SIZE // bs)
        target[block * bs : (block + 1) * bs] = base[src * bs : (src + 1) * bs]
    target[500 * bs : 520 * bs] = bytes(20 * bs)  # zeros
    (work / "base.img").write_bytes(base)
    (work / "target.img").write_bytes(target)
    create_cow(work / "base.img", work / "target.img", work / "snap.cow", version=2, progress=False)
    return {"base": str(work / "base.img"), "cow": str(work / "snap.cow"), "size": SNAP_SIZE,
            "target_sha": sha(target), "base_sha": sha(base)}


def vm_skip_reason() -> str | None:
    """Why the VM tests cannot run here, or None."""
    if not (KERNEL_DIR / "bzImage").exists():
        return f"no dm-user kernel image at {KERNEL_DIR / 'bzImage'}"
    if not os.access(RUN_IN_VM, os.X_OK):
        return f"no run-in-vm script at {RUN_IN_VM}"
    if not shutil.which(os.environ.get("RUN_IN_VM_QEMU", "qemu-system-x86_64")):
        return "qemu-system-x86_64 is not installed"
    return None


def run_vm(argv: list[str], *, shares: list[Path], timeout: int) -> subprocess.CompletedProcess:
    """Run ``argv`` in the VM from the repository root, with ``shares`` read-write."""
    cmd = [str(RUN_IN_VM), "--timeout", str(timeout)]
    for share in shares:
        cmd += ["--share", str(share)]
    env = dict(os.environ, RUN_IN_VM_QUIET_ACCEL="1", PYTHONPATH=str(REPO / "tests" / "vm"))
    return subprocess.run(cmd + ["--", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout + 60)


def run_guest(script: str, work: Path, plan: dict, timeout: int) -> dict:
    """Run the guest driver ``tests/vm/<script>`` on ``work/plan.json`` in the VM; its results (host side)."""
    import json
    import sys

    import pytest

    reason = vm_skip_reason()
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("needs root (run-in-vm shares the root file system)")
    (work / "plan.json").write_text(json.dumps(plan))
    proc = run_vm([sys.executable, f"tests/vm/{script}", str(work)], shares=[work], timeout=timeout)
    results_path = work / "results.json"
    assert results_path.exists(), (f"the guest wrote no results (rc {proc.returncode}):\n"
                                   f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    results = json.loads(results_path.read_text())
    results["vm"] = {"rc": proc.returncode, "stderr": proc.stderr[-4000:]}
    results["logs"] = {p.name: p.read_text()[-4000:] for p in work.glob("d*.log")}
    return results
