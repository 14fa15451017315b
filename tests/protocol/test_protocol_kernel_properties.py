"""Properties of the kernel model: any order, any chunking, exactly once."""

from __future__ import annotations

import errno
import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from dmuserd.protocol import (
    MESSAGE_POOL_RESERVE,
    WOULD_BLOCK,
    Bio,
    BioState,
    DaemonConnection,
    NEED_DATA,
    KernelTarget,
    RequestType,
    Response,
    ResponseType,
)
from protocol_testlib import pack, pattern, read_into, unpack

KINDS = [RequestType.READ, RequestType.WRITE, RequestType.FLUSH, RequestType.DISCARD]


@st.composite
def bio_specs(draw, max_size=20):
    return draw(
        st.lists(
            st.tuples(st.sampled_from(KINDS), st.integers(0, 8), st.booleans()),  # kind, blocks, error?
            min_size=1,
            max_size=max_size,
        )
    )


def make_bio(i, kind, blocks, completions):
    length = blocks * 512 if kind is not RequestType.FLUSH else 0
    data = pattern(length, i) if kind is RequestType.WRITE else None
    return Bio(kind, i * 8, length, data=data, on_complete=completions.append)


def response_bytes(bio: Bio, fail: bool) -> bytes:
    """The answer, packed with struct from the spec (not by the library)."""
    if fail:
        return pack(bio.seq, ResponseType.ERROR)
    payload = pattern(bio.length, 100 + bio.seq) if bio.type is RequestType.READ else b""
    return pack(bio.seq, ResponseType.SUCCESS, 0, bio.sector, bio.length) + payload


def check_outcomes(bios, fails, completions):
    assert sorted(map(id, completions)) == sorted(map(id, bios))  # each exactly once
    for bio, fail in zip(bios, fails):
        assert bio.state is BioState.DONE
        assert bio.error == (errno.EIO if fail else 0)
        if bio.type is RequestType.READ and not fail:
            assert bytes(bio.data) == pattern(bio.length, 100 + bio.seq)


@settings(max_examples=200, deadline=None)
@given(
    specs=bio_specs(),
    data=st.data(),
    read_sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=10),
    write_sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=10),
)
def test_any_response_order_and_chunking_completes_each_bio_once(specs, data, read_sizes, write_sizes):
    target = KernelTarget()
    chan = target.open_channel()
    completions = []
    bios = [target.submit(make_bio(i, k, n, completions), now=0.0) for i, (k, n, _) in enumerate(specs)]
    fails = [f for (_, _, f) in specs]
    conn = DaemonConnection()
    requests = read_into(chan, conn, itertools.cycle(read_sizes))
    assert [r.seq for r in requests] == [b.seq for b in bios]
    for request, bio in zip(requests, bios):
        assert request.payload == (bio.data if bio.type is RequestType.WRITE else None)
    order = data.draw(st.permutations(range(len(bios))))
    stream = b"".join(response_bytes(bios[i], fails[i]) for i in order)
    # Arbitrary chunks, each written until the channel took all of it.
    sizes = itertools.cycle(write_sizes)
    view = memoryview(stream)
    while len(view):
        chunk = view[: next(sizes)]
        while len(chunk):
            taken = chan.write(chunk)
            assert 0 < taken <= len(chunk)
            chunk, view = chunk[taken:], view[taken:]
    check_outcomes(bios, fails, completions)
    assert target.outstanding == 0 and chan.awaiting == 0


