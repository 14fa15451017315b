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

The names below are loaded on first use (PEP 562 ``__getattr__``): the
mover pulls in trio and crc32c, which a command that only builds its
parser (``dmuserd --help``, ``dmuserd dsa info``) should not pay for.
"""

from __future__ import annotations

import importlib

#: public name -> the submodule that defines it
_EXPORTS = {
    "MOVER": "_blocking", "BlockingMover": "_blocking", "run_with_mover": "_blocking",
    "WorkQueue": "_workqueue", "auto_choice": "_discovery", "discover": "_discovery",
    "DeltaRecordError": "_errors", "DsaArgumentError": "_errors", "DsaError": "_errors",
    "DsaUnavailable": "_errors",
    "BATCHABLE": "_mover", "DEFAULT_THRESHOLD": "_mover", "Mover": "_mover",
    "extension": "_native", "load_error": "_native",
    "ENGINES": "_open", "open_mover": "_open",
    "Flag": "_spec", "GenCap": "_spec", "Opcode": "_spec", "Status": "_spec",
    "Capabilities": "_caps",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
