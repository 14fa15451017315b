"""Which DSA work queues this machine has, and which of them we may use.

The extension reads sysfs and says, per queue, why it is unusable (an empty
``reasons`` means usable). The roots default to the real ones and can be
moved with ``$DMUSERD_DSA_SYSFS`` / ``$DMUSERD_DSA_DEVDIR`` (tests use a fake
tree; so can a person checking a configuration).
"""

from __future__ import annotations

import dataclasses
import os

from dmuserd.dsa_offload._native import extension, load_error

SYSFS = "/sys/bus/dsa/devices"
DEVDIR = "/dev/dsa"


@dataclasses.dataclass(frozen=True)
class WorkQueue:
    name: str
    path: str
    mode: str | None
    state: str | None
    type: str | None
    size: int | None
    threshold: int | None
    max_transfer_size: int | None
    max_batch_size: int | None
    block_on_fault: int | None
    pasid_enabled: bool
    op_cap: int
    device: str
    submission: str
    usable: bool
    reasons: tuple[str, ...]

    @classmethod
    def from_native(cls, d: dict) -> WorkQueue:
        dev = d["device"]
        # A queue's limits cannot exceed its device's; sysfs may omit either.
        def limit(key):
            values = [v for v in (d.get(key), dev.get(key)) if isinstance(v, int) and v > 0]
            return min(values) if values else None

        return cls(
            name=d["name"], path=d["path"], mode=d.get("mode"), state=d.get("state"), type=d.get("type"),
            size=d.get("size"), threshold=d.get("threshold"), max_transfer_size=limit("max_transfer_size"),
            max_batch_size=limit("max_batch_size"), block_on_fault=d.get("block_on_fault"),
            pasid_enabled=dev.get("pasid_enabled") == 1, op_cap=dev.get("op_cap") or 0, device=dev["name"],
            submission=d["submission"], usable=d["usable"], reasons=tuple(d["reasons"]),
        )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"op_cap": hex(self.op_cap), "reasons": list(self.reasons)}


def roots(sysfs: str | None = None, devdir: str | None = None) -> tuple[str, str]:
    return (sysfs or os.environ.get("DMUSERD_DSA_SYSFS") or SYSFS, devdir or os.environ.get("DMUSERD_DSA_DEVDIR") or DEVDIR)


def discover(sysfs: str | None = None, devdir: str | None = None) -> list[WorkQueue]:
    """Every work queue sysfs shows (empty without the extension)."""
    ext = extension()
    if ext is None:
        return []
    sysfs, devdir = roots(sysfs, devdir)
    return [WorkQueue.from_native(d) for d in ext.discover(sysfs, devdir)]


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
