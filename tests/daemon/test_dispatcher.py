"""The dispatcher, driven through the in-process kernel model (no FUSE)."""

from __future__ import annotations

import errno

import pytest
import trio

from peak_backend import PeakReads

from dmuserd.backends import Backend
from dmuserd.backends.memory import MemoryBackend
from dmuserd.daemon.dispatcher import Dispatcher
from dmuserd.daemon.emulated import EmulatedDmUser
from dmuserd.protocol import Flag, Request, RequestType, ResponseType


class Recorder(MemoryBackend):
    """A memory backend that records the order of calls."""

    def __init__(self, size=1 << 20, block_size=512):
        super().__init__(size, block_size)
        self.calls = []

    async def write(self, offset, data, fua=False):
        self.calls.append(("write", offset, len(data), fua))
        await super().write(offset, data, fua)

    async def flush(self):
        self.calls.append(("flush",))


class ReadOnly(Backend):
    def __init__(self):
        super().__init__(size=1 << 20)

    async def read(self, offset, length):
        return bytes(length)


async def _device(nursery, backend):
    device = EmulatedDmUser(Dispatcher(backend, name="t"), channels=2)
    await nursery.start(device.run)
    return device


async def test_read_write_round_trip_and_stats():
    backend = Recorder()
    async with trio.open_nursery() as nursery:
        dev = await _device(nursery, backend)
        await dev.submit(RequestType.WRITE, 4096, 4096, data=b"q" * 4096)
        assert bytes(await dev.submit(RequestType.READ, 4096, 4096)) == b"q" * 4096
        stats = dev.dispatcher.stats
        assert stats.requests["write"] == 1 and stats.requests["read"] == 1
        assert stats.bytes_written == stats.bytes_read == 4096
        nursery.cancel_scope.cancel()


async def test_preflush_fua_and_zero_length_flush():
    backend = Recorder()
    async with trio.open_nursery() as nursery:
        dev = await _device(nursery, backend)
        await dev.submit(RequestType.WRITE, 0, 512, data=b"a" * 512, flags=Flag.PREFLUSH | Flag.FUA)
        assert backend.calls == [("flush",), ("write", 0, 512, True)]
        backend.calls.clear()
        await dev.submit(RequestType.WRITE, 0, 0, data=b"", flags=Flag.PREFLUSH)  # 6.1's flush
        await dev.submit(RequestType.FLUSH, 0, 0)
        assert backend.calls == [("flush",), ("flush",)]
        assert dev.dispatcher.stats.requests["flush"] == 2
        nursery.cancel_scope.cancel()


async def test_flush_waits_for_nothing_but_covers_completed_writes():
    backend = Recorder()
    async with trio.open_nursery() as nursery:
        dev = await _device(nursery, backend)
        async with trio.open_nursery() as writers:
            for i in range(20):
                writers.start_soon(lambda i=i: dev.submit(RequestType.WRITE, i * 512, 512, data=bytes([i]) * 512))
        await dev.submit(RequestType.FLUSH, 0, 0)
        # Every write that completed before the flush was issued precedes it.
        assert backend.calls[-1] == ("flush",)
        assert sum(1 for c in backend.calls if c[0] == "write") == 20
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "kind,offset,length,why",
    [
        (RequestType.READ, (1 << 20) - 512, 1024, "beyond the end"),
        (RequestType.WRITE, 1 << 20, 512, "beyond the end"),
        (RequestType.READ, 512, 512, "misaligned to a 4096-byte block"),
    ],
)
async def test_out_of_range_and_misaligned_fail_alone(kind, offset, length, why):
    backend = Recorder(block_size=4096)
    async with trio.open_nursery() as nursery:
        dev = await _device(nursery, backend)
        data = b"x" * length if kind == RequestType.WRITE else None
        with pytest.raises(OSError) as excinfo:
            await dev.submit(kind, offset, length, data=data)
        assert excinfo.value.errno == errno.EIO, why
        assert dev.dispatcher.stats.errors == 1
        # The device is still up.
        assert bytes(await dev.submit(RequestType.READ, 0, 4096)) == bytes(4096)
        nursery.cancel_scope.cancel()


async def test_unsupported_ops_fail_and_are_counted():
    async with trio.open_nursery() as nursery:
        dev = await _device(nursery, ReadOnly())
        for kind in (RequestType.WRITE, RequestType.DISCARD, RequestType.WRITE_ZEROES):
            data = b"x" * 512 if kind == RequestType.WRITE else None
            with pytest.raises(OSError):
                await dev.submit(kind, 0, 512, data=data)
        assert dev.dispatcher.stats.unsupported == 3
        assert dev.dispatcher.stats.errors == 0
        nursery.cancel_scope.cancel()


async def test_flush_of_a_backend_that_takes_no_writes_succeeds():
    """Nothing can be pending on a read-only backend: fsync must not fail with EIO."""
    async with trio.open_nursery() as nursery:
        dev = await _device(nursery, ReadOnly())
        await dev.submit(RequestType.FLUSH, 0, 0)
        await dev.submit(RequestType.WRITE, 0, 0, data=b"", flags=Flag.PREFLUSH)  # the 6.1 kernel's flush
        assert dev.dispatcher.stats.requests["flush"] == 2
        assert dev.dispatcher.stats.unsupported == dev.dispatcher.stats.errors == 0
        nursery.cancel_scope.cancel()


