"""The dispatcher's admission and draining (issue #20): the bound per target,
``close_admission()``, ``drained``, and a daemon stop with requests in flight.

Everything here is real (the daemon, its dispatcher, a memory backend); the
backend only lets a test hold its reads at a gate to make requests stay in
flight.
"""

from __future__ import annotations

import pytest
import structlog
import trio
import trio.testing
from peak_backend import PeakReads

from dmuserd.backends.memory import MemoryBackend
from dmuserd.daemon.config import DaemonSpec, TargetSpec
from dmuserd.daemon.dispatcher import Dispatcher, Refused
from dmuserd.daemon.runtime import Daemon
from dmuserd.protocol import Flag, Request, RequestType, ResponseType

R, W, FLUSH = RequestType.READ, RequestType.WRITE, RequestType.FLUSH


def _req(seq: int, kind: RequestType = R, sector: int = 0, length: int = 4096, data=None) -> Request:
    return Request(seq, kind, Flag(0), sector, length, data)


class Gated(MemoryBackend):
    """Reads wait at ``gate``; ``events`` records reads and flushes in the order they complete."""

    def __init__(self, size: int = 1 << 20) -> None:
        super().__init__(size)
        self.gate = trio.Event()
        self.waiting = 0
        self.events: list[str] = []

    async def read(self, offset, length):
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        self.events.append("read")
        return await super().read(offset, length)

    async def flush(self):
        self.events.append("flush")
        await super().flush()


async def _wait_until(condition) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.001)


async def test_the_bound_holds_under_many_concurrent_requests():
    backend = PeakReads(1 << 20, delay=0.001)
    dispatcher = Dispatcher(backend, name="t", max_in_flight=5)
    answers = []

    async def one(i: int) -> None:
        answers.append((await dispatcher.handle(_req(i, sector=(i % 64) * 8))).type)

    async with trio.open_nursery() as nursery:
        for i in range(300):
            nursery.start_soon(one, i)
    assert backend.peak == 5
    assert answers == [ResponseType.SUCCESS] * 300
    assert dispatcher.stats.in_flight == 0 and dispatcher.has_room
    assert not dispatcher.drained.is_set()  # admission is still open


async def test_waiters_are_served_first_come_first_served():
    backend = Gated()
    dispatcher = Dispatcher(backend, name="t", max_in_flight=1)
    started = []

    async def one(i: int) -> None:
        response = await dispatcher.handle(_req(i))
        started.append((i, response.type))

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(one, i)
            await trio.testing.wait_all_tasks_blocked()
        assert dispatcher.stats.in_flight == 1 and backend.waiting == 1
        backend.gate.set()
    assert [i for i, _ in started] == list(range(6))
    assert {t for _, t in started} == {ResponseType.SUCCESS}


async def test_close_admission_refuses_new_and_waiting_requests_and_lets_running_ones_finish():
    backend = Gated()
    dispatcher = Dispatcher(backend, name="t", max_in_flight=2)
    answers: dict[int, object] = {}

    async def one(i: int) -> None:
        answers[i] = await dispatcher.handle(_req(i))

    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            for i in range(5):  # 0 and 1 run (held at the gate), 2 to 4 wait for a slot
                nursery.start_soon(one, i)
                await trio.testing.wait_all_tasks_blocked()
            assert backend.waiting == 2
            dispatcher.close_admission()
            dispatcher.close_admission()  # (twice is once)
            assert not dispatcher.admitting and not dispatcher.drained.is_set()
            late = await dispatcher.handle(_req(99))
            assert type(late) is Refused and late.type == ResponseType.ERROR and late.seq == 99
            backend.gate.set()
            with trio.fail_after(10):
                await dispatcher.drained.wait()
    assert {i: answers[i].type for i in range(5)} == {0: ResponseType.SUCCESS, 1: ResponseType.SUCCESS,
                                                      2: ResponseType.ERROR, 3: ResponseType.ERROR,
                                                      4: ResponseType.ERROR}
    assert all(type(answers[i]) is Refused for i in (2, 3, 4))
    stats = dispatcher.stats.as_dict()
    assert stats["refused"] == 4 and stats["in_flight"] == 0 and stats["errors"] == 0
    closed = [e for e in logs if e["event"].startswith("admission closed")]
    assert len(closed) == 1 and closed[0]["in_flight"] == 2 and closed[0]["waiting"] == 3


