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

from pathlib import Path

import pytest

from test_systemd_vm import _assert_all, run_in_systemd_vm

SCRIPT = Path(__file__).with_name("nbd_systemd_vm_check.sh")
CHECKS = ["start", "scope", "restart", "same_nbdkit", "client_kept", "stop"]

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]


def test_nbd_unit_restart_keeps_nbdkit_and_clients():
    _assert_all(run_in_systemd_vm(SCRIPT, timeout=900), CHECKS)
