"""The data mover: async bulk-memory operations on DSA, its emulator, or the CPU.

Policy: an operation smaller than ``threshold`` bytes runs on the CPU
(submission and completion cost more than the copy); larger ones go to the
device, split into pieces of at most the queue's ``max_transfer`` (pieces
that are independent run in parallel, taking turns for the queue's slots);
:meth:`Mover.batch` packs small operations into BATCH descriptors when
together they are worth it and the queue takes BATCH. Operations the queue
does not take and overlapping copies stay on the CPU. Work the device
cannot finish (a shared queue full with others' work, an unresolvable
fault, an error, a queue given up) is finished on the CPU from where the
device stopped, and counted; from 256 KiB in a worker thread.

Checkpoints. Work the device does is awaited, so those calls are full trio
checkpoints. CPU work done inline (below the offload threshold and below
``cpu_thread_threshold``) is as cheap as the memcpy it is, and a trio
checkpoint, even ``checkpoint_if_cancelled`` (~0.2-0.35 µs), is a fifth of a
cache-hot 64 KiB
copy; so inline work follows one documented rule instead: every inline
call draws ``nbytes + CALL_CHARGE`` from a credit of
``CHECKPOINT_CREDIT`` bytes, and the call that exhausts it takes a full
checkpoint (yield to the scheduler, raise ``Cancelled`` if cancelled)
*before* doing its work. So a cancelled task looping on small operations
gets ``Cancelled`` within at most ``CHECKPOINT_CREDIT // CALL_CHARGE``
calls (16 MiB of copying: about 0.3 ms from cache, 1.6 ms from DRAM),
other tasks wait at most that long, and a call
that raised ``Cancelled`` at that point did nothing. A single small call in
a cancelled scope may complete, like a trio ``*_nowait`` operation.

The inline fast path in C. Even the leanest ``async def`` costs about as
much as that checkpoint, so when the extension is built :class:`Mover`
derives from the extension's ``Inline`` type, and ``mover.copy`` and
``mover.fill`` are its C methods: one C call that checks the buffers,
draws the credit, does the memcpy/fill, counts it, and returns an
already-finished awaitable (no coroutine). Anything it does not handle
itself (bad or non-contiguous buffers, work of ``_below`` bytes or more,
the call that would exhaust the credit, a closed mover) it hands unchanged
to the Python methods ``_copy_py`` / ``_fill_py``. Without the extension
the base is :class:`_InlineState`, whose ``copy``/``fill`` hand everything
to those two. They are the one Python path of copy and fill, the same as
every other operation's: an :mod:`~dmuserd.dsa_offload._ops` object through
:meth:`Mover._execute` (inline on the CPU, in a thread, or on the device).
The credit, the limits and the inline counters are members of the base, so
both paths follow one rule and :meth:`Mover.stats` stays exact. The base
class is chosen once, when this module is imported; no method is replaced
or aliased at run time. Because the work is done when the call returns,
``mover.copy(dst, src)`` copies even if never awaited; the result is still
a ``collections.abc.Coroutine``, so trio's ``start_soon`` and
``from_thread.run`` accept it.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import TYPE_CHECKING, Any, Sequence

import structlog
import trio

from dmuserd.dsa_offload import _cpu, _ops
from dmuserd.dsa_offload._errors import DsaArgumentError
from dmuserd.dsa_offload._native import extension
from dmuserd.dsa_offload._spec import DELTA_GRANULE, DELTA_MAX_SIZE

if TYPE_CHECKING:  # a CPU mover does not load the device side
    from dmuserd.dsa_offload._device import Device

log = structlog.get_logger()

DEFAULT_THRESHOLD = 64 * 1024
# CPU work at least this big runs in a worker thread (only where it drops
# the GIL) so the trio loop keeps serving; smaller work is cheaper inline
# than a thread hand-off (see bench/scenarios/dsa_mover.py).
DEFAULT_CPU_THREAD_THRESHOLD = 16 * 1024 * 1024
# Work a device engine gives to the CPU instead (a fallback, an operation
# the queue does not take, an overlapping copy) runs in a worker thread
# from this size: it is the device's share, often large, and the loop must
# keep serving meanwhile. Copies and compares this big drop the GIL.
FALLBACK_THREAD_THRESHOLD = 256 * 1024
# Inline CPU work takes a full checkpoint once it has used this much credit
# (bytes), each call drawing at least CALL_CHARGE: see the module docstring.
CHECKPOINT_CREDIT = 16 << 20
CALL_CHARGE = 8 << 10
_NOGIL_COPY = _cpu.NOGIL_COPY


class _InlineState:
    """The mover's base without the extension: ``_dsa.Inline``'s state, and its
    ``copy``/``fill`` handing every call to the subclass's Python path.

    ``_credit`` (bytes left before a checkpoint), ``_call_charge`` (drawn per call
    on top of its size), ``_below`` (inline only work smaller than this),
    ``_nogil`` (unused here), ``_inline_ops``/``_inline_nbytes`` (work the C
    methods did: none here), ``_closed``.
    """

    __slots__ = ("_credit", "_call_charge", "_below", "_nogil", "_inline_ops", "_inline_nbytes", "_closed", "__dict__",
                 "__weakref__")

    def __init__(self, *, credit: int = 0, charge: int = 0, nogil: int = sys.maxsize, below: int = sys.maxsize) -> None:
        self._credit, self._call_charge, self._nogil, self._below = credit, charge, nogil, below
        self._inline_ops = self._inline_nbytes = 0
        self._closed = False

    def copy(self, dst, src):
        """Copy ``src`` into ``dst``: see :meth:`Mover._copy_py`."""
        return self._copy_py(dst, src)

    def fill(self, dst, pattern: bytes | int = b"\0"):
        """Fill ``dst`` with a pattern: see :meth:`Mover._fill_py`."""
        return self._fill_py(dst, pattern)  # type: ignore[attr-defined]  # Mover's, as the C Inline's is


#: The mover's base class: the extension's C fast path, or the same state in Python.
_InlineBase = getattr(extension(), "Inline", None) or _InlineState


def _view(buf, what: str, writable: bool = False) -> memoryview:
    if type(buf) is memoryview and buf.format == "B" and buf.c_contiguous and not (writable and buf.readonly):
        return buf  # the common case, kept cheap: it runs on every call
    try:
        view = memoryview(buf)
    except TypeError as exc:
        raise DsaArgumentError(f"{what} must support the buffer protocol, not {type(buf).__name__}") from exc
    if not view.c_contiguous:
        raise DsaArgumentError(f"{what} must be contiguous")
    if writable and view.readonly:
        raise DsaArgumentError(f"{what} must be writable")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _same_length(what: str, *views: memoryview) -> None:
    n = len(views[0])
    if any(len(v) != n for v in views[1:]):
        raise DsaArgumentError(f"{what}: buffers differ in length ({', '.join(str(len(v)) for v in views)})")


def _delta_size(n: int) -> None:
    if n % DELTA_GRANULE or n > DELTA_MAX_SIZE:
        raise DsaArgumentError(f"delta buffers must be a multiple of 8 bytes and at most {DELTA_MAX_SIZE}; got {n}")


# Each operation's argument checking, shared by its method and batch().
def _copy(dst, src):
    dst, src = _view(dst, "dst", True), _view(src, "src")
    _same_length("copy", dst, src)
    return _ops.Copy(dst, src)


def _fill(dst, pattern=b"\0"):
    return _ops.Fill(_view(dst, "dst", True), _cpu.expand_pattern(pattern))


def _compare(a, b):
    a, b = _view(a, "a"), _view(b, "b")
    _same_length("compare", a, b)
    return _ops.Compare(a, b)


def _compare_pattern(buf, pattern):
    return _ops.ComparePattern(_view(buf, "buf"), _cpu.expand_pattern(pattern))


def _crc32c(buf, seed=0):
    return _ops.Crc32c(_view(buf, "buf"), seed & 0xFFFFFFFF)


def _copy_crc32c(dst, src, seed=0):
    dst, src = _view(dst, "dst", True), _view(src, "src")
    _same_length("copy_crc32c", dst, src)
    return _ops.CopyCrc32c(dst, src, seed & 0xFFFFFFFF)


def _dualcast(dst1, dst2, src):
    dst1, dst2, src = _view(dst1, "dst1", True), _view(dst2, "dst2", True), _view(src, "src")
    _same_length("dualcast", dst1, dst2, src)
    return _ops.Dualcast(dst1, dst2, src)


def _create_delta(original, modified):
    original, modified = _view(original, "original"), _view(modified, "modified")
    _same_length("create_delta", original, modified)
    _delta_size(len(original))
    return _ops.CreateDelta(original, modified)


def _apply_delta(dst, delta):
    dst = _view(dst, "dst", True)
    _delta_size(len(dst))
    return _ops.ApplyDelta(dst, _view(delta, "delta"))


BATCHABLE = {"copy": _copy, "fill": _fill, "compare": _compare, "compare_pattern": _compare_pattern,
             "crc32c": _crc32c, "copy_crc32c": _copy_crc32c, "dualcast": _dualcast}


class Mover(_InlineBase):
    """Async data mover; make one with :func:`dmuserd.dsa_offload.open_mover`."""

    def __init__(self, device: Device | None, *, engine: str, threshold: int = DEFAULT_THRESHOLD,
                 cpu_thread_threshold: int | None = DEFAULT_CPU_THREAD_THRESHOLD, emulator=None) -> None:
        self._device = device
        self.engine = engine
        self._threshold = threshold
        self._cpu_thread_threshold = cpu_thread_threshold
        self.emulator = emulator  # the emulated device, for tests and stats
        # Plain ints, not a Counter: they are bumped on every call. The
        # inline path counts only its own two (stats() adds them up).
        self._ops = self._offloaded_ops = self._cpu_ops = self._cpu_bytes = 0
        self._fallbacks: Counter[str] = Counter()
        # The inline state (see "The inline fast path in C" in the module docstring).
        _InlineBase.__init__(self, credit=CHECKPOINT_CREDIT, charge=CALL_CHARGE, nogil=_NOGIL_COPY)
        self._update_inline_limit()

    @property
    def threshold(self) -> int:
        """Operations smaller than this many bytes stay on the CPU."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: int) -> None:
        self._threshold = value
        self._update_inline_limit()

    @property
    def cpu_thread_threshold(self) -> int | None:
        """CPU work this large runs in a worker thread (None: never)."""
        return self._cpu_thread_threshold

    @cpu_thread_threshold.setter
    def cpu_thread_threshold(self, value: int | None) -> None:
        self._cpu_thread_threshold = value
        self._update_inline_limit()

    def _update_inline_limit(self) -> None:
        # Sizes below this run inline on the CPU with no policy decision left.
        top = sys.maxsize
        self._below = max(0, min(self._threshold if self._device else top,
                              top if self._cpu_thread_threshold is None else self._cpu_thread_threshold, top))

    @property
    def queue(self):
        """The extension's Queue in use (None on the CPU engine)."""
        return self._device.queue if self._device else None

    # -- the operations --------------------------------------------------

    async def _copy_py(self, dst, src) -> None:
        """Copy ``src`` into ``dst`` (same length; overlap allowed).

        ``mover.copy`` (the C ``Inline.copy``, or :class:`_InlineState`'s)
        calls this for whatever it does not do itself. Inline (small) copies
        check for cancellation by the credit rule of the module docstring,
        not on every call.
        """
        await self._execute(_copy(dst, src))

    async def _fill_py(self, dst, pattern: bytes | int = b"\0") -> None:
        """Fill ``dst`` with a 1, 2, 4 or 8-byte pattern (or a byte value).

        ``mover.fill`` calls this for whatever it does not do itself.
        """
        await self._execute(_fill(dst, pattern))

    async def compare(self, a, b) -> int | None:
        """Offset of the first differing byte, or None when equal."""
        return await self._execute(_compare(a, b))

    async def compare_pattern(self, buf, pattern: bytes | int) -> int | None:
        """Offset of the first byte breaking the repeated pattern, or None."""
        return await self._execute(_compare_pattern(buf, pattern))

    async def crc32c(self, buf, seed: int = 0) -> int:
        """CRC-32C of ``buf``; ``seed`` chains like the crc32c package's ``value``."""
        return await self._execute(_crc32c(buf, seed))

    async def copy_crc32c(self, dst, src, seed: int = 0) -> int:
        """Copy ``src`` to ``dst`` and return the CRC-32C of the data."""
        return await self._execute(_copy_crc32c(dst, src, seed))

    async def dualcast(self, dst1, dst2, src) -> None:
        """Copy ``src`` to both destinations."""
        await self._execute(_dualcast(dst1, dst2, src))

    async def create_delta(self, original, modified) -> bytes:
        """A delta record (10-byte entries per differing 8-byte granule) from
        ``original`` to ``modified``; b"" when equal. At most 512 KiB."""
        return await self._execute(_create_delta(original, modified))

    async def apply_delta(self, dst, delta) -> None:
        """Apply a delta record made by :meth:`create_delta` to ``dst``."""
        await self._execute(_apply_delta(dst, delta))

    async def noop(self) -> None:
        """One round trip through the device (nothing on the CPU engine)."""
        if self._device:
            await self._device.noop()
        else:
            await trio.lowlevel.checkpoint()

    async def batch(self, requests: Sequence[tuple]) -> list[Any]:
        """Run several operations, e.g. ``[("copy", dst, src), ("crc32c", buf)]``.

        The requests must be independent: like a DSA batch without FENCE,
        they run in no particular order. Returns their results in request
        order. Small ones travel together in BATCH
        descriptors when their total reaches the threshold; large ones run
        as single operations, concurrently.
        """
        ops = []
        for request in requests:
            name, *args = request
            if name not in BATCHABLE:
                raise DsaArgumentError(f"{name!r} cannot be batched; batchable: {', '.join(BATCHABLE)}")
            ops.append(BATCHABLE[name](*args))
        if self._closed:
            raise DsaArgumentError("the mover is closed")
        results: list[Any] = [None] * len(ops)
        device = self._device
        packed: list[int] = []
        if device and device.batches:
            small = [i for i, op in enumerate(ops) if 0 < op.nbytes() < self.threshold
                     and op.nbytes() <= device.max_transfer and self._device_reason(op) is None]
            if len(small) >= 2 and sum(ops[i].nbytes() for i in small) >= self.threshold:
                packed = small
        taken = set(packed)
        # What runs on the CPU in this thread runs here, one after another:
        # a task per small operation would cost more than the operations.
        inline = [i for i, op in enumerate(ops) if i not in taken and op.nbytes() < self._below]
        if inline:
            await self._charge(sum(ops[i].nbytes() for i in inline))
            reason = "below_threshold" if device else None
            for i in inline:
                op = ops[i]
                self._ops += 1
                self._count_cpu(op.nbytes(), reason)
                op.cpu()
                results[i] = op.result()
            taken.update(inline)
        rest = [i for i in range(len(ops)) if i not in taken]
        if not packed and not rest:
            return results

        async def single(i):
            results[i] = await self._execute(ops[i])

        async def group(indexes):
            done = await device.run_batch([ops[i] for i in indexes], self._cpu)
            for i, result in zip(indexes, done):
                results[i] = result
            self._ops += len(indexes)
            self._offloaded_ops += len(indexes)

        async with trio.open_nursery() as nursery:
            size = max(2, device.max_batch if device else 2)
            for start in range(0, len(packed), size):
                chunk = packed[start : start + size]
                if len(chunk) == 1:
                    nursery.start_soon(single, chunk[0])
                else:
                    nursery.start_soon(group, chunk)
            for i in rest:
                nursery.start_soon(single, i)
        return results

    # -- policy ----------------------------------------------------------

    def _device_reason(self, op: _ops.Operation) -> str | None:
        """Why the device must not take this operation (None: it may)."""
        if not self._device.supports(op.opcode):
            return "unsupported_op"
        ext = extension()
        if isinstance(op, _ops.Copy):
            d, s, n = ext.address_of(op.dst), ext.address_of(op.src), len(op.dst)
            if d < s + n and s < d + n:
                # Overlapping copies stay on the CPU, as DTO does by default:
                # pieces would clobber each other, a device without overlap
                # support refuses them, and one re-run from the start after
                # a partial completion would copy already-overwritten source.
                return "overlap"
        if isinstance(op, _ops.Dualcast):
            addrs = [ext.address_of(v) for v in (op.dst1, op.dst2, op.src)]
            n = op.nbytes()
            if (addrs[0] ^ addrs[1]) & 0xFFF:
                return "dualcast_layout"  # the device needs bits 11:0 of both destinations equal
            if any(a < b + n and b < a + n for a, b in ((addrs[0], addrs[1]), (addrs[0], addrs[2]), (addrs[1], addrs[2]))):
                return "overlap"
        if isinstance(op, (_ops.CreateDelta, _ops.ApplyDelta)) and op.nbytes() > self._device.max_transfer:
            return "too_large"
        return None

    async def _execute(self, op: _ops.Operation):
        """Run ``op`` where the policy says (an empty one is inline CPU work, drawing its call charge)."""
        if self._closed:
            raise DsaArgumentError("the mover is closed")
        # Work done on the CPU is counted once done: a call cancelled at its
        # checkpoint did nothing and counts nothing (as on the inline path).
        reason = None if self._device is None else "below_threshold" if op.nbytes() < self.threshold \
            else self._device_reason(op)
        if self._device is None or reason:
            result = await self._cpu(op, reason)
            self._ops += 1
            return result
        self._ops += 1
        self._offloaded_ops += 1
        mt = self._device.max_transfer
        if not op.splittable or op.nbytes() <= mt:
            return await self._device.run(op, self._cpu)
        parts = op.split(mt)
        async with trio.open_nursery() as nursery:
            for part in parts:
                nursery.start_soon(self._device.run, part, self._cpu)
        return op.combine(parts)

    async def _cpu(self, op: _ops.Operation, reason: str | None):
        """Finish ``op`` on the CPU (``reason``: why not on the device).

        In a worker thread when it is big: from ``cpu_thread_threshold``
        bytes, and on a device engine from ``FALLBACK_THREAD_THRESHOLD``
        bytes of work the device was meant to do (a ``reason``)."""
        n = op.nbytes()
        big = self.cpu_thread_threshold is not None and n >= self.cpu_thread_threshold
        if big or (reason not in (None, "below_threshold") and n >= FALLBACK_THREAD_THRESHOLD):
            await trio.to_thread.run_sync(op.cpu)
        else:
            await self._charge(n)
            op.cpu()
        self._count_cpu(n, reason)
        return op.result()

    def _count_cpu(self, n: int, reason: str | None) -> None:
        if reason:
            self._fallbacks[reason] += 1
        self._cpu_ops += 1
        self._cpu_bytes += n

    async def _charge(self, n: int) -> None:
        """Draw ``n`` bytes of inline work from the credit; checkpoint when it runs out."""
        self._credit -= n + CALL_CHARGE
        if self._credit < 0:
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        self._credit = CHECKPOINT_CREDIT
        await trio.lowlevel.checkpoint()

    # -- state -----------------------------------------------------------

    def stats(self) -> dict:
        """Counters for ``dmuserd status``: what ran where, and why not on the device."""
        fallbacks = dict(self._fallbacks)
        inline_ops, inline_bytes = self._inline_ops, self._inline_nbytes
        if self._device and inline_ops:
            fallbacks["below_threshold"] = fallbacks.get("below_threshold", 0) + inline_ops
        out = {
            "engine": self.engine,
            "threshold": self.threshold,
            "ops": self._ops + inline_ops,
            "offloaded_ops": self._offloaded_ops,
            "cpu_ops": self._cpu_ops + inline_ops,
            "cpu_bytes": self._cpu_bytes + inline_bytes,
            "fallbacks": fallbacks,
        }
        if self._device:
            c = self._device.counts
            q = self._device.queue
            out |= {key: c[key] for key in ("submitted", "completed", "batches", "offloaded_bytes", "faults",
                                            "completion_record_faults", "batch_member_failures", "slot_waits",
                                            "completion_timeouts", "device_errors")}
            out["queue"] = {"kind": q.kind, "mode": q.mode, "size": q.size, "path": q.path, "in_flight": q.in_flight,
                            "retries": q.retries, "full": q.full, "generation": q.generation,
                            "broken": self._device.broken, "batch_refused": self._device.batch_refused,
                            "device_error": q.device_error, "stranded": q.stranded,
                            "capabilities": self._device.caps.as_dict()}
        if self.emulator is not None:
            out["emulator"] = self.emulator.stats()
        return out

    async def aclose(self) -> None:
        """Wait for in-flight descriptors (they may still write our buffers), then close."""
        if self._closed:
            return
        self._closed = True
        if self._device:
            await self._device.aclose()

    def close(self) -> None:
        """Synchronous close: blocks until the device is done with every buffer."""
        self._closed = True
        if self._device:
            self._device.close()

    async def __aenter__(self) -> Mover:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<Mover engine={self.engine} threshold={self.threshold}>"


