"""Storms on the dm-user channel, through the kernel model, in this process (issue #21).

The daemon's side of dm-user (a Dispatcher over a memory backend, served by
:class:`~dmuserd.daemon.emulated.EmulatedDmUser`: the kernel model
:class:`~dmuserd.protocol.KernelTarget` with an inline channel and four
background channels, each served by ``serve_channel``, exactly what a FUSE
export runs) lives in a trio loop of its own thread for the whole test.
Two storms feed it:

* hostile BIOs, submitted as the block layer would, concurrently: every
  request type (zone types too), any flags, sectors and lengths at and past
  the device's end, not aligned to its 4 KiB blocks, zero-length, larger
  than any daemon buffer. Each BIO completes (data or EIO, nothing else,
  never a hang), a BIO past the end never succeeds, a READ of the data
  written before the storm returns it, a valid WRITE succeeds, and no BIO
  the kernel can send costs the device a channel;
* raw bytes, as if read from ``/dev/dm-user/NAME``, fed to ``serve_channel``
  through a fake transport (serial or not, scatter or not, a peer that goes
  away while answers are due): ``serve_channel`` returns, never raises; the
  answers are well formed and answer requests that were sent, each once.

A subprocess is not needed here: no socket reaches the dm-user channel, and
the daemon runs this very code for ``/dev/dm-user`` (daemon/dmuser.py) and
for FUSE (daemon/fuse.py). After each storm: the loop still runs the
device, the data reads back, no log event carries a traceback or an
internal error, and the guard counted the refused input.
"""

from __future__ import annotations

import errno
import inspect
import threading
import traceback

import pytest
import structlog
import trio
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_lib import HANG_SECONDS, HEADER, HEADER_SIZE, MiB, REF_DATA, REF_SIZE, SCRATCH, SIZE, U64, Hang, header, \
    storm_settings
from dmuserd.backends.memory import MemoryBackend
from dmuserd.daemon.channels import serve_channel
from dmuserd.daemon.dispatcher import Dispatcher
from dmuserd.daemon.emulated import EmulatedDmUser
from dmuserd.protocol import ALL_FLAGS, FORWARDED_TYPES, RequestType

BLOCK = 4096
CHANNELS = 4
#: The flags dm-user.c forwards (the model kills a BIO with any other bit).
FORWARDED_FLAGS = 0x3FFF | 0x8000
#: The largest BIO the block layer builds (bi_size is 32 bits), sector-aligned.
MAX_BIO = (1 << 32) - 512
#: A log event that shows a bug.
_BUG_WORDS = ("traceback", "internal error", "internal-error", "handler failed")


def _is_bug_event(event: dict) -> bool:
    if event.get("exc_info") or event.get("exception") or event.get("log_level") == "critical":
        return True
    text = " ".join(str(v) for v in event.values()).lower()
    return any(word in text for word in _BUG_WORDS)


class ModelDaemon:
    """The daemon's side of one dm-user target, served in a trio loop of its own thread."""

    def __init__(self) -> None:
        self.crash: BaseException | None = None
        self.token = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model daemon", daemon=True)
        self._thread.start()
        if not self._ready.wait(60) or self.token is None:
            raise AssertionError(f"the in-process daemon did not start: {self.crash!r}")
        self.call(self._submit_checked, RequestType.WRITE, 0, REF_SIZE, REF_DATA)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - reported by call()
            self.crash = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        backend = MemoryBackend(SIZE, BLOCK)
        self.guard = None
        if "guard" in inspect.signature(Dispatcher).parameters:
            from dmuserd.daemon.guard import Guard

            self.guard = Guard()
            self.dispatcher = Dispatcher(backend, name="disk", guard=self.guard)
        else:  # a daemon from before issue #21's guard
            self.dispatcher = Dispatcher(backend, name="disk")
        self.device = EmulatedDmUser(self.dispatcher, channels=CHANNELS)
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.device.run)
            self.token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    @property
    def running(self) -> bool:
        return self.crash is None and self._thread.is_alive()

    def call(self, afn, *args):
        """Run ``afn(*args)`` in the daemon's loop; a hang, or the loop's end, fails loudly."""

        async def bounded():
            with trio.fail_after(HANG_SECONDS):
                return await afn(*args)

        try:
            return trio.from_thread.run(bounded, trio_token=self.token)
        except trio.TooSlowError:
            raise Hang(f"nothing completed in {HANG_SECONDS:g} s") from None
        except (trio.RunFinishedError, trio.Cancelled):
            self._thread.join(10)
            raise AssertionError("the in-process daemon's loop ended (a task crashed its nursery):\n"
                                 + "".join(traceback.format_exception(self.crash))) from None

    def stop(self) -> None:
        if self.running:
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(30)

    async def _submit_checked(self, kind, offset, length, data=None, flags=0):
        result = await self.device.submit(kind, offset, length, data=data, flags=flags)
        assert kind != RequestType.READ or bytes(result) == REF_DATA[offset: offset + length]

    def counts(self) -> dict:
        return self.guard.as_dict() if self.guard is not None else {}

    def channels_open(self) -> int:
        return len(self.device.target.channels)


