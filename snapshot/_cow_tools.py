"""Make a COW file from two images, and apply one: create, render, verify.

``create_cow`` diffs a base and a target image block by block: unchanged
blocks get no op; a block whose content exists somewhere in the base
becomes a Copy (found by content hash, confirmed byte for byte); zero
blocks become Zero; with ``xor``, a block that differs from the same base
block in few bytes becomes an Xor; the rest are Replace.

Copies and Xors merge in place, so their order matters: an op must merge
before any op that overwrites its source block. Each ordered op reads one
block written by at most one other ordered op, so the constraints form a
functional graph; a topological sort orders it and each cycle is broken by
turning one member into a Replace (its data no longer depends on the base).
The order is written as sequence data and the ordered ops are written in
it, followed by the rest in block order, so AOSP's merge and ours agree.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import deque

from dmuserd.snapshot._cow_format import DEFAULT_BUFFER_SIZE, CowError, OpType
from dmuserd.snapshot._cow_reader import CowReader
from dmuserd.snapshot._cow_writer import CowWriter, xor_bytes
from dmuserd.snapshot.view import SnapshotView

_CHUNK = 1 << 20
_KEEP, _COPY, _REPLACE, _ZERO, _XOR = 0, int(OpType.COPY), int(OpType.REPLACE), int(OpType.ZERO), int(OpType.XOR)


class CowCreateError(CowError):
    """The images cannot be turned into a COW file as asked."""


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=disable, leave=False)


def _open(path) -> int:
    try:
        return os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CowCreateError(f"cannot open {path}: {exc.strerror}") from None


def create_cow(
    base,
    target,
    output,
    *,
    version: int = 2,
    compression="none",
    compression_level: int | None = None,
    block_size: int = 4096,
    xor: bool = False,
    compression_factor: int | None = None,
    cluster_ops: int | None = None,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    xor_max_diff: int | None = None,
    progress: bool | None = None,
    mover=None,
) -> dict:
    """Write ``output``, a COW file turning ``base`` into ``target``.

    Returns counts: ops per type, ``unchanged`` blocks, ``cycles_broken``
    (ordered ops turned into Replace to break a cycle), ``target_bytes``.
    ``mover`` (a :class:`~dmuserd.dsa_offload.BlockingMover`) compares the
    images chunk by chunk; without one, the CPU does. ``xor_max_diff`` is how many bytes of a block may differ for an Xor
    (default an eighth of the block). ``progress`` None: a tqdm bar when
    stderr is a terminal.
    """
    bs = block_size
    base_fd, target_fd = _open(base), _open(target)
    try:
        base_size = os.fstat(base_fd).st_size
        target_size = os.fstat(target_fd).st_size
        if target_size % bs:
            raise CowCreateError(f"target {target} is {target_size} bytes, not a multiple of the {bs}-byte block size")
        with _progress(base_size + target_size, "cow create", progress) as bar:
            by_hash = _hash_base(base_fd, base_size, bs, bar)
            kinds, sources = _plan(base_fd, target_fd, base_size, target_size, bs, by_hash, xor,
                                   bs // 8 if xor_max_diff is None else xor_max_diff, bar, mover)
        del by_hash
        sequence, broken = _order(kinds, sources)
        stats = {t.name.lower(): kinds.count(int(t)) for t in (OpType.COPY, OpType.REPLACE, OpType.ZERO, OpType.XOR)}
        stats.update(unchanged=kinds.count(_KEEP), cycles_broken=broken, target_bytes=target_size)
        _write(output, base_fd, target_fd, kinds, sources, sequence, bs, progress, dict(
            version=version, compression=compression, compression_level=compression_level, block_size=bs,
            compression_factor=compression_factor, cluster_ops=cluster_ops, buffer_size=buffer_size,
            op_count_max=max(1, len(kinds) - stats["unchanged"]) if version >= 3 else None, sync=True,
        ))
        return stats
    finally:
        os.close(base_fd)
        os.close(target_fd)


def _hash_base(fd: int, size: int, bs: int, bar) -> dict[bytes, int]:
    """Content hash → first base block holding it (zero blocks left out)."""
    zero = bytes(bs)
    by_hash: dict[bytes, int] = {}
    sha1 = hashlib.sha1
    full = size // bs
    for start in range(0, full, _CHUNK // bs):
        n = min(_CHUNK // bs, full - start)
        chunk = memoryview(os.pread(fd, n * bs, start * bs))
        for i in range(len(chunk) // bs):
            block = chunk[i * bs : (i + 1) * bs]
            if block != zero:
                by_hash.setdefault(sha1(block).digest(), start + i)
        bar.update(n * bs)
    bar.update(size - full * bs)
    return by_hash


def _plan(base_fd, target_fd, base_size, target_size, bs, by_hash, xor, max_diff, bar, mover=None):
    """One op kind per target block, and the source block of each Copy."""
    nblocks = target_size // bs
    base_full = base_size // bs
    kinds = bytearray(nblocks)
    sources: dict[int, int] = {}
    zero = bytes(bs)
    sha1 = hashlib.sha1
    per = _CHUNK // bs
    for start in range(0, nblocks, per):
        n = min(per, nblocks - start)
        tchunk = os.pread(target_fd, n * bs, start * bs)
        bchunk = os.pread(base_fd, n * bs, start * bs) if start < base_full else b""
        bar.update(n * bs)
        if len(tchunk) == len(bchunk) and (mover.compare(tchunk, bchunk) is None if mover else tchunk == bchunk):
            continue  # the common case: a whole unchanged megabyte
        tview, bview = memoryview(tchunk), memoryview(bchunk)
        for i in range(n):
            block = start + i
            tb = tview[i * bs : (i + 1) * bs]
            in_base = block < base_full and len(bview) >= (i + 1) * bs
            if in_base and tb == bview[i * bs : (i + 1) * bs]:
                continue
            if tb == zero:
                kinds[block] = _ZERO
                continue
            src = by_hash.get(sha1(tb).digest())
            if src is not None and os.pread(base_fd, bs, src * bs) == tb:
                kinds[block] = _COPY
                sources[block] = src
            elif xor and in_base and bs - xor_bytes(tb, bview[i * bs : (i + 1) * bs]).count(0) <= max_diff:
                kinds[block] = _XOR
            else:
                kinds[block] = _REPLACE
    return kinds, sources


def _order(kinds: bytearray, sources: dict[int, int]) -> tuple[list[int], int]:
    """Merge order of the ordered ops; turns cycle members into Replace.

    Op B (new block B) reads base block ``src(B)`` (Xor: B itself); it must
    merge before the ordered op writing that block, if any. Kahn's
    algorithm emits an op once every op reading its block has been
    emitted; what is left are cycles, each broken by demoting one member.
    """
    ordered = [b for b, k in enumerate(kinds) if k in (_COPY, _XOR)]
    readers_left = dict.fromkeys(ordered, 0)

    def successor(b: int) -> int | None:
        src = sources.get(b)  # Xor: reads its own block, no edge
        if src is not None and src != b and src in readers_left and kinds[src] in (_COPY, _XOR):
            return src
        return None

    for b in ordered:
        succ = successor(b)
        if succ is not None:
            readers_left[succ] += 1
    ready = deque(b for b in ordered if readers_left[b] == 0)
    emitted: list[int] = []
    done: set[int] = set()
    broken = 0
    pending = iter(ordered)
    while True:
        while ready:
            b = ready.popleft()
            emitted.append(b)
            done.add(b)
            succ = successor(b)
            if succ is not None:
                readers_left[succ] -= 1
                if readers_left[succ] == 0:
                    ready.append(succ)
        # only cycles remain among the ops not done: demote one member
        victim = next((b for b in pending if b not in done and kinds[b] in (_COPY, _XOR)), None)
        if victim is None:
            break
        succ = successor(victim)
        kinds[victim] = _REPLACE
        sources.pop(victim, None)
        broken += 1
        if succ is not None:
            readers_left[succ] -= 1
            if readers_left[succ] == 0:
                ready.append(succ)
    return emitted, broken


def _write(output, base_fd, target_fd, kinds, sources, sequence, bs, progress, options) -> None:
    data_blocks = kinds.count(_REPLACE) + kinds.count(_XOR)
    writer = CowWriter(output, **options)
    try:
        with _progress(data_blocks * bs, "cow write", progress) as bar:
            if sequence:
                writer.add_sequence_data(sequence)
            for b in sequence:
                if kinds[b] == _COPY:
                    writer.add_copy(b, sources[b])
                else:
                    new = os.pread(target_fd, bs, b * bs)
                    writer.add_xor(b, xor_bytes(new, os.pread(base_fd, bs, b * bs)), b * bs)
                    bar.update(bs)
            # the rest in block order, Zero and Replace runs batched
            batch = _CHUNK // bs
            b, n = 0, len(kinds)
            while b < n:
                kind = kinds[b]
                if kind not in (_ZERO, _REPLACE):
                    b += 1
                    continue
                end = b + 1
                while end < n and kinds[end] == kind and end - b < batch:
                    end += 1
                if kind == _ZERO:
                    writer.add_zero(b, end - b)
                else:
                    writer.add_replace(b, os.pread(target_fd, (end - b) * bs, b * bs))
                    bar.update((end - b) * bs)
                b = end
        writer.finalize()
    finally:
        writer.close()


def render_cow(base, cow, output, *, size: int | None = None, label: int | None = None,
               progress: bool | None = None, mover=None) -> int:
    """Write the target image (``base`` + ``cow``) to ``output``; returns its size.

    ``mover`` (a :class:`~dmuserd.dsa_offload.BlockingMover`) places the
    blocks; without one, the CPU does."""
    with CowReader(cow, label=label) as reader, SnapshotView(reader, base, size=size) as view:
        fd = os.open(os.fspath(output), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            with _progress(view.size, "cow render", progress) as bar:
                for offset in range(0, view.size, _CHUNK):
                    data = view.read(offset, min(_CHUNK, view.size - offset), mover)
                    os.pwrite(fd, data, offset)
                    bar.update(len(data))
            os.ftruncate(fd, view.size)
        finally:
            os.close(fd)
        return view.size


def verify_cow(base, target, cow, *, label: int | None = None, progress: bool | None = None,
               mover=None) -> int | None:
    """The first block where ``base`` + ``cow`` differs from ``target``, or None.

    ``mover`` (a :class:`~dmuserd.dsa_offload.BlockingMover`) assembles and
    compares the data; without one, the CPU does."""
    target_fd = _open(target)
    try:
        size = os.fstat(target_fd).st_size
        with CowReader(cow, label=label) as reader, SnapshotView(reader, base, size=size) as view:
            bs = view.block_size
            with _progress(size, "cow verify", progress) as bar:
                for offset in range(0, size, _CHUNK):
                    want = os.pread(target_fd, min(_CHUNK, size - offset), offset)
                    got = view.read(offset, len(want), mover)
                    if mover is not None:
                        at = mover.compare(got, want)
                        if at is not None:
                            return (offset + at) // bs
                    elif got != want:
                        for i in range(0, len(want), bs):
                            if got[i : i + bs] != want[i : i + bs]:
                                return (offset + i) // bs
                    bar.update(len(want))
        return None
    finally:
        os.close(target_fd)
