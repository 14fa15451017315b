"""A DSA work queue as sysfs describes it (what :func:`~dmuserd.dsa_offload._discovery.discover` finds).

A module of its own so that a machine without DSA queues (most) never
defines the class: ``dmuserd cow merge`` opens the ``auto`` mover at every
start.
"""

from __future__ import annotations

import dataclasses

from dmuserd.dsa_offload import _discovery
from dmuserd.dsa_offload._caps import Capabilities


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
        if submission != "write" and not (dev.get("op_cap") or 0) >> 1 & 1 and _discovery.has_sys_rawio() is False:
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
        return Capabilities(gen_cap=self.gen_cap, op_cap=self.op_cap, op_config=self.op_config,
                            wq_block_on_fault=self.block_on_fault == 1)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self) | {"op_cap": hex(self.op_cap), "reasons": list(self.reasons)}
        out |= {"gen_cap": None if self.gen_cap is None else hex(self.gen_cap),
                "op_config": None if self.op_config is None else hex(self.op_config),
                "version": None if self.version is None else hex(self.version),
                "capabilities": self.capabilities.as_dict(),
                "implications": self.capabilities.implications(rawio=_discovery.has_sys_rawio())}
        return out
