"""The differential cases (:data:`dmuser_vm_lib.CASES`) run against the in-process model.

Mirrors what :mod:`dmuser_guest` does on the real kernel, step for step,
with :class:`~dmuserd.daemon.emulated.EmulatedDmUser` (the kernel-target
model with the daemon's channel code) in place of ``/dev/mapper/NAME`` and a
``dmuserd serve`` process: a daemon "attaches" when the device's ``run``
starts and "dies" or "stops" when it is cancelled (its channels close, as
when the kernel closes a killed process's files). The model takes its time
as an argument: where the kernel's timer would fire, :meth:`KernelTarget.advance`
is called after the same wait.

The cases the guest serves byte by byte itself (no daemon: many messages
outstanding, each message's timer) run on a bare
:class:`~dmuserd.protocol.KernelTarget`, at the guest's times.
"""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import trio

import dmuser_vm_lib as lib
from dmuser_vm_backend import StallBackend
from dmuserd.backends.file import FileBackend
from dmuserd.daemon.dispatcher import Dispatcher
from dmuserd.daemon.emulated import EmulatedDmUser
from dmuserd.protocol import WOULD_BLOCK, Bio, Flag, KernelTarget, RequestType

_HEADER = struct.Struct("<5Q")


async def _attach(nursery, device: EmulatedDmUser):
    """Start serving ``device``; return (cancel scope, finished event): the daemon's life."""
    scope = trio.CancelScope()
    finished = trio.Event()

    async def serve(*, task_status=trio.TASK_STATUS_IGNORED):
        try:
            with scope:
                await device.run(task_status=task_status)
        finally:
            finished.set()

    await nursery.start(serve)
    return scope, finished


async def _kill(life) -> None:
    scope, finished = life
    scope.cancel()
    await finished.wait()


async def _io(device: EmulatedDmUser, kind: RequestType, offset: int, length: int, data=None, flags=0) -> dict:
    try:
        out = await device.submit(kind, offset, length, data, flags)
    except OSError as exc:
        return {"result": errno.errorcode.get(exc.errno, str(exc.errno))}
    if kind == RequestType.READ:
        return {"result": "ok", "sha": lib.sha(bytes(out))}
    return {"result": "ok"}


async def _in_task(nursery, coroutine_fn, *args):
    """Run an I/O in a task (the way the guest uses a thread); returns (done event, result dict)."""
    out: dict = {}
    done = trio.Event()

    async def run():
        out.update(await coroutine_fn(*args))
        done.set()

    nursery.start_soon(run)
    return done, out


async def run_model_cases(work: Path) -> tuple[dict, dict]:
    """The outcome of every case on the model, keyed by case name; and side facts."""
    a, b, c = work / "model_a.img", work / "model_b.img", work / "model_c.img"
    with open(a, "wb") as f:
        f.truncate(lib.T1_SIZE)
    with open(b, "wb") as f:
        f.write(lib.pattern(lib.EARLY_SEED, lib.EARLY_LEN))
        f.truncate(lib.T2_SIZE)
    with open(c, "wb") as f:
        f.truncate(lib.T3_SIZE)
    backend1 = StallBackend(str(a), stall=[(lib.STALL_OFF, 4096)], fail=[(lib.FAIL_OFF, 4096)])
    t1 = EmulatedDmUser(Dispatcher(backend1, name="t1"), channels=4, daemon_timeout=lib.LONG_TIMEOUT_MS / 1000)
    t2 = EmulatedDmUser(Dispatcher(FileBackend(str(b)), name="t2"), daemon_timeout=lib.LONG_TIMEOUT_MS / 1000)
    t3 = EmulatedDmUser(Dispatcher(FileBackend(str(c)), name="t3"), daemon_timeout=lib.SHORT_TIMEOUT_MS / 1000)
    cases: dict = {}
    facts: dict = {}
    R, W = RequestType.READ, RequestType.WRITE
    async with trio.open_nursery() as nursery:
        d1 = await _attach(nursery, t1)

        data = lib.pattern(lib.PATTERN_SEED, lib.PATTERN_LEN)
        block = 64 * 1024
        result = "ok"
        for off in range(0, lib.PATTERN_LEN, block):
            wrote = await _io(t1, W, lib.PATTERN_OFF + off, block, data[off : off + block])
            if wrote["result"] != "ok":
                result = wrote["result"]
        cases["pattern_rw"] = await _io(t1, R, lib.PATTERN_OFF, lib.PATTERN_LEN)
        if result != "ok":
            cases["pattern_rw"]["result"] = result

        wrote = await _io(t1, W, lib.DSYNC_OFF, lib.DSYNC_LEN, lib.pattern(lib.DSYNC_SEED, lib.DSYNC_LEN), Flag.FUA)
        with open(a, "rb") as f:
            f.seek(lib.DSYNC_OFF)
            cases["dsync_durable"] = {"result": wrote["result"], "sha": lib.sha(f.read(lib.DSYNC_LEN))}

        cases["failing_read"] = await _io(t1, R, lib.FAIL_OFF, lib.PROBE_LEN)

        done, out = await _in_task(nursery, _io, t1, R, lib.STALL_OFF, lib.PROBE_LEN)
        with trio.fail_after(30):
            while not backend1.stalled:
                await trio.sleep(0.01)
        await _kill(d1)
        backend1.release.set()  # the killed process's backend call is gone with it
        with trio.fail_after(30):
            await done.wait()
        cases["killed_in_flight"] = out
        cases["after_kill_new_io"] = await _io(t1, R, 0, lib.PROBE_LEN)

        done, out = await _in_task(nursery, _io, t3, R, 0, lib.PROBE_LEN)
        await trio.sleep(lib.SHORT_TIMEOUT_MS / 1000 + 0.05)
        t3.target.advance(trio.current_time())  # the kernel's timer fires
        with trio.fail_after(30):
            await done.wait()
        cases["no_daemon_timeout"] = out

        done, out = await _in_task(nursery, _io, t2, R, 0, lib.EARLY_LEN)
        await trio.sleep(0.05)
        queued = not done.is_set()
        d2_t1 = await _attach(nursery, t1)
        d2_t2 = await _attach(nursery, t2)
        with trio.fail_after(30):
            await done.wait()
        cases["before_attach"] = out
        facts["queued_before_attach"] = queued
        cases["restart_read"] = await _io(t1, R, lib.PATTERN_OFF, lib.PATTERN_LEN)
        await _kill(d2_t1)
        await _kill(d2_t2)
        cases["after_stop"] = await _io(t1, R, 0, lib.PROBE_LEN)
    for backend in (backend1, t2.dispatcher.backend, t3.dispatcher.backend):
        await backend.close()
    cases.update(raw_model_cases())
    return cases, facts


