"""Shared parts of the dm-user VM tests: the VM runner, the case layout, data patterns.

Standard library only: the guest driver (:mod:`dmuser_guest`) imports it
inside the VM, where every import costs ~8x.

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

PATTERN_OFF, PATTERN_LEN, PATTERN_SEED = 1 * MiB, 1 * MiB, 1
DSYNC_OFF, DSYNC_LEN, DSYNC_SEED = 8 * MiB, 64 * 1024, 2
FAIL_OFF = 250 * MiB  # reads here fail in the backend (past what mkfs/e2fsck read)
STALL_OFF = 251 * MiB  # reads here stall in the backend until the daemon dies
EARLY_LEN, EARLY_SEED = 64 * 1024, 7  # T2: read at 0, prefilled in its backing file
PROBE_LEN = 4096

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
)


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


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
