"""Bulk data moves offloaded to Intel DSA, with a device emulator and a CPU engine.

    async with open_mover("auto") as mover:
        await mover.copy(dst, src)
        crc = await mover.crc32c(buf)

Engines: ``dsa`` (a real work queue), ``emulated`` (the C extension's
software device behind the same submission code), ``cpu`` (no extension
needed). ``auto`` is ``dsa`` where a usable queue opens, else ``cpu``.
On every engine, copies and fills small enough to run inline on the CPU
are one C call when the extension is built (``dmuserd dsa info`` says
which), async Python methods otherwise; see ``_mover``.
"""

from dmuserd.dsa_offload._blocking import MOVER, BlockingMover, run_with_mover
from dmuserd.dsa_offload._discovery import WorkQueue, auto_choice, discover
from dmuserd.dsa_offload._errors import DeltaRecordError, DsaArgumentError, DsaError, DsaUnavailable
from dmuserd.dsa_offload._mover import BATCHABLE, DEFAULT_THRESHOLD, Mover
from dmuserd.dsa_offload._native import extension, load_error
from dmuserd.dsa_offload._open import ENGINES, open_mover
from dmuserd.dsa_offload._spec import Flag, Opcode, Status

__all__ = [
    "BATCHABLE", "DEFAULT_THRESHOLD", "MOVER", "BlockingMover", "run_with_mover", "ENGINES", "DeltaRecordError", "DsaArgumentError", "DsaError",
    "DsaUnavailable", "Flag", "Mover", "Opcode", "Status", "WorkQueue", "auto_choice", "discover",
    "extension", "load_error", "open_mover",
]