def _result(bio: Bio) -> str:
    if not bio.done:
        return "hung"
    return "ok" if not bio.error else errno.errorcode[bio.error]


def _probe(index: int = 0) -> Bio:
    return Bio(RequestType.READ, index * lib.PROBE_LEN // 512, lib.PROBE_LEN)


def _serve_reads(channel, data_for) -> list:
    """Take every queued message on ``channel``, then answer each READ with ``data_for(length)``."""
    headers = []
    while (raw := channel.read(_HEADER.size)) is not WOULD_BLOCK:
        headers.append(_HEADER.unpack(raw))
    for seq, _kind, _flags, _sector, length in headers:
        channel.write_all(_HEADER.pack(seq, 0, 0, 0, length) + data_for(length))
    return headers


def raw_model_cases() -> dict:
    """``beyond_reserve``, ``timer_per_message``, ``spent_timer_not_rearmed``, ``swap_write_killed`` on the model."""
    cases = {}
    target = KernelTarget(daemon_timeout=lib.LONG_TIMEOUT_MS / 1000)
    channel = target.open_channel()
    bios = [target.submit(_probe(i), now=0.0) for i in range(lib.BEYOND_RESERVE)]
    headers = _serve_reads(channel, bytes)
    channel.close()
    outcomes = {_result(bio) for bio in bios}
    cases["beyond_reserve"] = {"result": outcomes.pop() if len(outcomes) == 1 else sorted(outcomes),
                               "taken": len({h[0] for h in headers})}

    timeout = lib.SHORT_TIMEOUT_MS / 1000
    target = KernelTarget(daemon_timeout=timeout)
    first = target.submit(_probe(0), now=0.0)
    second = target.submit(_probe(1), now=lib.SECOND_AFTER)
    target.advance(timeout)
    pending = not second.done
    target.advance(lib.SECOND_AFTER + timeout)
    cases["timer_per_message"] = {"first": _result(first), "second_pending_then": pending,
                                  "second": _result(second)}

    target = KernelTarget(daemon_timeout=timeout)
    bio = target.submit(_probe(), now=0.0)
    channel = target.open_channel()  # at OPEN_AFTER
    target.advance(lib.OPEN_AFTER + lib.HOLD_OPEN)
    channel.close()
    target.advance(lib.OPEN_AFTER + lib.HOLD_OPEN + lib.CHECK_AFTER)
    pending = not bio.done
    _serve_reads(target.open_channel(), lambda length: lib.pattern(lib.RAW_SEED, length))
    outcome = {"pending_after_close": pending, "result": _result(bio)}
    if bio.done and not bio.error:
        outcome["sha"] = lib.sha(bytes(bio.data))
    cases["spent_timer_not_rearmed"] = outcome

    target = KernelTarget(daemon_timeout=lib.LONG_TIMEOUT_MS / 1000)
    channel = target.open_channel()
    bio = target.submit(Bio(RequestType.WRITE, 0, lib.PROBE_LEN, flags=int(Flag.SWAP), data=bytes(lib.PROBE_LEN)),
                        now=0.0)
    killed = bio.done and bio.error == errno.EIO and bio.seq is None
    cases["swap_write_killed"] = {"result": "killed" if killed else _result(bio),
                                  "forwarded": 0 if channel.read(_HEADER.size) is WOULD_BLOCK else 1}
    return cases
