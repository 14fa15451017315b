"""End to end: KernelTarget channels pumped into DaemonConnections serving a
tiny in-memory backend, several channels, random chunk sizes, random order.

The daemon bounds its own concurrency (``max_in_flight``: the kernel has no
cap), and with a small ``max_io`` the longer READs and WRITEs come out as
:class:`OversizedRequest` and fail alone, the stream going on.
"""

from __future__ import annotations

import errno
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmuserd.protocol import (
    NEED_DATA,
    WOULD_BLOCK,
    Bio,
    DaemonConnection,
    Flag,
    KernelTarget,
    OversizedRequest,
    RequestType,
    Response,
    ResponseType,
)

SECTORS = 64
DEVICE = SECTORS * 512


class Worker:
    """One daemon thread: its channel, its connection, its unsent answers."""

    def __init__(self, target: KernelTarget, backend: bytearray, rng: random.Random, max_io: int) -> None:
        self.channel = target.open_channel()
        self.conn = DaemonConnection(max_io=max_io)
        self.backend = backend
        self.rng = rng
        self.pending: list[list] = []  # answers computed, not yet queued for writing
        self.outbox = bytearray()  # answer bytes being written
        self.served = 0

    def read(self) -> bool:
        data = self.channel.read(self.rng.randint(1, 6000))
        if data is WOULD_BLOCK:
            return False
        self.conn.receive_data(data)
        while (request := self.conn.next_event()) is not NEED_DATA:
            self.pending.append(self.conn.send_response(self.serve(request)))
        return True

    def serve(self, request) -> Response:
        if type(request) is OversizedRequest:
            assert request.len > self.conn.max_io
            return Response(request.seq, ResponseType.ERROR)
        start, end = request.offset, request.offset + request.len
        assert end <= DEVICE
        if request.type is RequestType.READ:
            return Response(request.seq, ResponseType.SUCCESS, bytes(self.backend[start:end]))
        if request.type is RequestType.WRITE:
            self.backend[start:end] = request.payload
        return Response(request.seq)  # WRITE, flush (WRITE+PREFLUSH, len 0), FLUSH

    def queue_one(self) -> bool:
        if not self.pending:
            return False
        buffers = self.pending.pop(self.rng.randrange(len(self.pending)))  # any order
        for buf in buffers:
            self.outbox += buf
        return True

    def write(self) -> bool:
        if not self.outbox:
            return False
        n = self.rng.randint(1, 3000)
        taken = self.channel.write(bytes(self.outbox[:n]))
        assert 0 < taken <= n
        del self.outbox[:taken]
        return True


def run(seed: int, n_channels: int, n_bios: int, max_in_flight: int, max_io: int = DEVICE) -> None:
    rng = random.Random(seed)
    target = KernelTarget()
    backend = bytearray(DEVICE)
    shadow = bytearray(DEVICE)  # what the device must hold once all is done
    workers = [Worker(target, backend, rng, max_io) for _ in range(n_channels)]
    in_flight: list[tuple[Bio, range, bytes | None]] = []
    checked = []
    completions = []
    submitted = 0

    def overlaps(span: range) -> bool:
        return any(span.start < other.stop and other.start < span.stop for _, other, _ in in_flight)

    def submit() -> bool:
        nonlocal submitted
        blocks = rng.randint(1, 8)
        sector = rng.randrange(0, SECTORS - blocks + 1)
        span = range(sector * 512, (sector + blocks) * 512)
        kind = rng.choice(["read", "write", "fua", "flush"])
        if kind == "flush":
            bio = Bio(RequestType.WRITE, 0, 0, flags=int(Flag.PREFLUSH), data=b"")
            span, expect = range(0), None
        elif overlaps(span):  # like a file system: no overlapping I/O in flight
            return False
        elif kind == "read":
            bio, expect = Bio(RequestType.READ, sector, len(span)), bytes(shadow[span.start : span.stop])
        else:
            data = rng.randbytes(len(span))
            flags = int(Flag.FUA) if kind == "fua" else 0
            bio, expect = Bio(RequestType.WRITE, sector, len(span), flags=flags, data=data), None
            if len(span) <= max_io:  # an oversized write fails and changes nothing
                shadow[span.start : span.stop] = data
        bio.on_complete = completions.append
        in_flight.append((bio, span, expect))
        target.submit(bio, now=0.0)
        submitted += 1
        return True

    steps = 0
    while submitted < n_bios or in_flight:
        steps += 1
        assert steps < 200_000, "no progress"
        action = rng.randrange(4)
        if action == 0 and submitted < n_bios:
            submit()
        else:
            worker = rng.choice(workers)
            step = [worker.read, worker.queue_one, worker.write][rng.randrange(3)]
            if step != worker.read or sum(w.conn.outstanding for w in workers) < max_in_flight:
                step()
        assert sum(w.conn.outstanding for w in workers) <= max_in_flight
        for entry in [e for e in in_flight if e[0].done]:
            bio, _, expect = entry
            assert bio.error == (errno.EIO if bio.length > max_io else 0), bio
            if expect is not None and not bio.error:
                assert bytes(bio.data) == expect
            checked.append(bio)
            in_flight.remove(entry)
    assert backend == shadow
    assert len(checked) == n_bios == len(completions) == len({id(b) for b in completions})
    assert target.outstanding == 0 and target.queued == 0
    assert all(w.conn.outstanding == 0 and w.channel.awaiting == 0 for w in workers)
    for w in workers:
        w.channel.close()
    assert target.daemon_terminated


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    n_channels=st.integers(1, 4),
    n_bios=st.integers(1, 60),
    max_in_flight=st.sampled_from([1, 3, 128]),
    max_io=st.sampled_from([DEVICE, 2048]),
)
def test_end_to_end_random(seed, n_channels, n_bios, max_in_flight, max_io):
    run(seed, n_channels, n_bios, max_in_flight, max_io)


@pytest.mark.parametrize("seed", range(3))
def test_end_to_end_many_bios_default_limit(seed):
    run(seed, n_channels=4, n_bios=400, max_in_flight=128)


@pytest.mark.parametrize("seed", range(3))
def test_end_to_end_oversized_requests_fail_alone(seed):
    run(seed, n_channels=3, n_bios=300, max_in_flight=16, max_io=2048)
