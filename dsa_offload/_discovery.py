"""Which DSA work queues this machine has, and which of them we may use.

The extension reads sysfs and says, per queue, why it is unusable (an empty
``reasons`` means usable). The roots default to the real ones and can be
moved with ``$DMUSERD_DSA_SYSFS`` / ``$DMUSERD_DSA_DEVDIR`` (tests use a fake
tree; so can a person checking a configuration). Each queue found becomes a
:class:`~dmuserd.dsa_offload._workqueue.WorkQueue`, a module loaded only
then: on most machines there is none (``dmuserd cow merge``'s start-up).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from dmuserd.dsa_offload._native import extension, load_error

if TYPE_CHECKING:  # loaded once a queue is found: none on most machines (`cow merge` start-up)
    from dmuserd.dsa_offload._workqueue import WorkQueue

SYSFS = "/sys/bus/dsa/devices"
DEVDIR = "/dev/dsa"
CAP_SYS_RAWIO = 17


def has_sys_rawio() -> bool | None:
    """Whether this process has CAP_SYS_RAWIO in its effective set (None: unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_RAWIO & 1)
    except OSError:
        pass
    return None


def roots(sysfs: str | None = None, devdir: str | None = None) -> tuple[str, str]:
    return (sysfs or os.environ.get("DMUSERD_DSA_SYSFS") or SYSFS, devdir or os.environ.get("DMUSERD_DSA_DEVDIR") or DEVDIR)


def discover(sysfs: str | None = None, devdir: str | None = None) -> list[WorkQueue]:
    """Every work queue sysfs shows (empty without the extension)."""
    ext = extension()
    if ext is None:
        return []
    found = ext.discover(*roots(sysfs, devdir))
    if not found:
        return []
    from dmuserd.dsa_offload._workqueue import WorkQueue

    return [WorkQueue.from_native(d) for d in found]


def usable_queues(queues: list[WorkQueue]) -> list[WorkQueue]:
    """Usable queues, best first: shared ones (other processes can use them
    too, and a dedicated one may already be taken), then by size."""
    return sorted((q for q in queues if q.usable), key=lambda q: (q.mode != "shared", -(q.size or 0), q.name))


def auto_choice(queues: list[WorkQueue] | None = None) -> tuple[str, str]:
    """The engine ``open_mover("auto")`` would pick, and why."""
    if extension() is None:
        return "cpu", f"the _dsa extension is not available ({load_error()})"
    queues = discover() if queues is None else queues
    best = usable_queues(queues)
    if best:
        return "dsa", f"work queue {best[0].name} ({best[0].mode}) is usable"
    if not queues:
        return "cpu", "no DSA work queues (no Intel DSA device, or the idxd driver is not loaded)"
    return "cpu", "no usable work queue: " + "; ".join(f"{q.name}: {', '.join(q.reasons)}" for q in queues)
