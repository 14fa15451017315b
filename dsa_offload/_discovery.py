"""Which DSA work queues this machine has, and which of them we may use.

The extension reads sysfs and says, per queue, why it is unusable (an empty
``reasons`` means usable). The roots default to the real ones and can be
moved with ``$DMUSERD_DSA_SYSFS`` / ``$DMUSERD_DSA_DEVDIR`` (tests use a fake
tree; so can a person checking a configuration).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from dmuserd.dsa_offload._native import extension, load_error

if TYPE_CHECKING:  # loaded once a queue is found: none on most machines (`cow merge` start-up)
    from dmuserd.dsa_offload._caps import Capabilities

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
    gen_cap: int | None = None
    op_config: int | None = None
    version: int | None = None

    @classmethod
    def from_native(cls, d: dict) -> WorkQueue:
        dev = d["device"]
        # A queue's limits cannot exceed its device's; sysfs may omit either.
        def limit(key):
            values = [v for v in (d.get(key), dev.get(key)) if isinstance(v, int) and v > 0]
            return min(values) if values else None

        submission = d["submission"]
        if submission != "write" and not (dev.get("op_cap") or 0) >> 1 & 1 and has_sys_rawio() is False:
            # BATCH hidden from op_cap: a part where user submission is not
            # safe, whose portal only a CAP_SYS_RAWIO process may map.
            submission = "write"
        return cls(
            name=d["name"], path=d["path"], mode=d.get("mode"), state=d.get("state"), type=d.get("type"),
            size=d.get("size"), threshold=d.get("threshold"), max_transfer_size=limit("max_transfer_size"),
            max_batch_size=limit("max_batch_size"), block_on_fault=d.get("block_on_fault"),
            pasid_enabled=dev.get("pasid_enabled") == 1, op_cap=dev.get("op_cap") or 0, device=dev["name"],
            submission=submission, usable=d["usable"], reasons=tuple(d["reasons"]),
            gen_cap=dev.get("gen_cap") if isinstance(dev.get("gen_cap"), int) else None,
            op_config=d.get("op_config"), version=dev.get("version") if isinstance(dev.get("version"), int) else None,
        )

    @property
    def capabilities(self) -> Capabilities:
        """What the queue takes: gen_cap, op_cap narrowed by op_config, its block-on-fault setting."""
        from dmuserd.dsa_offload._caps import Capabilities

        return Capabilities(gen_cap=self.gen_cap, op_cap=self.op_cap, op_config=self.op_config,
                            wq_block_on_fault=self.block_on_fault == 1)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self) | {"op_cap": hex(self.op_cap), "reasons": list(self.reasons)}
        out |= {"gen_cap": None if self.gen_cap is None else hex(self.gen_cap),
                "op_config": None if self.op_config is None else hex(self.op_config),
                "version": None if self.version is None else hex(self.version),
                "capabilities": self.capabilities.as_dict(),
                "implications": self.capabilities.implications(rawio=has_sys_rawio())}
        return out


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