async def test_flush_of_a_writable_backend_without_flush_is_unsupported():
    class NoFlush(Backend):
        def __init__(self):
            super().__init__(size=1 << 20)

        async def read(self, offset, length):
            return bytes(length)

        async def write(self, offset, data, fua=False):
            pass

    async with trio.open_nursery() as nursery:
        dev = await _device(nursery, NoFlush())
        with pytest.raises(OSError):
            await dev.submit(RequestType.WRITE, 0, 0, data=b"", flags=Flag.PREFLUSH)
        assert dev.dispatcher.stats.unsupported == 1
        nursery.cancel_scope.cancel()


async def test_backend_exception_fails_one_request():
    class Flaky(MemoryBackend):
        async def read(self, offset, length):
            if offset == 8192:
                raise RuntimeError("disk on fire")
            return await super().read(offset, length)

    async with trio.open_nursery() as nursery:
        dev = await _device(nursery, Flaky(1 << 20))
        results = {}

        async def read(offset):
            try:
                results[offset] = bytes(await dev.submit(RequestType.READ, offset, 4096))
            except OSError as exc:
                results[offset] = exc.errno

        async with trio.open_nursery() as readers:
            for offset in range(0, 8 * 4096, 4096):
                readers.start_soon(read, offset)
        assert results.pop(8192) == errno.EIO
        assert all(v == bytes(4096) for v in results.values())
        nursery.cancel_scope.cancel()


async def test_bounded_concurrency():
    """No more than max_in_flight requests reach the backend at once."""

    backend = PeakReads()
    async with trio.open_nursery() as nursery:
        device = EmulatedDmUser(Dispatcher(backend, name="t", max_in_flight=8), channels=4)
        await nursery.start(device.run)
        async with trio.open_nursery() as readers:
            for i in range(64):
                readers.start_soon(device.submit, RequestType.READ, (i % 256) * 512, 512)
        assert backend.peak == 8
        nursery.cancel_scope.cancel()


async def test_scattered_read_is_the_backends_pieces():
    backend = MemoryBackend(1 << 20)
    await backend.write(0, bytes(range(256)) * 2048)
    dispatcher = Dispatcher(backend, name="t")
    request = Request(3, RequestType.READ, Flag(0), 100, 256 * 1024)
    joined = await dispatcher.handle(request)
    scattered = await dispatcher.handle(request, views=True)
    assert type(scattered.payload) is list and len(scattered.payload) > 1
    assert b"".join(scattered.payload) == joined.payload == (bytes(range(256)) * 2048)[51200 : 51200 + 256 * 1024]
    assert dispatcher.stats.bytes_read == 2 * 256 * 1024
    small = await dispatcher.handle(Request(6, RequestType.READ, Flag(0), 0, 4096), views=True)
    assert type(small.payload) is list and len(small.payload) == 1 and small.payload[0] == bytes(range(256)) * 16
    # a view of the backend's memory, not a copy: a later write shows in it
    await backend.write(0, b"\xff" * 512)
    assert bytes(small.payload[0][:512]) == b"\xff" * 512


async def test_scattered_read_of_the_wrong_size_fails_alone():
    class Short(MemoryBackend):
        async def read_views(self, offset, length):
            views = await super().read_views(offset, length)
            return views[:-1] if offset == 0 else views

    dispatcher = Dispatcher(Short(1 << 20), name="t")
    response = await dispatcher.handle(Request(4, RequestType.READ, Flag(0), 0, 128 * 1024), views=True)
    assert response.type == ResponseType.ERROR and dispatcher.stats.errors == 1
    assert (await dispatcher.handle(Request(5, RequestType.READ, Flag(0), 8, 128 * 1024), views=True)).type == ResponseType.SUCCESS


async def test_request_counts_by_operation():
    """Counted per type; a WRITE of length 0 (the kernel's flush) counts as a flush; unserved types as other."""
    dispatcher = Dispatcher(Recorder(), name="t")
    kinds = [(RequestType.WRITE, 8, 512, b"w" * 512), (RequestType.WRITE, 0, 0, None), (RequestType.FLUSH, 0, 0, None),
             (RequestType.READ, 0, 512, None), (RequestType.READ, 8, 512, None), (RequestType.DISCARD, 0, 512, None),
             (RequestType.SECURE_ERASE, 0, 512, None), (RequestType.ZONE_OPEN, 0, 0, None),
             (RequestType.WRITE_SAME, 0, 512, None)]
    answers = [await dispatcher.handle(Request(seq, kind, Flag(0), sector, length, payload))
               for seq, (kind, sector, length, payload) in enumerate(kinds)]
    assert [a.seq for a in answers] == list(range(len(kinds)))
    assert [a.type for a in answers].count(ResponseType.UNSUPPORTED) == 2  # the zone op and WRITE_SAME
    stats = dispatcher.stats
    assert stats.requests == {"read": 2, "write": 1, "flush": 2, "discard": 1, "secure_erase": 1, "write_zeroes": 0,
                              "other": 2}
    assert stats.total_requests == len(kinds) and stats.as_dict()["requests"] == stats.requests
