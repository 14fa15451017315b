"""What one work queue can do, and what that means for the mover.

A queue's capabilities come from sysfs (the device's ``gen_cap`` and
``op_cap``, the queue's ``op_config`` where the kernel has it, and its
``block_on_fault`` setting) or, for the emulated engine, from the
emulator's configuration, which stands in for the same files. The mover
sets a descriptor flag or sends an operation only when they say the queue
takes it: a flag the device does not support makes every descriptor fail
with "invalid flags", an operation it does not accept with "unsupported
operation".

Two things sysfs says indirectly. The kernel hides BATCH from ``op_cap`` on
parts where user submission is not safe (INTEL-SA-01084); on those,
mapping the portal needs CAP_SYS_RAWIO, so a process without it submits
through ``write()``, which refuses BATCH with EINVAL. And a device whose
``gen_cap`` lacks overlapping-copy support answers an overlapping memmove
with status 0x16.
"""

from __future__ import annotations

import dataclasses

from dmuserd.dsa_offload._spec import WRITES_MEMORY, Flag, GenCap, Opcode


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """One queue's capabilities as read (None: the file was not there)."""

    gen_cap: int | None
    op_cap: int
    op_config: int | None = None
    wq_block_on_fault: bool = False
    source: str = "sysfs"

    @classmethod
    def of_emulator(cls, emulator) -> Capabilities:
        """What sysfs would show for an emulated queue."""
        return cls(gen_cap=emulator.gen_cap, op_cap=emulator.op_cap, op_config=emulator.op_config,
                   wq_block_on_fault=bool(emulator.block_on_fault), source="emulator")

    @property
    def ops(self) -> int:
        """Opcode bitmap the queue accepts: the device's, narrowed by the queue's op_config."""
        return self.op_cap if self.op_config is None else self.op_cap & self.op_config

    def supports(self, opcode: int) -> bool:
        return bool(self.ops >> int(opcode) & 1)

    def _gen(self, bit: int) -> bool:
        return self.gen_cap is not None and bool(self.gen_cap & bit)  # unknown gen_cap: assume nothing

    @property
    def batch(self) -> bool:
        return self.supports(Opcode.BATCH)

    @property
    def cache_control(self) -> bool:
        """CACHE_CONTROL may be set on operations that write memory."""
        return self._gen(GenCap.CACHE_CONTROL_MEMORY)

    @property
    def block_on_fault(self) -> bool:
        """BLOCK_ON_FAULT may be set: the device supports it and the queue is configured for it."""
        return self._gen(GenCap.BLOCK_ON_FAULT) and self.wq_block_on_fault

    @property
    def overlap_copy(self) -> bool:
        return self._gen(GenCap.OVERLAP_COPY)

    def flags_for(self, opcode: int, block_on_fault: bool) -> int:
        """The optional descriptor flags to set on ``opcode`` (gated on what the queue takes)."""
        flags = 0
        if self.cache_control and opcode in WRITES_MEMORY:
            flags |= Flag.CACHE_CONTROL
        if block_on_fault and self.block_on_fault:
            flags |= Flag.BLOCK_ON_FAULT
        return flags

    def operation_names(self) -> list[str]:
        return [name.lower() for name, op in Opcode.members().items() if self.supports(op)]

    def as_dict(self) -> dict:
        return {"source": self.source, "gen_cap": None if self.gen_cap is None else hex(self.gen_cap),
                "op_cap": hex(self.op_cap), "op_config": None if self.op_config is None else hex(self.op_config),
                "operations": self.operation_names(), "batch": self.batch, "cache_control": self.cache_control,
                "block_on_fault": self.block_on_fault, "overlap_copy": self.overlap_copy}

    def implications(self, *, rawio: bool | None = None) -> list[str]:
        """What the capabilities mean for the mover, one sentence each (``dmuserd dsa info``)."""
        out = []
        if self.gen_cap is None:
            out.append("gen_cap not readable: no cache control, block on fault or overlapping copies")
        if not self.batch:
            if self.op_cap >> Opcode.BATCH & 1:
                out.append("no BATCH: the queue's op_config leaves it out; small requests stay on the CPU")
            else:
                why = ("the kernel hides BATCH where user submission is not safe on the part (INTEL-SA-01084)"
                       if self.source == "sysfs" else "the device does not advertise it")
                out.append(f"no BATCH ({why}); small requests stay on the CPU")
                if rawio is False and self.source == "sysfs":
                    out.append("this process lacks CAP_SYS_RAWIO: mapping the portal will be refused, so "
                               "descriptors go through write() (kernel >= 6.10, or 6.1.91 and later 6.1)")
        if not self.cache_control:
            out.append("no cache control: copies land in memory, not in the cache")
        out.append("overlapping copies run on the CPU (never split, never re-run from the start)")
        if not self.block_on_fault:
            why = "the device lacks it" if not self._gen(GenCap.BLOCK_ON_FAULT) else "the queue is not configured for it"
            out.append(f"no block on fault ({why}): page faults are resolved by touching the page and resubmitting")
        missing = [name.lower() for name in ("MEMMOVE", "MEMFILL", "COMPARE", "COMPARE_PATTERN", "CRCGEN", "COPY_CRC",
                                             "DUALCAST", "CREATE_DELTA", "APPLY_DELTA")
                   if not self.supports(Opcode.members()[name])]
        if missing:
            out.append("on the CPU (not offered by the queue): " + ", ".join(missing))
        return out
