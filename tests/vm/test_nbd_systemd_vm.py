"""``systemctl restart`` of dmuserd-nbd@.service under a real systemd keeps nbdkit and its clients.

``tests/vm/nbd_systemd_vm_check.sh`` runs inside ``run-in-vm --systemd``:
it starts the locked-down NBD unit (no capabilities, private network and
mounts), checks that nbdkit runs in a scope of its own (``systemd-run
--scope``, so ``KillMode=mixed`` stopping the unit's cgroup does not reach
it), keeps a qemu-io client connected across ``systemctl restart`` and
checks that client's writes and reads after it. A few minutes under TCG:
slow.
"""

from __future__ import annotations

import pytest

from test_systemd_vm import REPO, RUN_IN_VM, _assert_all  # noqa: F401 - the same VM runner

import os
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("nbd_systemd_vm_check.sh")
CHECKS = ["start", "scope", "restart", "same_nbdkit", "client_kept", "stop"]

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]


def test_nbd_unit_restart_keeps_nbdkit_and_clients():
    if os.geteuid() != 0:
        pytest.skip("needs root (run-in-vm, qemu)")
    if not RUN_IN_VM.exists():
        pytest.skip(f"{RUN_IN_VM} is missing (the shared test kernel)")
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed")
    if os.path.exists("/run/vmjob"):
        pytest.skip("already inside run-in-vm: no nested VM")
    env = dict(os.environ, RUN_IN_VM_QUIET_ACCEL="1", DMUSERD=str(Path(sys.executable).parent / "dmuserd"))
    result = subprocess.run(
        [str(RUN_IN_VM), "--systemd", "--timeout", "900", "--", "bash", str(SCRIPT)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=960,
    )
    assert result.returncode == 0, f"run-in-vm exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    _assert_all(result.stdout, CHECKS)