class Storm:
    """The daemon a storm runs against, replaced by a fresh one after an example that failed.

    So an example that hangs or breaks the device fails alone, and the next
    one (hypothesis shrinking the failure, say) meets a healthy daemon.
    """

    def __init__(self, events: list) -> None:
        self.events = events
        self.events_seen = 0
        self.daemon = ModelDaemon()

    def run_example(self, fn, *args) -> None:
        try:
            fn(self.daemon, *args)
            _after_example(self)
        except BaseException:
            self.daemon.stop()
            self.events_seen = len(self.events)
            self.daemon = ModelDaemon()
            raise


@pytest.fixture
def storm_daemon():
    """A :class:`Storm` with structlog's events captured; its daemon stopped after the test."""
    with structlog.testing.capture_logs() as events:
        storm = Storm(events)
        yield storm
        storm.daemon.stop()


def _after_example(storm: Storm) -> None:
    """The loop still runs the device, and no new log event shows a bug."""
    daemon = storm.daemon
    assert daemon.running, "the in-process daemon stopped:\n" + "".join(traceback.format_exception(daemon.crash))
    new = storm.events[storm.events_seen:]
    storm.events_seen = len(storm.events)
    bugs = [e for e in new if _is_bug_event(e)]
    assert not bugs, f"log events that show a bug: {bugs[:5]}"


def _after_storm(storm: Storm, surface: str | None) -> None:
    _after_example(storm)
    daemon = storm.daemon

    async def read_back():
        return bytes(await daemon.device.submit(RequestType.READ, 0, REF_SIZE))

    assert daemon.call(read_back) == REF_DATA, "the data written before the storm changed"
    assert daemon.channels_open() == CHANNELS + 1, (
        f"{CHANNELS + 1 - daemon.channels_open()} of the device's {CHANNELS + 1} channels were lost")
    counts = daemon.counts()
    internal = {s: r for s, r in counts.items() if r.get("internal-error")}
    assert not internal, f"the guard caught exceptions no handler expected: {internal}"
    if surface and daemon.guard is not None:
        assert sum(counts.get(surface, {}).values()) > 0, f"nothing was counted for {surface}: {counts}"


# -- hostile BIOs -----------------------------------------------------------------------------