@settings(max_examples=100, deadline=None)
@given(
    specs=bio_specs(max_size=30),
    n_channels=st.integers(1, 4),
    data=st.data(),
)
def test_interleaved_channels_any_order(specs, n_channels, data):
    """Several channels take messages in a random interleaving, answer on
    their own channel in a random global order and random chunks."""
    target = KernelTarget()
    chans = [target.open_channel() for _ in range(n_channels)]
    completions = []
    bios = [target.submit(make_bio(i, k, n, completions), now=0.0) for i, (k, n, _) in enumerate(specs)]
    fails = {b.seq: f for b, (_, _, f) in zip(bios, specs)}
    by_seq = {b.seq: b for b in bios}
    owner = {}
    # Each channel reads whole messages, the channel chosen at random per message.
    partial = {c: bytearray() for c in chans}
    while target.queued or any(partial.values()):
        c = data.draw(st.sampled_from(chans))
        raw = c.read(data.draw(st.integers(1, 5000)))
        if raw is WOULD_BLOCK:
            continue
        partial[c] += raw
        buf = partial[c]
        if len(buf) >= 40:
            seq, kind, _, _, length = unpack(buf)
            if len(buf) == 40 + (length if kind == RequestType.WRITE else 0):
                owner[seq] = c
                partial[c] = bytearray()
    assert set(owner) == set(by_seq)
    # Responses in any global order; each channel's bytes go out in chunks.
    order = data.draw(st.permutations(sorted(owner)))
    pending = {c: bytearray() for c in chans}
    for seq in order:
        pending[owner[seq]] += response_bytes(by_seq[seq], fails[seq])
    while any(pending.values()):
        c = data.draw(st.sampled_from([c for c in chans if pending[c]]))
        n = data.draw(st.integers(1, 3000))
        taken = c.write(bytes(pending[c][:n]))
        assert 0 < taken <= n
        del pending[c][:taken]
    check_outcomes(bios, [fails[b.seq] for b in bios], completions)


@settings(max_examples=30, deadline=None)
@given(total=st.integers(MESSAGE_POOL_RESERVE + 1, 3 * MESSAGE_POOL_RESERVE), seed=st.integers(0, 2**32))
def test_beyond_the_reserve_exactly_once(total, seed):
    rng = random.Random(seed)
    target = KernelTarget()
    chan = target.open_channel()
    completions = []
    bios = [target.submit(Bio(RequestType.FLUSH, 0, 0, on_complete=completions.append), now=0.0) for _ in range(total)]
    assert target.outstanding == total and target.queued == total
    awaiting = []
    while len(completions) < total:
        while (raw := chan.read(40)) is not WOULD_BLOCK:
            awaiting.append(unpack(raw)[0])
        rng.shuffle(awaiting)
        for seq in awaiting[: rng.randint(1, len(awaiting))]:
            assert chan.write(pack(seq, ResponseType.SUCCESS)) == 40
            awaiting.remove(seq)
        assert target.outstanding == total - len(completions)
    assert len({id(b) for b in completions}) == total
    assert all(b.error == 0 for b in bios)
    assert sorted(b.seq for b in bios) == list(range(total))


@settings(max_examples=100, deadline=None)
@given(specs=bio_specs(), data=st.data())
def test_close_at_any_point_fails_exactly_what_the_channel_owned(specs, data):
    target = KernelTarget()
    keeper = target.open_channel()
    chan = target.open_channel()
    completions = []
    bios = [target.submit(make_bio(i, k, n, completions), now=0.0) for i, (k, n, _) in enumerate(specs)]
    # Read a random number of bytes, answer a random prefix of the bytes owed.
    conn = DaemonConnection()
    budget = data.draw(st.integers(0, sum(40 + b.length for b in bios)))
    while budget > 0:
        raw = chan.read(min(budget, data.draw(st.integers(1, 5000))))
        if raw is WOULD_BLOCK:
            break
        budget -= len(raw)
        conn.receive_data(raw)
    requests = []
    while (event := conn.next_event()) is not NEED_DATA:
        requests.append(event)
    answers = bytearray()
    for request in requests:
        payload = pattern(request.len, 1) if request.type is RequestType.READ else None
        for buf in conn.send_response(Response(request.seq, ResponseType.SUCCESS, payload)):
            answers += buf
    cut = data.draw(st.integers(0, len(answers)))
    view = memoryview(bytes(answers[:cut]))
    while len(view):
        view = view[chan.write(view) :]
    finished = {id(b) for b in completions}
    chan.close()
    for bio in bios:
        if id(bio) in finished:
            assert bio.error == 0
        elif bio.state is BioState.DONE:
            assert bio.error == errno.EIO  # owned by the closed channel
        else:
            assert bio.state is BioState.QUEUED  # never taken: still there for keeper
    assert len(completions) == len({id(b) for b in completions})
    # Whatever remains is served by the other channel.
    rest = [b for b in bios if not b.done]
    conn2 = DaemonConnection()
    for request in read_into(keeper, conn2, itertools.repeat(4096)):
        payload = pattern(request.len, 1) if request.type is RequestType.READ else None
        for buf in conn2.send_response(Response(request.seq, ResponseType.SUCCESS, payload)):
            keeper.write_all(buf)
    assert all(b.done and b.error == 0 for b in rest)