async def test_drained_is_set_at_once_when_nothing_runs():
    dispatcher = Dispatcher(MemoryBackend(1 << 20), name="t")
    assert (await dispatcher.handle(_req(1))).type == ResponseType.SUCCESS
    assert not dispatcher.drained.is_set()
    dispatcher.close_admission()
    assert dispatcher.drained.is_set()


async def test_a_cancelled_waiter_gives_back_nothing_it_did_not_hold():
    backend = Gated()
    dispatcher = Dispatcher(backend, name="t", max_in_flight=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher.handle, _req(1))
        await _wait_until(lambda: backend.waiting == 1)
        with trio.move_on_after(0.05) as scope:
            await dispatcher.handle(_req(2))  # waits for the one slot, then is cancelled
        assert scope.cancelled_caught
        assert dispatcher.stats.in_flight == 1 and not dispatcher._waiters
        backend.gate.set()
    assert dispatcher.stats.in_flight == 0
    assert (await dispatcher.handle(_req(3))).type == ResponseType.SUCCESS


async def test_admitted_shares_the_slots_the_order_and_the_stop_with_handle():
    """admitted() (what is not a block operation: NBD's BLOCK_STATUS) waits behind handle's requests for a slot and
    in turn, holds it until its block ends (a request waiting meanwhile runs only then), keeps drained unset while
    held, and yields False at once after close_admission, counted refused."""
    backend = Gated()
    dispatcher = Dispatcher(backend, name="t", max_in_flight=1)
    order: list[str] = []

    async def query(release: trio.Event) -> None:
        async with dispatcher.admitted() as admitted:
            assert admitted
            order.append("query")
            await release.wait()

    async def read() -> None:
        await dispatcher.handle(_req(2))
        order.append("read 2")

    release = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher.handle, _req(1))
        await _wait_until(lambda: backend.waiting == 1)
        nursery.start_soon(query, release)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert order == [] and len(dispatcher._waiters) == 2  # both wait for the one slot, in arrival order
        backend.gate.set()
        await _wait_until(lambda: order == ["query"])
        assert dispatcher.stats.in_flight == 1 and len(dispatcher._waiters) == 1  # read 2 waits for the query
        dispatcher.close_admission()  # read 2 is refused; the query runs on
        assert not dispatcher.drained.is_set()
        release.set()
    assert order == ["query", "read 2"]
    assert dispatcher.drained.is_set() and dispatcher.stats.in_flight == 0
    async with dispatcher.admitted() as admitted:
        assert admitted is False
    assert dispatcher.stats.refused == 2


def test_the_bound_must_be_positive():
    with pytest.raises(ValueError, match="max_in_flight"):
        Dispatcher(MemoryBackend(1 << 20), max_in_flight=0)


async def test_a_stop_with_requests_in_flight_lets_them_finish_then_flushes(tmp_path):
    """The daemon's stop: admission closes, what runs finishes, then the flush, then the run ends."""
    daemon = Daemon(DaemonSpec([]), control_socket=str(tmp_path / "control.sock"))  # (it keeps the run going)
    backend = Gated()
    answers = []
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        target = await daemon.add_target(TargetSpec("t", "memory", {}, []), backend=backend)
        dispatcher = target.dispatcher
        assert (await dispatcher.handle(_req(0, W, 0, 4096, b"\x07" * 4096))).type == ResponseType.SUCCESS

        async def one(i: int) -> None:
            answers.append(await dispatcher.handle(_req(i)))

        for i in range(1, 4):
            nursery.start_soon(one, i)
        await _wait_until(lambda: backend.waiting == 3)
        stopped = trio.Event()

        async def stop() -> None:
            await daemon.stop()
            stopped.set()

        nursery.start_soon(stop)
        await _wait_until(lambda: not dispatcher.admitting)
        refused = await dispatcher.handle(_req(9))
        assert refused.type == ResponseType.ERROR
        await trio.testing.wait_all_tasks_blocked()
        assert not stopped.is_set() and "flush" not in backend.events  # the stop waits for the three reads
        backend.gate.set()
        with trio.fail_after(10):
            await stopped.wait()
    assert [a.type for a in answers] == [ResponseType.SUCCESS] * 3
    assert [a.payload for a in answers] == [b"\x07" * 4096] * 3
    assert backend.events[:4] == ["read", "read", "read", "flush"]  # flushed after the last one finished
    status = target.status()
    assert status["refused"] == 1 and status["in_flight"] == 0
