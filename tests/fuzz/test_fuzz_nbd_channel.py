"""Storms on the NBD export's channel socket, against a served daemon (issue #21).

The channel socket (``.SOCKNAME.dmuserd/ch.sock``) is where the nbdkit plugin
speaks dm-user to the daemon (daemon/nbd.py, served by
daemon/channels.py ``serve_channel``). Any local process of the daemon's
uid can connect to it, so it gets raw hostile byte streams: headers with
every type (0..2**64-1), unknown flags, huge and unaligned lengths,
sectors at and past the device end and near 2**64, duplicate seqs, a
header cut short then closed, a WRITE whose payload stops short then
closed, garbage; valid requests mixed in.

What must hold, besides the daemon living on: the answers are a prefix of
the requests, in order (the plugin's channels are serial), each a
well-formed header (SUCCESS, ERROR or UNSUPPORTED, the request's seq),
READ data only after a successful READ and exactly ``len`` bytes of it;
nothing past the device's end succeeds; a READ of the data written before
the storm returns exactly that data. After the storm a real NBD client
(qemu-io through nbdkit) reads the data back too.
"""

from __future__ import annotations

import shutil
import subprocess
import threading

from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_lib import (
    HEADER, HEADER_SIZE, MiB, REF_DATA, REF_SIZE, SCRATCH, SIZE, U64, exchange, header, storm_settings,
)

SECTORS = SIZE // 512
#: types that change data if they run: they only ever aim at the scratch area or past the end
_MODIFYING = {1, 3, 4, 5, 6}
_TYPES = st.one_of(st.integers(0, 13), st.sampled_from([255, 2**31, 2**32 - 1, 2**32, 2**63, U64]),
                   st.integers(0, U64))
_FLAGS = st.one_of(st.just(0), st.sampled_from([0x200, 0x400, 0x8000, 0x600, 0x7FFF, 0x7FFF | 0x8000]),
                   st.integers(0, 63).map(lambda b: 1 << b), st.integers(0, U64))
