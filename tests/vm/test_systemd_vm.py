"""dmuserd's units under a real systemd (PID 1 in a VM): one boot per test.

``tests/vm/systemd_vm_check.sh`` runs inside ``run-in-vm --systemd``: it
installs the units with ``dmuserd install-units``, starts
``dmuserd@test.service`` for real and prints one ``CHECK`` line per fact;
this test asserts every one of them, and checks the unit's journal here on
the host (structured JSON lines, priorities matching levels).

Default run (~1.5-3 min under TCG on a loaded host): readiness, I/O through
the FUSE file and a loop device, the watchdog keeping the service alive,
SIGHUP, SIGKILL → restart (with the dead mount reclaimed and data kept),
a clean ``systemctl stop``, journald; then a second instance serving
``--export ublk`` (the block device exists when ``systemctl start``
returns, I/O through it, the stop deletes it). The slow variant adds a stuck process
killed by the watchdog, socket activation of the control socket and the
locked-down NBD-only unit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_IN_VM = Path(os.environ.get("DMUSERD_RUN_IN_VM", REPO.parent / "shared" / "kernel" / "run-in-vm"))
SCRIPT = Path(__file__).with_name("systemd_vm_check.sh")

BASIC_CHECKS = [
    "install", "verify", "start", "ready_file", "active", "host_mount_ns", "status_text",
    "write", "read", "loop_read", "watchdog_alive", "sighup", "restart_after_kill", "new_pid",
    "data_kept", "stale_loop_gone", "stop", "stop_result", "unmounted", "loop_detached",
    "ublk_start", "ublk_ready_device", "ublk_io", "ublk_stop",
]
FULL_CHECKS = BASIC_CHECKS + ["watchdog_kill", "watchdog_logged", "sock_start", "sock_service", "sock_status",
                              "sock_kept", "nbd_start", "nbd_io", "nbd_private_mount_ns", "nbd_stop"]
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}

pytestmark = [pytest.mark.vm, pytest.mark.root]


def run_in_systemd_vm(script: Path, *args: str, timeout: int) -> str:
    """Run ``bash script args`` under ``run-in-vm --systemd``; its output (skips where no VM can run)."""
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
        [str(RUN_IN_VM), "--systemd", "--timeout", str(timeout), "--", "bash", str(script), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout + 60,
    )
    assert result.returncode == 0, f"run-in-vm exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _checks(output: str) -> dict[str, str]:
    checks = {}
    for line in output.splitlines():
        if line.startswith("CHECK "):
            _, name, verdict, *detail = line.split(" ", 3)
            checks[name] = verdict + " " + " ".join(detail)
    return checks


def _journal(output: str) -> list[tuple[int, dict]]:
    """(priority, event) of every dmuserd line the unit's journal holds."""
    text = output.split("=== JOURNAL JSON BEGIN\n", 1)[1].split("=== JOURNAL JSON END", 1)[0]
    events = []
    for line in text.splitlines():
        entry = json.loads(line)
        if entry.get("SYSLOG_IDENTIFIER") != "dmuserd-test":
            continue
        message = entry["MESSAGE"]
        if isinstance(message, list):  # journald's form for non-UTF-8 fields
            message = bytes(message).decode(errors="replace")
        assert not message.startswith("<"), f"the <N> priority prefix reached the journal: {message}"
        events.append((int(entry["PRIORITY"]), json.loads(message)))
    return events


def _assert_all(output: str, expected: list[str]) -> None:
    checks = _checks(output)
    failed = {name: checks.get(name, "MISSING") for name in expected if not checks.get(name, "").startswith("PASS")}
    assert not failed, f"checks failed in the VM: {json.dumps(failed, indent=1)}\n--- output:\n{output}"


def _assert_journal(output: str) -> None:
    events = _journal(output)
    assert events, f"no dmuserd lines in the journal\n{output}"
    for priority, event in events:
        assert priority == PRIORITY[event["level"]], f"{event} filed at priority {priority}"
    by_level: dict[str, list[str]] = {}
    for _, event in events:
        by_level.setdefault(event["level"], []).append(event["event"])
    assert by_level["info"].count("ready") >= 2, by_level  # first start and the restart
    assert any("SIGHUP" in e for e in by_level.get("warning", [])), by_level
    assert any("dead FUSE mount" in e for e in by_level.get("warning", [])), by_level
    assert "stopped" in by_level["info"], by_level


def test_systemd_units_in_vm():
    output = run_in_systemd_vm(SCRIPT, "basic", timeout=600)
    _assert_all(output, BASIC_CHECKS)
    _assert_journal(output)


@pytest.mark.slow
def test_systemd_units_in_vm_full():
    output = run_in_systemd_vm(SCRIPT, "full", timeout=900)
    _assert_all(output, FULL_CHECKS)
    _assert_journal(output)