_SECTORS = SIZE // 512
_EDGES = [_SECTORS - 1, _SECTORS, _SECTORS + 1, _SECTORS + 8, (1 << 54) - 1, (1 << 63) // 512 - 1]
_LENGTHS = st.one_of(
    st.sampled_from([0, 512, 1024, 3584, BLOCK, BLOCK + 512, 64 * 1024, 1 * MiB, 32 * MiB, 32 * MiB + 512,
                     33 * MiB, 256 * MiB, MAX_BIO]),
    st.integers(0, 64).map(lambda n: n * 512),
    st.integers(1, 8191),  # not a whole sector: the block layer never builds one
)
_FLAGS = st.one_of(st.just(0), st.sampled_from([0x200, 0x400, 0x8000, 0x600, FORWARDED_FLAGS]),
                   st.integers(0, 20).map(lambda b: 1 << b), st.integers(0, U64))
_MODIFYING = {RequestType.WRITE, RequestType.DISCARD, RequestType.SECURE_ERASE, RequestType.WRITE_SAME,
              RequestType.WRITE_ZEROES}


@st.composite
def bios(draw):
    """One BIO: ``(kind, sector, length, flags, valid)``; writes never aim at the reference data."""
    if draw(st.integers(0, 3)) == 0:  # a valid one: READ of the reference data, WRITE in the scratch area
        blocks = draw(st.integers(0, 16))
        if draw(st.booleans()):
            start = draw(st.integers(0, REF_SIZE // BLOCK - blocks)) * BLOCK
            return RequestType.READ, start // 512, blocks * BLOCK, 0, True
        start = draw(st.integers(SCRATCH // BLOCK, SIZE // BLOCK - blocks)) * BLOCK
        return RequestType.WRITE, start // 512, blocks * BLOCK, draw(st.sampled_from([0, 0x200])), True
    kind = draw(st.sampled_from(list(RequestType)))
    length = draw(_LENGTHS)
    if kind == RequestType.WRITE and length > 33 * MiB:
        length = 33 * MiB  # the payload is real memory
    if kind in _MODIFYING:
        sector = draw(st.one_of(st.integers(SCRATCH // 512, _SECTORS + 16), st.sampled_from(_EDGES)))
    else:
        sector = draw(st.one_of(st.integers(0, _SECTORS + 16), st.sampled_from(_EDGES)))
    return kind, sector, length, draw(_FLAGS), False


def _kernel_can_send(kind, sector, length, flags) -> bool:
    """Whether dm-user.c can deliver this BIO (the rest the model kills, or a kernel never builds)."""
    return (kind in FORWARDED_TYPES and not flags & ~FORWARDED_FLAGS and length % 512 == 0 and length <= MAX_BIO
            and sector * 512 + length < (1 << 63))


async def _submit_batch(daemon: ModelDaemon, batch) -> list:
    """Submit every BIO of ``batch`` at once; their outcomes: data, None, or the exception."""
    outcomes = [None] * len(batch)

    async def one(i, kind, sector, length, flags):
        data = bytes([i & 0xFF]) * length if kind == RequestType.WRITE else None
        try:
            outcomes[i] = ("ok", await daemon.device.submit(kind, sector * 512, length, data=data, flags=flags))
        except Exception as exc:  # noqa: BLE001 - judged below
            outcomes[i] = ("raised", exc)

    async with trio.open_nursery() as nursery:
        for i, (kind, sector, length, flags, _valid) in enumerate(batch):
            nursery.start_soon(one, i, kind, sector, length, flags)
    return outcomes


def _bio_storm(daemon: ModelDaemon, batch) -> None:
    channels = daemon.channels_open()
    outcomes = daemon.call(_submit_batch, daemon, batch)
    for (kind, sector, length, flags, valid), (how, value) in zip(batch, outcomes):
        what = f"{kind.name} sector {sector} len {length} flags {flags:#x}"
        if how == "raised":
            assert isinstance(value, OSError) and value.errno == errno.EIO, f"{what} raised {value!r}"
            assert not valid, f"the valid {what} failed: {value}"
            continue
        offset = sector * 512
        is_flush = kind == RequestType.FLUSH or (kind == RequestType.WRITE and length == 0)
        assert is_flush or offset + length <= SIZE, f"{what} succeeded past the end of the device"
        assert kind in FORWARDED_TYPES and not flags & ~ALL_FLAGS, f"{what} should have been killed"
        if kind == RequestType.READ:
            assert len(value) == length, f"{what} returned {len(value)} bytes"
            if offset + length <= REF_SIZE:
                assert bytes(value) == REF_DATA[offset: offset + length], f"{what} returned wrong data"
    realistic = all(_kernel_can_send(k, s, n, f) for k, s, n, f, _ in batch)
    if realistic:
        assert daemon.channels_open() == channels, (
            f"BIOs the kernel can send closed {channels - daemon.channels_open()} of the device's channels")


def test_dmuser_model_bio_storm(storm_daemon):
    storm_ = storm_daemon

    @storm_settings(ci=250, fuzz=4000)
    @given(st.lists(bios(), min_size=1, max_size=8))
    @example([(RequestType.WRITE_SAME, SCRATCH // 512, BLOCK, 0, False)])  # the review's KeyError
    @example([(RequestType.READ, 0, 64 * MiB, 0, False)])  # larger than any daemon buffer
    @example([(RequestType.DISCARD, _SECTORS, BLOCK, 0, False)] + [(RequestType.READ, 0, BLOCK, 0, True)])
    def storm(batch):
        storm_.run_example(_bio_storm, batch)

    storm()
    _after_storm(storm_, None)


# -- raw bytes on a channel ---------------------------------------------------------------------


class FakeTransport:
    """A channel for ``serve_channel``: hands out ``chunks``, then the end; keeps what is sent.

    ``gone_after``: the peer goes away after that many answers (sending
    raises, as a closed channel does); ``gone_error`` says how.
    """

    def __init__(self, chunks, *, serial: bool, scatter: bool, gone_after: int | None, gone_error: str) -> None:
        self._chunks = list(chunks)
        self.serial = serial
        self.scatter = scatter
        self.sent = bytearray()
        self.answers = 0
        self._gone_after = gone_after
        self._gone_error = gone_error

    async def receive_some(self, max_bytes: int):
        await trio.sleep(0)
        if not self._chunks:
            return b""
        chunk = self._chunks.pop(0)
        if len(chunk) > max_bytes:
            chunk, rest = chunk[:max_bytes], chunk[max_bytes:]
            self._chunks.insert(0, rest)
        return chunk

    async def send_all(self, buffers: list) -> None:
        await trio.sleep(0)
        if self._gone_after is not None and self.answers >= self._gone_after:
            if self._gone_error == "oserror":
                raise OSError(errno.EPIPE, "the peer went away")
            if self._gone_error == "broken":
                raise trio.BrokenResourceError("the peer went away")
            raise trio.ClosedResourceError("the channel was closed")
        self.sent += b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        self.answers += 1


_TYPES = st.one_of(st.integers(0, 13), st.sampled_from([2**32, 2**63, U64]), st.integers(0, U64))
_RAW_FLAGS = st.one_of(st.just(0), st.integers(0, 63).map(lambda b: 1 << b), st.integers(0, U64))
_RAW_LENGTHS = st.one_of(st.sampled_from([0, 1, 511, 512, BLOCK, 1 * MiB, 32 * MiB, 32 * MiB + 512, 2**63, U64]),
                         st.integers(0, 32).map(lambda n: n * 512), st.integers(0, U64))
_RAW_SECTORS = st.one_of(st.integers(0, _SECTORS + 8), st.sampled_from([U64 // 512, U64 // 512 + 1, U64]),
                         st.integers(0, U64))


@st.composite
def raw_frames(draw):
    if draw(st.integers(0, 3)) == 0:
        blocks = draw(st.integers(0, 8))
        if draw(st.booleans()):
            start = draw(st.integers(0, REF_SIZE // BLOCK - blocks)) * BLOCK // 512
            return {"type": 0, "flags": 0, "sector": start, "len": blocks * BLOCK, "valid": True}
        start = draw(st.integers(SCRATCH // BLOCK, SIZE // BLOCK - blocks)) * BLOCK // 512
        return {"type": 1, "flags": 0, "sector": start, "len": blocks * BLOCK, "valid": True}
    type_ = draw(_TYPES)
    length = draw(_RAW_LENGTHS)
    modifying = type_ in (1, 3, 4, 5, 6)
    sector = draw(st.integers(SCRATCH // 512, U64) if modifying else _RAW_SECTORS)
    if type_ == 1:
        length = min(length, 256 * 1024) if length <= 32 * MiB else draw(st.integers(0, 64)) * 512
    return {"type": type_, "flags": draw(_RAW_FLAGS), "sector": sector, "len": length, "valid": False}


@st.composite
def raw_channels(draw):
    frames = draw(st.lists(raw_frames(), max_size=10))
    for frame in frames:
        frame["seq"] = draw(st.one_of(st.integers(0, 64), st.sampled_from([U64, 2**63])))
    tail = draw(st.one_of(st.just(b""), st.binary(min_size=1, max_size=39),
                          st.builds(lambda t, rest: header(99, t) + rest, st.integers(13, U64), st.binary(max_size=200)),
                          st.builds(lambda n, cut: header(9, 1, 0, SCRATCH // 512, n) + b"\x11" * cut,
                                    st.sampled_from([BLOCK, 32 * MiB, 2**40]), st.integers(0, 100))))
    data = b"".join(header(f["seq"], f["type"], f["flags"], f["sector"], f["len"])
                    + (b"\xcd" * f["len"] if f["type"] == 1 else b"") for f in frames)
    data += tail
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=6))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)]) if b > a]
    gone_after = draw(st.one_of(st.none(), st.integers(0, 4)))
    return frames, chunks, {"serial": draw(st.booleans()), "scatter": draw(st.booleans()), "gone_after": gone_after,
                            "gone_error": draw(st.sampled_from(["oserror", "broken", "closed"]))}


def _check_raw_answers(frames, sent: bytes, serial: bool) -> int:
    """Parse what ``serve_channel`` sent; every answer answers a sent request, once. Returns the count."""
    pending: dict[int, list] = {}
    for frame in frames:
        pending.setdefault(frame["seq"], []).append(frame)
    pos, answered = 0, []
    while pos < len(sent):
        assert len(sent) - pos >= HEADER_SIZE, f"an answer was cut off: {sent[pos:]!r}"
        seq, rtype, _f, _s, _l = HEADER.unpack_from(sent, pos)
        pos += HEADER_SIZE
        assert pending.get(seq), f"an answer for seq {seq}, which no request had (or was answered already)"
        frame = pending[seq].pop(0)
        assert rtype in (0, 1, 2), f"answer type {rtype}"
        offset, length, kind = frame["sector"] * 512, frame["len"], frame["type"]
        is_flush = kind == 2 or (kind == 1 and length == 0)
        assert rtype != 0 or is_flush or offset + length <= SIZE, f"past the end, yet SUCCESS: {frame['type']}"
        if kind == 0 and rtype == 0:
            data = sent[pos: pos + length]
            assert len(data) == length, f"READ seq {seq}: {len(data)} of {length} bytes"
            if offset + length <= REF_SIZE:
                assert data == REF_DATA[offset: offset + length], f"READ seq {seq}: wrong data"
            pos += length
        if frame["valid"]:
            assert rtype == 0, f"a valid request got {rtype}: {frame}"
        answered.append(frame)
    if serial:
        assert answered == frames[: len(answered)], "a serial channel answered out of order"
    return len(answered)


def _raw_storm(daemon: ModelDaemon, case) -> None:
    frames, chunks, how = case
    transport = FakeTransport(chunks, **how)
    kwargs = {"name": "fuzz"}
    if "surface" in inspect.signature(serve_channel).parameters:
        kwargs["surface"] = "dm-user-channel"

    async def serve():
        await serve_channel(transport, daemon.dispatcher, **kwargs)

    daemon.call(serve)  # an exception here would have ended the daemon's nursery
    answered = _check_raw_answers(frames, bytes(transport.sent), how["serial"])
    if how["gone_after"] is None and len(set(f["seq"] for f in frames)) == len(frames):
        first_hostile = next((i for i, f in enumerate(frames) if not f["valid"]), len(frames))
        assert answered >= first_hostile, f"{answered} answers, but the first {first_hostile} requests were valid"


def test_dmuser_channel_raw_bytes(storm_daemon):
    storm_ = storm_daemon

    @storm_settings(ci=300, fuzz=5000)
    @given(raw_channels())
    @example(([{"seq": 1, "type": 5, "flags": 0, "sector": SCRATCH // 512, "len": BLOCK, "valid": False}],
              [header(1, 5, 0, SCRATCH // 512, BLOCK)],
              {"serial": False, "scatter": False, "gone_after": None, "gone_error": "closed"}))
    def storm(case):
        storm_.run_example(_raw_storm, case)

    storm()
    _after_storm(storm_, "dm-user-channel")
