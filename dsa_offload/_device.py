"""Driving one work queue (hardware or emulated) for the mover.

:meth:`Device.run` submits an operation's remaining work descriptor by
descriptor and reacts to each completion record: success advances it; a
partial completion (a page fault, or a fault on the record's own page)
advances it by exactly what the record says was done, touches the faulting
page and resubmits the rest. Descriptor flags and operations are only those
the queue takes (:class:`Capabilities`). Before each descriptor it waits for
a slot: never more of our descriptors in flight than the queue's size. Each
wait has a deadline. It gives the rest to the CPU (and says why) when a
shared queue is full with others' work, a fault keeps coming back, the
device reports an error, or the queue was given up (a missed deadline, a
software error reported on the queue, a forked child that cannot reopen it).
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections import Counter
from typing import Awaitable, Callable

import structlog
import trio

from dmuserd.dsa_offload._caps import Capabilities
from dmuserd.dsa_offload._completion import Completions
from dmuserd.dsa_offload._errors import DeltaRecordError
from dmuserd.dsa_offload._open import COMPLETION_TIMEOUT
from dmuserd.dsa_offload._ops import Operation
from dmuserd.dsa_offload._spec import STATUS_MASK, WRITE_FAULT, Opcode, Status, status_name

log = structlog.get_logger()

# The same fault address this many times in a row: the OS is not bringing
# the page in (or the device keeps losing it); stop trying.
FAULT_RETRIES = 3

_DELTA_STATUSES = (Status.DELTA_OFFSETS_NOT_INCREASING, Status.DELTA_OFFSET_OUT_OF_RANGE, Status.DELTA_RECORD_SIZE)


@dataclasses.dataclass(frozen=True)
class Record:
    """The fields of a completion record the mover uses."""

    status: int
    result: int
    bytes_completed: int
    fault_addr: int
    op_specific: int

    @classmethod
    def of(cls, op) -> Record:
        return cls(op.status, op.result, op.bytes_completed, op.fault_addr, op.op_specific)

    @classmethod
    def member(cls, fields: dict) -> Record:
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)})

    @property
    def code(self) -> int:
        return self.status & STATUS_MASK

    @property
    def status_ok(self) -> bool:
        return self.code in (Status.SUCCESS, Status.SUCCESS_FALSE_PREDICATE)


class Fallback(Exception):
    """Internal: the device gives the rest of an operation to the CPU."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _BatchRefused(Exception):
    """Internal: the queue refused a BATCH descriptor; its members go singly."""


class _FaultTracker:
    """One operation's faults: the same address again and again means give up."""

    def __init__(self) -> None:
        self.addr: int | None = None
        self.repeats = 0

    def check(self, addr: int) -> None:
        self.repeats = self.repeats + 1 if addr == self.addr else 0
        self.addr = addr
        if self.repeats >= FAULT_RETRIES:
            raise Fallback("fault_unresolved")


