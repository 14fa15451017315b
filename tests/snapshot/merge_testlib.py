"""Helpers for the merge tests: torture COW files (overlapping Copy chains,
Xor ops, Replace/Zero runs), a storage that loses unsynced writes at a
power cut, and the COW file's merge state read back from disk."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import threading
from pathlib import Path

from cow_helpers import BS, merge_in_place, pattern_block, write
from dmuserd.snapshot._cow_tools import render_cow
from dmuserd.snapshot.cow import CowReader, CowWriter, xor_bytes
from dmuserd.snapshot.merge import MergeIO


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def torture_cow(tmp: Path, seed: int, *, nblocks: int = 512, version: int = 2, compression: str = "none",
                buffer_size: int = 64 << 10, factor: int | None = None) -> dict:
    """Write ``base.img``, ``target.img`` and ``t.cow`` under ``tmp``.

    The COW has every hard case of an in-place merge: Copy chains (new block
    s+i copies base block s+i+1, itself overwritten by the next op of the
    chain), chains running across scratch windows, Xor ops reading their
    own block and unaligned Xor ops reading a neighbour another op
    overwrites later, Copies whose source a later Replace/Zero overwrites,
    and Replace/Zero runs. The ops are listed as sequence data in a safe
    order; the target is computed by the reference in-place merge and
    checked against the view's rendering of base + COW.
    """
    rng = random.Random(seed)
    base = bytearray(b"".join(pattern_block(rng.randrange(1 << 40)) for _ in range(nblocks)))
    taken: set[int] = set()

    def claim(start: int, n: int) -> bool:
        if start < 0 or start + n > nblocks or any(b in taken for b in range(start, start + n)):
            return False
        taken.update(range(start, start + n))
        return True

    ordered: list[tuple] = []  # ("copy", new, src) / ("xor", new, src_offset, data)
    # Xor ops first: they read their own block (and, unaligned, the next one,
    # which a chain below may overwrite later in the order)
    for _ in range(nblocks // 40):
        x = rng.randrange(nblocks - 2)
        if not claim(x, 1):
            continue
        off = rng.choice([0, rng.randrange(1, BS)])
        src = x * BS + off
        new = bytearray(base[src : src + BS])
        i = rng.randrange(BS - 64)
        new[i : i + 64] = rng.randbytes(64)
        ordered.append(("xor", x, src, xor_bytes(bytes(new), bytes(base[src : src + BS]))))
    # Copy chains: s+i <- s+i+1, the last one reading a block nobody writes before it
    for _ in range(nblocks // 64):
        length = rng.randrange(3, 40)
        s = rng.randrange(nblocks - length - 1)
        if not claim(s, length):
            continue
        ordered.extend(("copy", s + i, s + i + 1) for i in range(length))
    # scattered Copies from anywhere (their sources may be Replace/Zero targets later)
    for _ in range(nblocks // 16):
        b = rng.randrange(nblocks)
        if claim(b, 1):
            ordered.append(("copy", b, rng.randrange(nblocks)))
    # drop ordered ops that would read a block an earlier ordered op wrote
    written: set[int] = set()
    safe = []
    for op in ordered:
        reads = {op[2]} if op[0] == "copy" else {op[2] // BS, (op[2] + BS - 1) // BS}
        if reads & written:
            taken.discard(op[1])
            continue
        safe.append(op)
        written.add(op[1])
    ordered = safe
    # Replace and Zero runs over what is left
    rest: list[tuple] = []
    b = 0
    while b < nblocks:
        n = rng.randrange(1, 24)
        kind = rng.randrange(4)
        run = [k for k in range(b, min(b + n, nblocks)) if k not in taken]
        if kind == 0 and run:
            rest.append(("zero", run))
        elif kind == 1 and run:
            rest.append(("replace", run, [bytes([rng.randrange(3)]) * BS if rng.random() < 0.5
                                          else rng.randbytes(BS) for _ in run]))
        taken.update(run)
        b += n + rng.randrange(0, 6)
    path = tmp / "t.cow"
    options = dict(version=version, compression=compression, buffer_size=buffer_size)
    if version == 3:
        options.update(op_count_max=nblocks, compression_factor=factor)
    with CowWriter(path, **options) as w:
        w.add_sequence_data([op[1] for op in ordered])
        for op in ordered:
            if op[0] == "copy":
                w.add_copy(op[1], op[2])
            else:
                w.add_xor(op[1], op[3], op[2])
        for item in rest:
            for run in _contiguous(item[1]):
                if item[0] == "zero":
                    w.add_zero(run[0], len(run))
                else:
                    data = dict(zip(item[1], item[2]))
                    w.add_replace(run[0], b"".join(data[k] for k in run))
        w.finalize()
    write(tmp / "base.img", bytes(base))
    target = merge_in_place(bytes(base), path)
    write(tmp / "target.img", target)
    render_cow(tmp / "base.img", path, tmp / "rendered.img", progress=False)
    assert (tmp / "rendered.img").read_bytes() == target, "the torture COW's merge order is not safe"
    os.unlink(tmp / "rendered.img")
    with CowReader(path) as reader:
        counts = reader.counts()
        total_ops = len(reader.data_ops)
    return {"base": tmp / "base.img", "target": tmp / "target.img", "cow": path, "counts": counts,
            "total_ops": total_ops,
            "target_sha": hashlib.sha256(target).hexdigest(), "base_bytes": bytes(base), "target_bytes": target}


def _contiguous(blocks):
    run: list[int] = []
    for b in blocks:
        if run and b != run[-1] + 1:
            yield run
            run = []
        run.append(b)
    if run:
        yield run


def merge_progress(cow) -> tuple[int, int]:
    """(num_merge_ops, scratch state byte) as the COW file on disk says."""
    with open(cow, "rb") as f:
        head = f.read(80)
    header_size = struct.unpack_from("<H", head, 12)[0]
    return struct.unpack_from("<Q", head, 26)[0], head[header_size]


class PowerCut(Exception):
    """The simulated power cut (raised from inside the merge's I/O)."""


class PowerCutIO(MergeIO):
    """A :class:`MergeIO` whose storage loses unsynced writes at a power cut.

    The ``crash_at``-th I/O call (a read, a write or an fsync; counted from 1)
    raises :class:`PowerCut` instead of running. Until an ``fsync`` of a
    file, its written blocks are "dirty": :meth:`power_cut` puts each dirty
    block back to what it held at the last sync, or (``keep_some``) keeps a
    random half, as a page cache written back in no particular order would.
    Durability is per 512-byte sector, the unit a disk writes atomically.
    The merge calls it from two threads at once (a commit's syncs beside
    reads), so each call, power cut included, runs under a lock: the
    calls stay counted one by one and the storage changes atomically.
    """

    SECTOR = 512

    def __init__(self, base_fd: int, cow_fd: int, *, crash_at: int | None = None, seed: int = 0,
                 keep_some: bool = False, lose: bool = True) -> None:
        super().__init__(base_fd, cow_fd)
        self.crash_at = crash_at
        self.calls = 0
        self.dirty: dict[str, dict[int, bytes]] = {"base": {}, "cow": {}}
        self.rng = random.Random(seed)
        self.keep_some = keep_some
        self.lose = lose  # False: a process kill, the page cache keeps every write
        self._lock = threading.Lock()

    def _tick(self) -> None:
        self.calls += 1
        if self.crash_at is not None and self.calls >= self.crash_at:
            if self.calls == self.crash_at:
                self.power_cut()
            raise PowerCut(f"power cut at I/O call {self.crash_at}")

    # MergeIO's pread/pwrite go through these two, so every call is one tick
    def preadv(self, which, views, offset):
        with self._lock:
            self._tick()
            return super().preadv(which, views, offset)

    def pwritev(self, which, views, offset):
        with self._lock:
            self._tick()
            s = self.SECTOR
            fd = self.fds[which]
            length = sum(len(v) for v in views)
            for sector in range(offset // s, (offset + length + s - 1) // s):
                if sector not in self.dirty[which]:
                    self.dirty[which][sector] = os.pread(fd, s, sector * s)
            super().pwritev(which, views, offset)

    def fsync(self, which):
        with self._lock:
            self._tick()
            super().fsync(which)
            self.dirty[which].clear()

    def power_cut(self) -> None:
        for which, sectors in self.dirty.items():
            if not self.lose:
                sectors.clear()
                continue
            for sector, old in sectors.items():
                if self.keep_some and self.rng.random() < 0.5:
                    continue
                os.pwrite(self.fds[which], old, sector * self.SECTOR)
            sectors.clear()


async def interrupt_in_window(t: dict, base, cow) -> int:
    """Copy ``t``'s base and COW to ``base``/``cow`` and stop a merge of them
    (a process kill: no write lost) while it overwrites the base under a
    durable scratch window, after at least one Copy chain's source block was
    overwritten. Returns the I/O call it stopped at."""
    import shutil

    from dmuserd.snapshot.merge import merge_cow

    pristine = t["base_bytes"]
    for crash_at in range(1, 10_000):
        shutil.copy(t["base"], base)
        shutil.copy(t["cow"], cow)

        def make_io(base_fd, cow_fd, crash_at=crash_at):
            return PowerCutIO(base_fd, cow_fd, crash_at=crash_at, lose=False)

        try:
            await merge_cow(base, cow, offload="cpu", io_class=make_io)
        except PowerCut:
            pass
        else:
            break
        if merge_progress(cow)[1] != 2:
            continue
        now = Path(base).read_bytes()
        changed = [b for b in range(len(now) // BS) if now[b * BS : (b + 1) * BS] != pristine[b * BS : (b + 1) * BS]]
        # a block changed that the target does not have yet at another place: a chain's source
        if any(t["target_bytes"][(b - 1) * BS : b * BS] == pristine[b * BS : (b + 1) * BS] for b in changed if b):
            return crash_at
    raise AssertionError("no interruption point inside a scratch window was found")
