"""Storms on the NBD export's slotted channel socket (``shm.sock``), against a served daemon.

The slotted socket is where the plugin moves data through the daemon's
shared pool (``daemon/nbd_shm.py``, framing in ``protocol/_shm.py``): the
daemon announces the pool (a memfd) on each new channel, then every request
header is followed by a slot word. Any local process of the daemon's uid
can connect and get the pool, so the storms send the nbd-channel storms'
hostile streams (``test_fuzz_nbd_channel``) with hostile slot words on top:
indexes past the pool and up to 2**64-1, slots on FLUSH/DISCARD/zone
requests, lengths over a slot, slots another request holds.

What must hold, besides the daemon living on: the answers are a prefix of
the requests, in order, well formed; a successful READ that named a slot
carries no bytes on the socket and leaves exactly the device's data in its
slot, one without a slot carries its ``len`` bytes; nothing past the end
succeeds; refusals are counted (``protocol-slot``, ``protocol-len``), for
the channel that sent them only. After the storm a real NBD client
(through nbdkit and its own slotted channels) reads the data back.
"""

from __future__ import annotations

import mmap
import os
import shutil
import socket
import struct
import subprocess

from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_lib import REF_DATA, REF_SIZE, U64, exchange, header, storm_settings
from test_fuzz_nbd_channel import _check_answers, streams

WORD = struct.Struct("<Q")
ANNOUNCEMENT = struct.Struct("<4Q")  # magic, version, slots, slot_size
NO_SLOT = U64
#: Slots the storm's valid requests use, one per frame: channels that end
#: with a half-close use the first window, the others (closed or reset while
#: the daemon may still hold their slots) the second; hostile frames never
#: name either, so a valid request never meets a slot an earlier example holds.
CHECKED, LOOSE, WINDOW = 48, 56, 8
#: Successful READs whose data was checked in their slot (the storm must have some).
_slot_reads_checked = [0]


def _pool(daemon):
    """The pool the daemon announces on a new slotted channel: (mapping, slots, slot_size)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.state_dir() / "shm.sock"))
        data, fds, _flags, _addr = socket.recv_fds(sock, ANNOUNCEMENT.size, 1, socket.MSG_WAITALL)
    assert len(fds) == 1, "the announcement came without the pool's descriptor"
    magic, version, slots, slot_size = ANNOUNCEMENT.unpack(data)
    assert (magic.to_bytes(8, "little"), version) == (b"dmuserdP", 1)
    assert slots >= LOOSE + WINDOW, f"the storm needs {LOOSE + WINDOW} slots, the pool has {slots}"
    try:
        return mmap.mmap(fds[0], slots * slot_size), slots, slot_size
    finally:
        os.close(fds[0])


@st.composite
def slotted_streams(draw, slots: int):
    """A hostile stream (see test_fuzz_nbd_channel) with a slot word for every frame."""
    frames, tail, end, cuts = draw(streams())
    window = CHECKED if end == "shutdown" else LOOSE
    hostile_slot = st.one_of(st.just(NO_SLOT), st.integers(0, CHECKED - 1), st.integers(slots, slots + 4),
                             st.sampled_from([2**32, 2**63, U64 - 1]), st.integers(slots, U64 - 1))
    for i, frame in enumerate(frames):
        if frame["valid"]:
            frame["slot"] = draw(st.sampled_from([window + i, NO_SLOT]))
        else:
            frame["slot"] = draw(hostile_slot)
    return frames, tail, end, cuts


def _message(frame: dict, pool: mmap.mmap, slot_size: int) -> bytes:
    head = header(frame["seq"], frame["type"], frame["flags"], frame["sector"], frame["len"]) + WORD.pack(frame["slot"])
    if frame["type"] != 1:
        return head
    data = bytes([frame["fill"]]) * frame["len"]
    if frame["slot"] == NO_SLOT:
        return head + data
    if frame["valid"] and frame["len"] <= slot_size:
        pool[frame["slot"] * slot_size:frame["slot"] * slot_size + frame["len"]] = data
    return head  # a hostile WRITE naming a slot writes whatever the slot holds (to the scratch area)


def _in_slot(pool: mmap.mmap, slot_size: int):
    """Where a successful READ's data is: its slot's first ``len`` bytes, or None (on the socket)."""

    def data(frame):
        if frame["slot"] == NO_SLOT:
            return None
        slot, length = frame["slot"], frame["len"]
        assert slot < len(pool) // slot_size and length <= slot_size, f"a bad slot was taken: {frame}"
        # Only the valid frames' slots are this channel's alone (see CHECKED).
        frame["checked"] = frame["valid"]
        _slot_reads_checked[0] += frame["valid"] and length > 0
        return pool[slot * slot_size:slot * slot_size + length]

    return data


def _one_channel(daemon, stream, pool, slot_size) -> None:
    frames, tail, end, cuts = stream
    data = b"".join(_message(f, pool, slot_size) for f in frames) + tail
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)]) if b > a]
    received, _ = exchange(daemon.state_dir() / "shm.sock", chunks, end=end)
    # The channel's first bytes are the pool announcement (its descriptor, unread, is dropped).
    assert received[:8] == b"dmuserdP" or not received, f"no pool announcement: {received[:40]!r}"
    if end == "shutdown":
        _check_answers(frames, received[ANNOUNCEMENT.size:], _in_slot(pool, slot_size))


def test_nbd_slotted_channel_storm(nbd_daemon):
    daemon = nbd_daemon
    before = daemon.rejected()
    pool, slots, slot_size = _pool(daemon)

    @storm_settings(ci=200, fuzz=4000)
    @given(slotted_streams(slots))
    @example(([{"seq": 1, "type": 0, "flags": 0, "sector": 0, "len": 4096, "fill": 0, "valid": False,
                "slot": slots}], b"", "shutdown", []))  # one past the last slot
    @example(([{"seq": 1, "type": 2, "flags": 0, "sector": 0, "len": 0, "fill": 0, "valid": False,
                "slot": 3}], b"", "shutdown", []))  # a FLUSH naming a slot
    @example(([{"seq": 1, "type": 0, "flags": 0, "sector": 0, "len": 2 * (1 << 20), "fill": 0, "valid": False,
                "slot": 3}], b"", "shutdown", []))  # longer than a slot
    def storm(stream):
        daemon.run_example(_one_channel, daemon, stream, pool, slot_size)

    storm()
    daemon.check_after_storm(surfaces=("nbd-channel",), before=before)
    rejected = daemon.rejected()["nbd-channel"]
    assert rejected.get("protocol-slot", 0) > 0 and rejected.get("protocol-len", 0) > 0, rejected
    assert _slot_reads_checked[0] > 0, "no READ through a slot was checked"
    if shutil.which("qemu-img"):
        copy = daemon.workdir / "copy.img"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", daemon.nbd_uri, str(copy)],
                       check=True, capture_output=True, timeout=120)
        assert copy.read_bytes()[:REF_SIZE] == REF_DATA