class Device:
    """One open work queue and what the mover may ask of it.

    ``caps`` (:class:`Capabilities`) decide the optional descriptor flags
    (cache control only where gen_cap has it, block on fault only where the
    device and the queue allow it), which operations go to the device and
    whether BATCH is used at all. ``broken`` says why the queue is not used
    any more (None while it is); ``batch_refused`` why batches are not.
    """

    def __init__(self, queue, *, engine: str, caps: Capabilities, block_on_fault: bool = False,
                 completion_timeout: float = COMPLETION_TIMEOUT) -> None:
        self.queue = queue
        self.engine = engine
        self.caps = caps
        self.completion_timeout = completion_timeout
        self.completions = Completions(queue)
        self.max_transfer = queue.max_transfer
        self.max_batch = queue.max_batch
        if block_on_fault and not caps.block_on_fault:
            log.info("block on fault asked for but not available on this queue; faults are touched and resubmitted",
                     engine=engine)
        self._flags = {op: caps.flags_for(op, block_on_fault) for op in Opcode.members().values()}
        self.broken: str | None = None
        self.broken_code = "queue_unusable"  # the fallback reason work gets once broken
        self.hung = False  # a descriptor missed its deadline: nobody waits any more
        self.batch_refused: str | None = None if caps.batch else "BATCH is not offered by the queue"
        self.counts: Counter[str] = Counter()
        if queue.check_device_error():
            self._give_up("device_error", "the device reports a software error (SWERR)")

    def supports(self, opcode: int) -> bool:
        """Whether the queue takes this operation at all."""
        return self.caps.supports(opcode)

    @property
    def batches(self) -> bool:
        """Whether small operations may be packed into BATCH descriptors."""
        return self.batch_refused is None and self.broken is None

    def flags(self, opcode: int) -> int:
        return self._flags.get(int(opcode), 0)

    # -- giving the queue up ---------------------------------------------

    def _give_up(self, code: str, detail: str, *, hung: bool = False) -> None:
        """Stop using the queue: new work goes to the CPU (fallback ``code``).

        What is in flight stays in flight: its Ops keep their buffers
        exported and their records allocated, so nothing the device may
        still write is freed (``Queue.close`` strands them for good).
        ``hung``: a descriptor missed its deadline; every waiter stops
        waiting, and that reason replaces an earlier one."""
        if hung and not self.hung:
            self.hung = True
            self.broken = None
            self.queue.wake()  # the other waiters look again, and stop
        if self.broken is not None:
            return
        self.broken, self.broken_code = detail, code
        self.counts[code + "s"] += 1
        log.error("dsa queue given up; the data path goes on on the CPU", engine=self.engine, reason=detail,
                  in_flight=self.queue.in_flight, pid=os.getpid())

    def _unusable(self) -> bool:
        if self.broken is None and self.queue.device_error:  # seen by the poller (a poll() on the WQ fd)
            self._give_up("device_error", "the device reported a software error (SWERR)")
        return self.broken is not None

    async def _await(self, handle) -> None:
        """Wait for ``handle`` to complete, at most ``completion_timeout`` seconds.

        A device error (SWERR) stops new submissions but not this wait: the
        descriptors in flight may still complete. A missed deadline means the
        device is hung: the queue is given up, every waiter stops waiting
        (raises Fallback) and its work goes on on the CPU."""
        try:
            with trio.move_on_after(self.completion_timeout):
                await self.completions.wait_until(lambda: handle.done or self.hung)
        except trio.Cancelled:
            # Nobody will wait for it now: its buffers are released as soon as
            # the device is done with them (by the poller), not at a later reap.
            self.queue.orphan(handle)
            raise
        except OSError as exc:  # the queue's fd, in a forked child that could not reopen it
            self._give_up("queue_unusable", f"{type(exc).__name__}: {exc}")
            raise Fallback("queue_unusable") from exc
        if handle.done:
            self._unusable()  # notice a device error reported meanwhile
            return
        self._give_up("completion_timeout", f"a descriptor did not complete within {self.completion_timeout} s",
                      hung=True)
        raise Fallback("completion_timeout")

    # -- one operation ---------------------------------------------------

    async def run(self, op: Operation, cpu: Callable[[Operation, str], Awaitable], first: Record | None = None):
        """Run ``op`` on the device; hand what is left to ``cpu(op, reason)`` if it gives up."""
        faults = _FaultTracker()
        try:
            if first is not None:
                self._react(op, first, None, faults)
            while not op.finished:
                args = op.device_args(self.max_transfer)
                await self._slot()
                handle = self._submit(op.opcode, args)
                await self._await(handle)
                self.counts["completed"] += 1
                self._react(op, Record.of(handle), args.get("size", 0), faults)
        except Fallback as exc:
            return await cpu(op, exc.reason)
        return op.result()

    async def _slot(self) -> None:
        """Wait until the queue has room for one more of our descriptors.

        Our own descriptors in flight never exceed the queue's size: a
        dedicated queue would drop the excess silently, and a shared one
        refuse it. Waiting here instead of falling back keeps a large
        operation, split into more pieces than the queue holds, on the
        device (its pieces take turns). A shared queue that others filled
        still refuses; that is a fallback (queue_full)."""
        queue = self.queue
        if queue.in_flight < queue.size or self._unusable():
            return
        self.counts["slot_waits"] += 1
        try:
            with trio.move_on_after(self.completion_timeout) as scope:
                await self.completions.wait_until(lambda: queue.in_flight < queue.size or self._unusable())
        except OSError as exc:
            self._give_up("queue_unusable", f"{type(exc).__name__}: {exc}")
            return
        if scope.cancelled_caught and not self._unusable():
            self._give_up("completion_timeout", f"no descriptor completed within {self.completion_timeout} s",
                          hung=True)

    def _submit(self, opcode: int, args: dict):
        if self._unusable():
            raise Fallback(self.broken_code)
        try:
            handle = self.queue.submit(opcode, flags=self.flags(opcode), **args)
        except OSError as exc:  # a forked child that could not reopen, typically
            self.broken = f"{type(exc).__name__}: {exc}"
            log.warning("dsa queue unusable; using the CPU", engine=self.engine, error=self.broken, pid=os.getpid())
            raise Fallback("queue_unusable") from exc
        if handle is None:
            raise Fallback("queue_full")
        self.counts["submitted"] += 1
        return handle

    def _react(self, op: Operation, rec: Record, size: int | None, faults: _FaultTracker) -> None:
        """Apply one completion record to ``op``; raise Fallback to stop."""
        code = rec.code
        if rec.status_ok:
            self.counts["offloaded_bytes"] += size if size is not None else rec.bytes_completed
            op.advance(size if size is not None else op.nbytes(), rec)
            return
        if code in (Status.PAGE_FAULT, Status.COMPLETION_RECORD_FAULT):
            # Partial completion: what the record says was done is done (a
            # backward memmove did its top), so the op resumes from exactly
            # there, as accel-config's dsa_reprep_* do: never from the start
            # (re-running an overlapping memmove would corrupt it). A fault
            # on the record's own page reports the same fields (0x1a).
            self.counts["faults" if code == Status.PAGE_FAULT else "completion_record_faults"] += 1
            done = 0 if op.restart_on_fault else min(rec.bytes_completed, size if size is not None else op.nbytes())
            self.counts["offloaded_bytes"] += done
            op.advance(done, rec)
            faults.check(rec.fault_addr)
            self.queue.touch(rec.fault_addr, code == Status.COMPLETION_RECORD_FAULT or bool(rec.status & WRITE_FAULT))
            return
        if code == Status.PAGE_REQUEST_REJECTED:
            raise Fallback("fault_unresolved")
        if op.opcode == Opcode.APPLY_DELTA and code in _DELTA_STATUSES:
            raise DeltaRecordError(code, "rejected by the device")
        log.warning("dsa device error; using the CPU", engine=self.engine, op=op.name, status=status_name(rec.status))
        raise Fallback(f"device_error_{code:#04x}")


    # -- batches ---------------------------------------------------------

    async def run_batch(self, ops: list[Operation], cpu: Callable[[Operation, str], Awaitable]) -> list:
        """Submit small operations as BATCH descriptors; finish failed members singly.

        A batch whose list (or record) hit a non-present page reports how
        many members it completed: those are done (their own records say
        how), the rest go again as a new batch from there (or singly when
        one is left), as accel-config's dsa_reprep_batch resubmits from
        ``descs_completed``; nothing that ran is run again."""
        results: list = [None] * len(ops)
        pending = list(range(len(ops)))  # members not yet run on the device
        faults = _FaultTracker()
        while len(pending) >= 2:
            members = [(int(ops[i].opcode), {"flags": self.flags(ops[i].opcode), **ops[i].device_args(self.max_transfer)})
                       for i in pending]
            try:
                await self._slot()
                handle = self._submit_batch(members)
                await self._await(handle)
            except _BatchRefused:
                break
            except Fallback as exc:
                for i in pending:
                    results[i] = await cpu(ops[i], exc.reason)
                return results
            self.counts["completed"] += 1
            self.counts["batches"] += 1
            code = handle.status & STATUS_MASK
            if code in (Status.SUCCESS, Status.BATCH_MEMBER_FAILED):
                ran = len(pending)
            elif code in (Status.BATCH_LIST_PAGE_FAULT, Status.COMPLETION_RECORD_FAULT):
                ran = min(handle.bytes_completed, len(pending))  # descriptors completed
            else:
                ran = 0  # the batch itself was refused (count, alignment...): nothing ran
            for i, member, fields in zip(pending[:ran], members, handle.members):
                results[i] = await self._member_done(ops[i], fields, member[1].get("size", 0), cpu)
            pending = pending[ran:]
            if code in (Status.BATCH_LIST_PAGE_FAULT, Status.COMPLETION_RECORD_FAULT):
                # Our own list or record shares a non-present page: bring it in, go on from there.
                self.counts["faults" if code == Status.BATCH_LIST_PAGE_FAULT else "completion_record_faults"] += 1
                try:
                    faults.check(handle.fault_addr)
                except Fallback:
                    break
                self.queue.touch(handle.fault_addr, code == Status.COMPLETION_RECORD_FAULT)
                continue
            break
        for i in pending:  # what no batch ran: one descriptor each
            results[i] = await self.run(ops[i], cpu)
        return results

    async def _member_done(self, op: Operation, fields: dict, size: int, cpu):
        """Apply a batch member's own record; finish the member singly if it is not done."""
        rec = Record.member(fields)
        if rec.code == Status.NONE:  # never ran (abandoned after a fence): run it alone
            return await self.run(op, cpu)
        if rec.status_ok:
            self._react(op, rec, size, _FaultTracker())
            return op.result() if op.finished else await self.run(op, cpu)
        self.counts["batch_member_failures"] += 1
        return await self.run(op, cpu, first=rec)

    def _submit_batch(self, members):
        if self._unusable():
            raise Fallback(self.broken_code)
        try:
            handle = self.queue.submit_batch(members)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                # write() answers EINVAL to a BATCH where user submission is
                # not safe (the kernel's cdev.c): no batches on this queue,
                # which is otherwise fine.
                self.batch_refused = f"the kernel refused BATCH: {exc}"
                log.warning("dsa queue refuses BATCH; members go one descriptor each", engine=self.engine,
                            error=str(exc))
                raise _BatchRefused from exc
            self.broken = f"{type(exc).__name__}: {exc}"
            log.warning("dsa queue unusable; using the CPU", engine=self.engine, error=self.broken, pid=os.getpid())
            raise Fallback("queue_unusable") from exc
        if handle is None:
            raise Fallback("queue_full")
        self.counts["submitted"] += 1
        return handle

    async def noop(self) -> None:
        """One round trip through the device; nothing to do when it is full."""
        try:
            handle = self._submit(Opcode.NOOP, {})
            await self._await(handle)
        except Fallback:
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Wait for what is in flight (the device may still write our
        buffers), at most ``completion_timeout``; then close the queue.
        What is still in flight then stays pinned for good."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(0 if self.hung else self.completion_timeout):
                await self.completions.wait_until(lambda: self.queue.in_flight == 0)
        self.close(0)

    def close(self, timeout: float | None = None) -> None:
        """Close the queue, waiting at most ``timeout`` (default: the completion deadline) for what is in flight."""
        timeout = (0 if self.hung else self.completion_timeout) if timeout is None else timeout
        stranded = self.queue.close(timeout=timeout)
        if stranded:
            log.error("dsa queue closed with descriptors in flight; their buffers stay pinned", engine=self.engine,
                      stranded=stranded)