_LENGTHS = st.one_of(
    st.sampled_from([0, 1, 511, 512, 4096, 65536, 1 * MiB, 32 * MiB, 32 * MiB + 512, 2**32, 2**63, U64,
                     SIZE, SIZE + 512]),
    st.integers(0, 256).map(lambda n: n * 512),
    st.integers(0, U64),
)
_EDGE_SECTORS = st.sampled_from([SECTORS - 1, SECTORS, SECTORS + 1, (U64 // 512), (U64 // 512) + 1, U64 - 1, U64,
                                 2**55 - 1, 2**55, 2**63])
_SCRATCH_SECTORS = st.integers(SCRATCH // 512, SECTORS - 1)
_ANY_SECTORS = st.one_of(st.integers(0, SECTORS + 8), _EDGE_SECTORS, st.integers(0, U64))


@st.composite
def hostile_frames(draw):
    """One message with hostile fields, framed as the daemon will read it."""
    type_ = draw(_TYPES)
    length = draw(_LENGTHS)
    sector = draw(st.one_of(_SCRATCH_SECTORS, _EDGE_SECTORS) if type_ in _MODIFYING else _ANY_SECTORS)
    flags = draw(_FLAGS)
    if type_ == 1 and length > 1 * MiB:
        length = draw(st.integers(0, 2048)) * 512  # sendable; the huge ones are tails (below)
    return {"type": type_, "flags": flags, "sector": sector, "len": length, "fill": draw(st.integers(0, 255)),
            "valid": False}


@st.composite
def valid_frames(draw):
    """A request the daemon must serve: READ anywhere in the device, WRITE in the scratch area."""
    if draw(st.booleans()):
        start = draw(st.integers(0, REF_SIZE // 512 - 1))
        count = draw(st.integers(0, min(256, REF_SIZE // 512 - start)))
        return {"type": 0, "flags": draw(st.sampled_from([0, 0x200, 0x400, 0x800])), "sector": start,
                "len": count * 512, "fill": 0, "valid": True}
    start = draw(st.integers(SCRATCH // 512, SECTORS - 1))
    count = draw(st.integers(0, min(256, SECTORS - start)))
    return {"type": 1, "flags": draw(st.sampled_from([0, 0x200, 0x400])), "sector": start, "len": count * 512,
            "fill": draw(st.integers(0, 255)), "valid": True}


@st.composite
def streams(draw):
    """A channel's whole byte stream: framed messages, then maybe a broken tail; and how it ends."""
    frames = draw(st.lists(st.one_of(valid_frames(), hostile_frames()), min_size=0, max_size=8))
    seqs = st.one_of(st.integers(0, 2**16), st.sampled_from([0, U64, 2**63]), st.integers(0, U64))
    for frame in frames:
        frame["seq"] = draw(seqs)
    if len(frames) > 1 and draw(st.booleans()):  # a duplicate seq
        frames[draw(st.integers(1, len(frames) - 1))]["seq"] = frames[0]["seq"]
    tail = draw(st.one_of(
        st.just(b""),
        st.binary(min_size=1, max_size=39),  # a header cut short
        st.builds(lambda seq, n, cut: header(seq, 1, 0, SCRATCH // 512, n) + b"\xee" * min(cut, n - 1),
                  st.integers(0, U64), st.sampled_from([512, 4096, 1 * MiB, 32 * MiB, 2**40]),
                  st.integers(0, 4095)),  # a WRITE whose payload stops short
        st.builds(lambda seq, t, rest: header(seq, t) + rest, st.integers(0, U64), st.integers(13, U64),
                  st.binary(max_size=300)),  # a header no daemon takes, then garbage
    ))
    end = draw(st.sampled_from(["shutdown", "shutdown", "shutdown", "close", "reset"]))
    cuts = draw(st.lists(st.integers(0, 4096), max_size=3))
    return frames, tail, end, cuts


def _message(frame: dict) -> bytes:
    """The frame's header, and for a WRITE its payload (``len`` bytes of ``fill``)."""
    payload = bytes([frame["fill"]]) * frame["len"] if frame["type"] == 1 else b""
    return header(frame["seq"], frame["type"], frame["flags"], frame["sector"], frame["len"]) + payload


def _encode(frames, tail: bytes, cuts) -> list[bytes]:
    data = b"".join(_message(f) for f in frames)
    data += tail
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)]) if b > a]


def _check_answers(frames, received: bytes, in_slot=None) -> None:
    """The answers: a prefix of the frames, in order, well formed (see the module doc).

    ``in_slot(frame)``: for a slotted channel (test_fuzz_nbd_shm_channel), where
    a successful READ's data is if not on the socket (None: it is on the socket);
    its data is checked against the reference when ``frame["checked"]`` says so.
    """
    pos = 0
    answered = 0
    for frame in frames:
        if pos == len(received):
            break
        assert len(received) - pos >= HEADER_SIZE, f"an answer header was cut off: {received[pos:]!r}"
        seq, rtype, _flags, _sector, _length = HEADER.unpack_from(received, pos)
        pos += HEADER_SIZE
        assert seq == frame["seq"], f"answer {answered} has seq {seq}, its request {frame['seq']}"
        assert rtype in (0, 1, 2), f"answer to seq {seq} has type {rtype}"
        kind, offset, length = frame["type"], frame["sector"] * 512, frame["len"]
        is_flush = kind == 2 or (kind == 1 and length == 0)
        if rtype == 0 and not is_flush:
            assert offset + length <= SIZE, f"a request past the end succeeded: {frame}"
        if kind == 0 and rtype == 0:
            data = None if in_slot is None else in_slot(frame)
            if data is None:
                data = received[pos: pos + length]
                pos += length
            assert len(data) == length, f"READ seq {seq}: {len(data)} of {length} bytes"
            if offset + length <= REF_SIZE and frame.get("checked", True):
                assert data == REF_DATA[offset: offset + length], f"READ seq {seq} at {offset}+{length}: wrong data"
        if frame["valid"]:
            assert rtype == 0, f"a valid request was refused: {frame} -> {rtype}"
        answered += 1
    assert pos == len(received), f"{len(received) - pos} bytes after the last answer"
    first_hostile = next((i for i, f in enumerate(frames) if not f["valid"]), len(frames))
    assert answered >= first_hostile, f"only {answered} answers, but the first {first_hostile} requests were valid"


def _one_channel(daemon, stream) -> None:
    frames, tail, end, cuts = stream
    received, _ = exchange(daemon.channel_socket(), _encode(frames, tail, cuts), end=end)
    if end == "shutdown":
        _check_answers(frames, received)


def test_nbd_channel_storm(nbd_daemon):
    """One hostile channel per example."""
    daemon = nbd_daemon
    before = daemon.rejected()

    @storm_settings(ci=250, fuzz=4000)
    @given(streams())
    # the review's killer: WRITE_SAME made Dispatcher.handle raise KeyError
    @example(([{"seq": 1, "type": 5, "flags": 0, "sector": SCRATCH // 512, "len": 4096, "fill": 0,
                "valid": False}], b"", "shutdown", []))
    @example(([{"seq": 1, "type": 11, "flags": 0, "sector": 0, "len": 0, "fill": 0, "valid": False}],
              b"", "shutdown", []))  # a zone type
    @example(([], header(7, 1, 0, SCRATCH // 512, 32 * MiB) + b"\xee" * 100, "shutdown", []))
    @example(([], b"\x01" * 39, "reset", []))
    def storm(stream):
        daemon.run_example(_one_channel, daemon, stream)

    storm()
    daemon.check_after_storm(surfaces=("nbd-channel",), before=before)
    if shutil.which("qemu-img"):
        # the real NBD path (client → nbdkit → plugin → channel) still serves the data
        copy = daemon.workdir / "copy.img"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", daemon.nbd_uri, str(copy)],
                       check=True, capture_output=True, timeout=120)
        assert copy.read_bytes()[:REF_SIZE] == REF_DATA


def test_nbd_channel_crowd(nbd_daemon):
    """Many hostile channels at once (threads), valid requests among them."""
    daemon = nbd_daemon

    @storm_settings(ci=10, fuzz=150)
    @given(st.lists(streams(), min_size=2, max_size=24))
    def storm(crowd):
        def run_all():
            errors = []

            def one(stream):
                try:
                    _one_channel(daemon, stream)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=one, args=(s,)) for s in crowd]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]

        daemon.run_example(run_all)

    storm()
    daemon.check_after_storm()
