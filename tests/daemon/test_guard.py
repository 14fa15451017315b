"""The guard around input surfaces (daemon/guard.py) and what uses it in-process.

The served-daemon checks are in test_hostile_inputs.py and tests/fuzz/;
these pin the mechanism: what it swallows, what it lets through, what it
counts, and the bounds of a channel.
"""

from __future__ import annotations

import errno
import struct

import pytest
import trio
from peak_backend import PeakReads

from dmuserd.backends.memory import MemoryBackend
from dmuserd.daemon.channels import MAX_IN_FLIGHT_PER_CHANNEL, serve_channel
from dmuserd.daemon.dispatcher import Dispatcher
from dmuserd.daemon.guard import INTERNAL, Guard, Rejected
from dmuserd.protocol import HEADER_SIZE, RequestType, ResponseType

HEADER = struct.Struct("<5Q")


def test_isolate_records_a_bug_and_goes_on():
    guard = Guard()
    with guard.isolate("s"):
        {}["missing"]  # noqa: B018 - a KeyError, as the review found in the dispatcher
    with guard.isolate("s"):
        raise Rejected("too-big", "a detail")
    assert guard.as_dict() == {"s": {INTERNAL: 1, "too-big": 1}}


def test_isolate_lets_cancellation_and_exit_through():
    guard = Guard()
    with pytest.raises(KeyboardInterrupt), guard.isolate("s"):
        raise KeyboardInterrupt
    assert guard.total == 0


def test_isolate_takes_the_exceptions_of_a_group_and_reraises_the_rest():
    guard = Guard()
    with pytest.raises(BaseExceptionGroup) as info, guard.isolate("s"):
        raise BaseExceptionGroup("g", [ValueError("x"), ExceptionGroup("h", [KeyError("y")]), KeyboardInterrupt()])
    assert [type(e) for e in info.value.exceptions] == [KeyboardInterrupt]
    assert guard.as_dict() == {"s": {INTERNAL: 2}}


class _Transport:
    """A channel's bytes from a list; what the daemon writes is kept."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sent: list[bytes] = []

    async def receive_some(self, max_bytes: int) -> bytes:
        await trio.sleep(0)
        chunk, self.data = self.data[:max_bytes], self.data[max_bytes:]
        return chunk

    async def send_all(self, buffers) -> None:
        self.sent.append(b"".join(bytes(b) for b in buffers))

    def answers(self) -> dict[int, int]:
        return {HEADER.unpack_from(a)[0]: HEADER.unpack_from(a)[1] for a in self.sent}


async def test_a_channel_has_at_most_its_share_of_requests_in_flight():
    backend = PeakReads()
    requests = b"".join(HEADER.pack(seq, RequestType.READ, 0, seq, 512) for seq in range(3 * MAX_IN_FLIGHT_PER_CHANNEL))
    transport = _Transport(requests)
    dispatcher = Dispatcher(backend, name="t")
    await serve_channel(transport, dispatcher, name="c")
    assert backend.peak == MAX_IN_FLIGHT_PER_CHANNEL
    assert len(transport.answers()) == 3 * MAX_IN_FLIGHT_PER_CHANNEL


async def test_a_protocol_error_ends_the_channel_after_answering_what_it_holds():
    class Slow(MemoryBackend):
        async def read(self, offset, length):
            await trio.sleep(0.01)
            return bytes(length)

    transport = _Transport(HEADER.pack(1, RequestType.READ, 0, 0, 512) + HEADER.pack(2, 42, 0, 0, 0)
                           + HEADER.pack(3, RequestType.READ, 0, 0, 512))
    dispatcher = Dispatcher(Slow(1 << 20), name="t")
    await serve_channel(transport, dispatcher, name="c", surface="test-channel")
    assert transport.answers() == {1: ResponseType.SUCCESS}  # 3 came after the break: never read
    assert dispatcher.guard.as_dict() == {"test-channel": {"protocol-type": 1}}


async def test_a_dispatcher_answer_the_protocol_cannot_carry_is_an_error_for_that_request():
    class Wrong(MemoryBackend):
        async def read(self, offset, length):
            import array

            return array.array("I", bytes(length))  # len() 128, 512 bytes: served, counted in bytes

    class Worse(MemoryBackend):
        async def read(self, offset, length):
            return memoryview(bytes(2 * length)).cast("H")  # len() == length, but twice the bytes

    for backend, expected in ((Wrong(1 << 20), ResponseType.SUCCESS), (Worse(1 << 20), ResponseType.ERROR)):
        transport = _Transport(HEADER.pack(1, RequestType.READ, 0, 0, 512) + HEADER.pack(2, RequestType.READ, 0, 8, 512))
        await serve_channel(transport, Dispatcher(backend, name="t"), name="c")
        assert transport.answers() == {1: expected, 2: expected}
        if expected == ResponseType.SUCCESS:
            assert all(len(a) == HEADER_SIZE + 512 for a in transport.sent)


async def test_a_bug_in_the_dispatcher_fails_one_request_and_is_counted():
    class Odd(MemoryBackend):
        @property
        def block_size(self):  # a backend bug the dispatcher trips over
            raise RuntimeError("no block size today")

        @block_size.setter
        def block_size(self, value):
            pass

    dispatcher = Dispatcher(Odd(1 << 20), name="t")
    transport = _Transport(HEADER.pack(1, RequestType.READ, 0, 0, 512) + HEADER.pack(2, RequestType.FLUSH, 0, 0, 0))
    await serve_channel(transport, dispatcher, name="c")
    assert transport.answers() == {1: ResponseType.ERROR, 2: ResponseType.SUCCESS}
    assert dispatcher.guard.as_dict() == {"dispatcher": {INTERNAL: 1}}


async def test_fuse_requests_answer_eio_for_a_bug_and_errno_for_an_oserror():
    pytest.importorskip("dmuserd.daemon._fuse_session", reason="the FUSE session extension was not built (libfuse3-dev)")
    from dmuserd.daemon import _fuse_session as fs
    from dmuserd.daemon.fuse import FuseMount, Operations, SessionLoop

    from dmuserd.daemon.direct import InProcessDevice
    from dmuserd.protocol import Response, ResponseType

    class Device(InProcessDevice):
        async def handle(self, req, views=False):
            if req.sector == 0:
                return Response(req.seq, ResponseType.ERROR)  # a failed BIO
            raise RuntimeError("a bug below the FUSE handler")

    class Answer:
        """Stands in for the session's Request (a mount answers for real in tests/fuzz/test_fuzz_fuse.py)."""

        def __init__(self):
            self.errno = None

        def error(self, code):
            self.errno = code

        def data(self, views):
            raise AssertionError("a failed read answered data")

    export = FuseMount("/nonexistent-mountpoint")
    export.add("disk", Device("disk"), 1 << 20, 512)
    loop = SessionLoop(None, Operations(export), None)
    inode = next(iter(export._files))
    for fh, offset, code in ((inode, 0, errno.EIO), (inode, 4096, errno.EIO), (inode + 99, 0, errno.ENOENT)):
        answer = Answer()
        await loop.serve((fs.READ, answer, fh, offset, 4096))
        assert answer.errno == code, (fh, offset)
    assert export.guard.as_dict() == {"fuse": {INTERNAL: 1}}
