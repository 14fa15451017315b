"""Choosing an engine and opening the mover on it.

* ``"dsa"``: a real work queue; fails with :class:`DsaUnavailable` saying why
  when none can be opened.
* ``"emulated"``: the extension's software device behind the same portal
  code (tests, benchmarks, machines without DSA).
* ``"cpu"``: no extension needed.
* ``"auto"``: ``"dsa"`` when a usable queue opens, else ``"cpu"``; it never
  picks the emulator, which is slower than the CPU.
"""

from __future__ import annotations

import structlog

from dmuserd.dsa_offload._discovery import discover, usable_queues
from dmuserd.dsa_offload._errors import DsaUnavailable
from dmuserd.dsa_offload._mover import DEFAULT_CPU_THREAD_THRESHOLD, DEFAULT_THRESHOLD, Mover
from dmuserd.dsa_offload._native import extension, load_error

log = structlog.get_logger()

ENGINES = ("auto", "dsa", "emulated", "cpu")

# A descriptor not complete after this many seconds never will be (a hung
# device, a queue disabled under us): the queue is given up. Generous: a
# block-on-fault page request may wait for the disk. (Here, not in _device
# or _completion, so that open_mover's default loads neither.)
COMPLETION_TIMEOUT = 5.0

# The device side (_device, _caps) is imported only where a queue opens: a CPU mover, or "auto" on a
# machine without a usable DSA queue (most), does not load it (start-up of `dmuserd cow merge`).


def open_mover(engine: str = "auto", threshold: int = DEFAULT_THRESHOLD, *, emulator=None,
               emulator_options: dict | None = None, block_on_fault: bool = False, portal: str = "auto",
               completion_timeout: float = COMPLETION_TIMEOUT,
               cpu_thread_threshold: int | None = DEFAULT_CPU_THREAD_THRESHOLD,
               sysfs: str | None = None, devdir: str | None = None) -> Mover:
    """Open a :class:`Mover`; use it as ``async with open_mover(...) as mover``.

    ``emulator`` (an ``Emulator``) or ``emulator_options`` (its keyword
    arguments: mode, size, max_transfer, max_batch, block_on_fault, delay_us,
    gen_cap, op_cap, op_config, user_submission_safe) configure the
    ``"emulated"`` engine; ``portal="write"`` submits to it through its
    model of the kernel's ``write()`` instead of the portal. The queue's
    capabilities (sysfs, or the emulator's stand-in) decide which flags and
    operations the mover uses. A descriptor not complete within
    ``completion_timeout`` seconds gives the queue up (its work goes on on
    the CPU; its buffers stay pinned).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    common = {"threshold": threshold, "cpu_thread_threshold": cpu_thread_threshold}
    if engine == "cpu":
        return Mover(None, engine="cpu", **common)
    ext = extension()
    if engine == "emulated":
        if ext is None:
            raise DsaUnavailable(f"the emulated engine needs the _dsa extension: {load_error()}")
        from dmuserd.dsa_offload._caps import Capabilities
        from dmuserd.dsa_offload._device import Device

        emu = emulator if emulator is not None else ext.Emulator(**(emulator_options or {}))
        queue = ext.Queue(emulator=emu, portal=portal)
        device = Device(queue, engine="emulated", caps=Capabilities.of_emulator(emu), block_on_fault=block_on_fault,
                        completion_timeout=completion_timeout)
        return Mover(device, engine="emulated", emulator=emu, **common)
    try:
        queue, wq = _open_hardware(sysfs, devdir)
        from dmuserd.dsa_offload._device import Device

        device = Device(queue, engine="dsa", caps=wq.capabilities, block_on_fault=block_on_fault,
                        completion_timeout=completion_timeout)
        return Mover(device, engine="dsa", **common)
    except DsaUnavailable as exc:
        if engine == "dsa":
            raise
        log.info("dsa offload not available; using the CPU", reason=str(exc))
        return Mover(None, engine="cpu", **common)


def _open_hardware(sysfs: str | None, devdir: str | None):
    ext = extension()
    if ext is None:
        raise DsaUnavailable(f"the _dsa extension is not available: {load_error()}")
    queues = discover(sysfs, devdir)
    failures = [f"{q.name}: {', '.join(q.reasons)}" for q in queues if not q.usable]
    for wq in usable_queues(queues):
        try:
            queue = ext.Queue(wq.path, mode=wq.mode, size=wq.size, max_transfer=wq.max_transfer_size or 2 << 20,
                              max_batch=wq.max_batch_size or 32)
        except OSError as exc:  # EBUSY: another process holds this dedicated queue
            failures.append(f"{wq.name}: cannot open {wq.path}: {exc.strerror}")
            continue
        log.info("dsa work queue opened", queue=wq.name, mode=wq.mode, size=wq.size, submission=queue.kind,
                 note=queue.portal_note or None, capabilities=wq.capabilities.as_dict())
        return queue, wq
    raise DsaUnavailable("no usable DSA work queue" + (": " + "; ".join(failures) if failures else " found"))
