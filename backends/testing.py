"""Conformance checks a backend author runs against their backend.

Subclass :class:`BackendConformance` in a test module and say how to make
the backend; pytest then runs one test per property of the contract in
:mod:`dmuserd.backends._api`::

    from dmuserd.backends.testing import BackendConformance

    class TestMyDisk(BackendConformance):
        durable = True        # made again over the same workdir, it holds what was flushed
        discard_zeroes = True  # a discarded range reads back as zeros

        def make_backend(self, workdir):
            return MyDisk(workdir / "disk.img", size=8 << 20)

Each test makes a fresh backend over a fresh temporary directory
(``workdir``), runs in its own ``trio.run`` (no pytest plug-in is needed;
the tests are plain methods, so they also run outside pytest: call them)
and closes the backend once at the end. A check that does not apply (a
read-only backend has no writes to check) is skipped saying why (pytest's
skip under pytest, :class:`unittest.SkipTest` elsewhere). A failure says
which call, where, and what was found instead (zeros, another write's
data, or which write and block the bytes came from).

What is checked, in the order of the test methods:

* ``test_shape``: size and block size are whole blocks, ``capabilities``
  holds READ and only :class:`~dmuserd.backends.Op` members, ``describe()``
  is JSON-serialisable and agrees with ``size`` and ``block_size``.
* ``test_reads_in_range``: reads at the first and the last block, at odd
  block multiples, across 64 KiB boundaries and up to :attr:`max_io` bytes
  return exactly the bytes asked for, the same twice, the same through
  ``read_views`` and through ``readinto`` (into page-aligned memory, as an
  export's shared buffer is, and into a view at an odd address), and equal
  :meth:`expected` where it is given; ``extents`` (optional: where the
  backend knows its holes) describes each range in whole blocks from its
  start, no further than asked, and every hole it reports reads as zeros.
* ``test_writes_at_the_edges``: writes of the first block, the last block
  and the last blocks up to the end read back, from ``bytes``,
  ``bytearray`` and ``memoryview`` alike and with ``fua``; a write keeps no
  reference to the caller's buffer, and the data a ``read()`` returned does
  not change under a later write.
* ``test_read_after_write``: a seeded sequence of writes (and write-zeroes
  and discards where the backend has them) against a model of the device,
  every range read back after each step (by ``read`` or ``readinto``), its
  ``extents`` checked as above against what was read.
* ``test_write_zeroes`` / ``test_discard``: the range reads back as zeros
  (a discard only where :attr:`discard_zeroes` promises it), both
  neighbours stay, at the edges of the device too.
* ``test_flush``: flush with nothing written, after writes and while writes
  are in flight; nothing read back changes.
* ``test_durable_after_reopen`` (where :attr:`durable`): data written and
  flushed, written with FUA, or zeroed and flushed reads back from a
  backend made again over the same ``workdir`` after the first was closed.
  This shows the data reached the storage the backend re-opens; telling a
  disk from a page cache needs a power cut, which no unit test has.
* ``test_concurrent_requests``: many trio tasks at once, each writing,
  zeroing and reading its own ranges (neighbours inside the same 64 KiB),
  with flushes and readers of other ranges among them: no range loses or
  mixes data. Read-only backends get concurrent reads checked against
  :meth:`expected`.
* ``test_missing_operations_refused``: an operation outside
  ``capabilities`` fails when called directly (one the class does not
  override raises :class:`~dmuserd.backends.Unsupported`) and changes no
  data. The daemon itself never calls them; a backend must not pretend.
* ``test_unknown_option_refused`` (where :meth:`options` is given):
  ``from_options`` with the options plus an unknown key raises
  :class:`~dmuserd.backends.BackendError` naming that key.

The daemon only ever hands a backend whole blocks inside the device, so
every request here is aligned to ``block_size`` and in range: a backend is
not asked to refuse anything else.
"""

from __future__ import annotations

import inspect
import json
import mmap
import random
import struct
import sys
import tempfile
import unittest
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, NoReturn

import trio

from dmuserd.backends._api import Backend, BackendError, Extent, Op, Unsupported

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["BackendConformance"]

_SECTOR = 512
_MAGIC = b"DMUC"
_HEADER = struct.Struct(">4sIQ")  # magic, write tag, absolute sector number
#: memory-like backends keep data in chunks of this size: ranges cross its boundaries
_CHUNK = 64 * 1024


def _skip(reason: str) -> NoReturn:
    """Skip the running check: through pytest when it runs the check (the report then points here)."""
    pytest = sys.modules.get("pytest")
    if pytest is not None:
        pytest.skip(reason)
    raise unittest.SkipTest(reason)


def _pattern(tag: int, offset: int, length: int) -> bytes:
    """Data of write ``tag`` for ``offset..offset+length``: each 512-byte sector names the write and itself."""
    first = offset // _SECTOR
    parts = []
    for sector in range(first, first + length // _SECTOR):
        fill = bytes([(tag * 7 + sector) % 251 + 1]) * (_SECTOR - _HEADER.size)
        parts.append(_HEADER.pack(_MAGIC, tag, sector) + fill)
    return b"".join(parts)


def _what_is(sector: bytes) -> str:
    if not any(sector):
        return "zeros"
    magic, tag, number = _HEADER.unpack_from(sector)
    if magic == _MAGIC:
        return f"write #{tag}'s data for sector {number}"
    return f"other bytes ({sector[:16].hex()}...)"


def _compare(what: str, offset: int, got: bytes, want: bytes) -> None:
    """Raise AssertionError naming the first differing byte, unless ``got == want``."""
    if len(got) != len(want):
        raise AssertionError(f"{what}: {len(got)} bytes came back, {len(want)} were asked for")
    if got == want:
        return
    at = next(i for i in range(len(got)) if got[i] != want[i])
    start = at - at % _SECTOR
    raise AssertionError(
        f"{what}: bytes differ from device offset {offset + at} on: expected {_what_is(want[start:start + _SECTOR])}, "
        f"found {_what_is(got[start:start + _SECTOR])}"
    )


def _flat(data: object, what: str) -> bytes:
    """A read's answer as bytes; anything not bytes-like is a failure naming the call."""
    try:
        return bytes(memoryview(data).cast("B"))  # type: ignore[arg-type]
    except TypeError:
        raise AssertionError(f"{what} returned {type(data).__name__}, not a bytes-like object") from None


class _Device:
    """One backend under test with the calls every check makes, each named in failures."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.bs = backend.block_size
        self.size = backend.size
        self.closed = False

    async def remake(self, make: Callable[[], Awaitable[Backend]]) -> None:
        """Close the backend, then make it again (over the same storage)."""
        self.closed = True
        await self.backend.close()
        self.backend = await make()
        self.closed = False

    def can(self, op: Op) -> bool:
        return op in self.backend.capabilities

    async def read(self, offset: int, length: int) -> bytes:
        return _flat(await self.backend.read(offset, length), f"read({offset}, {length})")

    async def read_into(self, offset: int, length: int, aligned: bool) -> bytes:
        """``readinto`` a buffer of ``length`` bytes filled with 0xA5 first: page-aligned memory
        (an anonymous mmap), or a view starting 3 bytes into a bytearray."""
        holder: mmap.mmap | bytearray = mmap.mmap(-1, max(length, 1)) if aligned else bytearray(length + 3)
        view = memoryview(holder)[:length] if aligned else memoryview(holder)[3:length + 3]
        view[:] = b"\xa5" * length
        await self.backend.readinto(offset, view)
        data = bytes(view)
        view.release()
        return data

    async def check_extents(self, offset: int, got: bytes, when: str) -> None:
        """``extents`` over the range just read as ``got``: consecutive whole blocks from ``offset``, at least one,
        none past the range; each hole reads as zeros in ``got``."""
        what = f"extents({offset}, {len(got)}) {when}"
        extents = await self.backend.extents(offset, len(got))
        assert isinstance(extents, list) and extents, f"{what} returned {extents!r}, not a non-empty list"
        pos = 0
        for extent in extents:
            assert isinstance(extent, Extent), f"{what}: {extent!r} is not an Extent"
            length, hole = extent
            assert length > 0 and length % self.bs == 0, f"{what}: {length} bytes at {offset + pos}, not whole blocks"
            assert pos + length <= len(got), f"{what}: the extent at {offset + pos} of {length} ends past the range"
            if hole:
                _compare(f"{what}: the hole at {offset + pos}+{length}", offset + pos, got[pos:pos + length],
                         bytes(length))
            pos += length

    async def check(self, offset: int, want: bytes, what: str) -> None:
        _compare(f"{what}: read({offset}, {len(want)})", offset, await self.read(offset, len(want)), want)

    def blocks(self, count: int) -> int:
        """``count`` blocks in bytes, at most the whole device."""
        return min(count * self.bs, self.size)

    def window(self, limit: int) -> int:
        """The first ``limit`` bytes of the device, or the whole device, in whole blocks."""
        return min(self.size, max(limit - limit % self.bs, self.bs))


class BackendConformance:
    """Base class of a backend's conformance tests: see the module docstring.

    Override :meth:`make_backend`; declare what the backend promises with the
    class attributes; give :meth:`expected` for a backend whose contents are
    known (a read-only one above all) and :meth:`options` to check its
    ``from_options``.
    """

    #: Made again over the same workdir after ``close()``, the backend holds what was flushed.
    durable: ClassVar[bool] = False
    #: Written data reads back (False for a sink such as ``null``: its writes are then made and
    #: its reads compared with :meth:`expected` only, and the checks of kept data skip).
    keeps_data: ClassVar[bool] = True
    #: A discarded range reads back as zeros (not just "anything").
    discard_zeroes: ClassVar[bool] = False
    #: The largest request tried, in bytes (the device's size if smaller).
    max_io: ClassVar[int] = 4 << 20
    #: Seconds a check may take before it fails as hung (a request that never completed).
    deadline: ClassVar[float] = 300.0
    #: Seed of the random sequences (change it to explore other ones).
    seed: ClassVar[int] = 20

    def make_backend(self, workdir: Path) -> Backend | Awaitable[Backend]:
        """A new backend whose storage (if any) lives in ``workdir``; may be a coroutine."""
        raise NotImplementedError(f"{type(self).__name__} must define make_backend(workdir)")

    def expected(self, workdir: Path, offset: int, length: int) -> bytes | None:
        """What a freshly made backend holds at ``offset..offset+length``; None if not known."""
        return None

    def options(self, workdir: Path) -> dict[str, str] | None:
        """``from_options`` options that build this backend, or None to leave ``from_options`` unchecked."""
        return None

    # -- the tests -----------------------------------------------------------------

    def test_shape(self) -> None:
        self._run(self._shape)

    def test_reads_in_range(self) -> None:
        self._run(self._reads_in_range)

    def test_writes_at_the_edges(self) -> None:
        self._run(self._writes_at_the_edges)

    def test_read_after_write(self) -> None:
        self._run(self._read_after_write)

    def test_write_zeroes(self) -> None:
        self._run(self._write_zeroes)

    def test_discard(self) -> None:
        self._run(self._discard)

    def test_flush(self) -> None:
        self._run(self._flush)

    def test_durable_after_reopen(self) -> None:
        if not self.durable:
            _skip(f"{type(self).__name__}.durable is False: its storage does not outlive it")
        self._run(self._durable_after_reopen)

    def test_concurrent_requests(self) -> None:
        self._run(self._concurrent_requests)

    def test_missing_operations_refused(self) -> None:
        self._run(self._missing_operations_refused)

    def test_unknown_option_refused(self) -> None:
        self._run(self._unknown_option_refused)

    # -- running a check -----------------------------------------------------------

    def _run(self, check: Callable[[_Device, Path], Awaitable[None]]) -> None:
        with tempfile.TemporaryDirectory(prefix="dmuserd-conformance-") as tmp:
            trio.run(self._session, check, Path(tmp))

    async def _session(self, check: Callable[[_Device, Path], Awaitable[None]], workdir: Path) -> None:
        with trio.fail_after(self.deadline):
            device = _Device(await self._make(workdir))
            try:
                await check(device, workdir)
            finally:
                if not device.closed:
                    await device.backend.close()

    async def _make(self, workdir: Path) -> Backend:
        made = self.make_backend(workdir)
        backend = await made if inspect.isawaitable(made) else made
        if not isinstance(backend, Backend):
            raise AssertionError(f"make_backend returned {type(backend).__name__}, not a dmuserd Backend")
        return backend

    def _need(self, device: _Device, *ops: Op) -> None:
        missing = [op.value for op in ops if not device.can(op)]
        if missing:
            _skip(f"the backend does not do {', '.join(missing)} (not in its capabilities)")

    def _need_kept(self, device: _Device, *ops: Op) -> None:
        self._need(device, Op.WRITE, *ops)
        if not self.keeps_data:
            _skip(f"{type(self).__name__}.keeps_data is False: written data is not read back")

    def _probe_ranges(self, device: _Device) -> list[tuple[int, int]]:
        """Ranges at the edges, at odd block multiples, across 64 KiB boundaries and as large as allowed."""
        bs, size = device.bs, device.size
        big = device.window(self.max_io)
        ranges = [(0, bs), (size - bs, bs), (size - device.blocks(3), device.blocks(3)), (0, big), (size - big, big)]
        for offset in (bs, 3 * bs, 7 * bs, _CHUNK - bs, 3 * _CHUNK - 2 * bs):
            for length in (bs, 2 * bs, 3 * bs, _CHUNK + bs):
                if offset % bs == 0 and offset + length <= size:
                    ranges.append((offset, length))
        return sorted(set(ranges))

    # -- the checks ----------------------------------------------------------------

    async def _shape(self, device: _Device, workdir: Path) -> None:
        backend = device.backend
        bs, size = backend.block_size, backend.size
        assert isinstance(bs, int) and bs >= _SECTOR and bs & (bs - 1) == 0, f"block_size {bs!r}: not a power of two >= 512"
        assert isinstance(size, int) and size >= bs and size % bs == 0, f"size {size!r}: not a positive multiple of {bs}"
        caps = backend.capabilities
        assert isinstance(caps, frozenset) and all(isinstance(op, Op) for op in caps), f"capabilities {caps!r}"
        assert Op.READ in caps, "a backend must serve READ"
        for op in Op:
            assert backend.supports(op) == (op in caps), f"supports({op}) disagrees with capabilities"
        described = backend.describe()
        try:
            round_trip = json.loads(json.dumps(described))
        except (TypeError, ValueError) as exc:
            raise AssertionError(f"describe() is not JSON-serialisable: {exc}") from None
        assert isinstance(round_trip, dict), f"describe() returned {type(described).__name__}, not a dict"
        assert round_trip.get("size") == size and round_trip.get("block_size") == bs, (
            f"describe() says size={round_trip.get('size')!r}, block_size={round_trip.get('block_size')!r}"
        )

    async def _reads_in_range(self, device: _Device, workdir: Path) -> None:
        for offset, length in self._probe_ranges(device):
            what = f"read({offset}, {length})"
            first = await device.read(offset, length)
            _compare(f"{what}, read again", offset, await device.read(offset, length), first)
            views = await device.backend.read_views(offset, length)
            joined = b"".join(_flat(view, f"read_views({offset}, {length}) item") for view in views)
            _compare(f"read_views({offset}, {length})", offset, joined, first)
            for aligned in (True, False):
                _compare(f"readinto({offset}, {'page-aligned' if aligned else 'unaligned'} buffer of {length})",
                         offset, await device.read_into(offset, length, aligned), first)
            want = self.expected(workdir, offset, length)
            if want is not None:
                _compare(what, offset, first, want)
            await device.check_extents(offset, first, "of a fresh backend")

    async def _writes_at_the_edges(self, device: _Device, workdir: Path) -> None:
        self._need(device, Op.WRITE)
        bs, size = device.bs, device.size
        tail = device.blocks(5)
        cases: list[tuple[int, int, Callable[[bytes], Buffer], bool]] = [
            (0, bs, bytes, False),
            (size - bs, bs, bytearray, False),
            (size - tail, tail, memoryview, True),
            (0, device.blocks(2), memoryview, True),
            (size - device.window(self.max_io), device.window(self.max_io), bytes, False),
        ]
        for tag, (offset, length, kind, fua) in enumerate(cases, 1):
            data = _pattern(tag, offset, length)
            await device.backend.write(offset, kind(data), fua=fua)
            what = f"write #{tag} ({kind.__name__}, fua={fua}) at {offset}+{length}"
            if self.keeps_data:
                await device.check(offset, data, what)
            else:
                got = await device.read(offset, length)
                want = self.expected(workdir, offset, length)
                _compare(f"{what} (a sink): read({offset}, {length})", offset, got, got if want is None else want)
        if not self.keeps_data:
            return

        # The caller's buffer is the caller's again once write() returns.
        buffer = bytearray(_pattern(90, 0, bs))
        await device.backend.write(0, buffer)
        buffer[:] = bytes(bs)
        await device.check(0, _pattern(90, 0, bs), "write #90, its buffer zeroed after write() returned")

        # What read() returned stays as it was when a write follows.
        before = await device.backend.read(0, bs)
        kept = _flat(before, f"read(0, {bs})")
        await device.backend.write(0, _pattern(91, 0, bs))
        _compare(f"the data read(0, {bs}) returned, after write #91 to the same block", 0,
                 _flat(before, f"read(0, {bs})"), kept)

    async def _read_after_write(self, device: _Device, workdir: Path) -> None:
        self._need_kept(device)
        bs = device.bs
        window = device.window(4 * _CHUNK + 5 * bs)
        model = bytearray(await device.read(0, window))
        known = [True] * (window // bs)  # a discard that may not zero leaves its blocks unknown
        rng = random.Random(self.seed)
        ops = [op for op in (Op.WRITE, Op.WRITE, Op.WRITE, Op.WRITE_ZEROES, Op.DISCARD) if device.can(op)]
        for tag in range(1, 151):
            length = min(rng.choice((1, 1, 2, 3, 8, 17, _CHUNK // bs, _CHUNK // bs + 1)) * bs, window)
            offset = rng.randrange(0, (window - length) // bs + 1) * bs
            op = rng.choice(ops)
            if op is Op.WRITE:
                data = _pattern(tag, offset, length)
                await device.backend.write(offset, data, fua=rng.random() < 0.2)
                step = f"write #{tag} at {offset}+{length}"
            elif op is Op.WRITE_ZEROES:
                data = bytes(length)
                await device.backend.write_zeroes(offset, length, may_unmap=rng.random() < 0.5)
                step = f"write_zeroes #{tag} at {offset}+{length}"
            else:
                data = bytes(length)
                await device.backend.discard(offset, length)
                step = f"discard #{tag} at {offset}+{length}"
            model[offset:offset + length] = data
            for block in range(offset // bs, (offset + length) // bs):
                known[block] = op is not Op.DISCARD or self.discard_zeroes
            await self._check_model(device, model, known, f"after {step}", rng)
        await self._check_model(device, model, known, "at the end", None)

    async def _check_model(self, device: _Device, model: bytearray, known: list[bool], when: str,
                           rng: random.Random | None) -> None:
        """Read a random range (or, without ``rng``, everything) and compare its known blocks with the model."""
        bs = device.bs
        if rng is None:
            offset, length = 0, len(model)
        else:
            length = rng.randrange(1, len(model) // bs + 1) * bs
            offset = rng.randrange(0, (len(model) - length) // bs + 1) * bs
        if rng is not None and rng.random() < 0.5:
            got = bytearray(await device.read_into(offset, length, rng.random() < 0.5))
        else:
            got = bytearray(await device.read(offset, length))
        await device.check_extents(offset, bytes(got), when)
        for i in range(0, length, bs):
            if not known[(offset + i) // bs]:
                got[i:i + bs] = model[offset + i:offset + i + bs]  # a discarded block may hold anything
        _compare(f"read({offset}, {length}) {when}", offset, bytes(got), bytes(model[offset:offset + length]))

    async def _zeroing(self, device: _Device, op: Op, zero: Callable[[int, int], Awaitable[None]],
                       reads_zero: bool) -> None:
        """Fill with data, apply ``zero`` in the middle and at both edges, check the range and its neighbours."""
        self._need_kept(device, op)
        bs, size = device.bs, device.size
        window = device.window(3 * _CHUNK)
        await device.backend.write(0, _pattern(1, 0, window))
        tail = device.blocks(3)
        await device.backend.write(size - tail, _pattern(2, size - tail, tail))
        model = bytearray(await device.read(0, window))
        cases = [(bs, bs), (_CHUNK - bs, 2 * bs), (_CHUNK, _CHUNK), (0, bs), (bs, window - 2 * bs)]
        for offset, length in cases:
            if offset + length > window or length <= 0:
                continue
            await zero(offset, length)
            got = await device.read(0, window)
            if reads_zero:
                model[offset:offset + length] = bytes(length)
            else:
                model[offset:offset + length] = got[offset:offset + length]
            _compare(f"read(0, {window}) after {op.value}({offset}, {length})", 0, got, bytes(model))
        before = await device.read(size - tail, tail)
        await zero(size - bs, bs)
        got = await device.read(size - tail, tail)
        want = before[:-bs] + (bytes(bs) if reads_zero else got[-bs:])
        _compare(f"the last blocks after {op.value} of the last block", size - tail, got, want)

    async def _write_zeroes(self, device: _Device, workdir: Path) -> None:
        for may_unmap in (False, True):
            async def zero(offset: int, length: int, may_unmap: bool = may_unmap) -> None:
                await device.backend.write_zeroes(offset, length, may_unmap=may_unmap)

            await self._zeroing(device, Op.WRITE_ZEROES, zero, True)

    async def _discard(self, device: _Device, workdir: Path) -> None:
        await self._zeroing(device, Op.DISCARD, device.backend.discard, self.discard_zeroes)

    async def _flush(self, device: _Device, workdir: Path) -> None:
        self._need(device, Op.FLUSH)
        await device.backend.flush()  # nothing written yet
        if not (device.can(Op.WRITE) and self.keeps_data):
            want = await device.read(0, device.window(_CHUNK))
            await device.backend.flush()
            await device.check(0, want, "after flush")
            return
        writes = self._spread(device, 16, 1)
        for offset, data in writes[:8]:
            await device.backend.write(offset, data)
        await device.backend.flush()
        async with trio.open_nursery() as nursery:
            for offset, data in writes[8:]:
                nursery.start_soon(device.backend.write, offset, data)
            nursery.start_soon(device.backend.flush)
        await device.backend.flush()
        for offset, data in writes:
            await device.check(offset, data, "after writes and flushes")

    def _spread(self, device: _Device, count: int, first_tag: int, between: bool = False) -> list[tuple[int, bytes]]:
        """``count`` non-overlapping writes spread over the device (last block included): (offset, data).

        With ``between``, one block each halfway between those spots instead: none overlaps them
        (none at all on a device too small to leave room).
        """
        bs, size = device.bs, device.size
        blocks = size // bs
        step = max(blocks // count, 1)
        if between:
            if step < 4:
                return []
            return [((i * step + step // 2) * bs, _pattern(tag, (i * step + step // 2) * bs, bs))
                    for tag, i in enumerate(range(count), first_tag)]
        spots = sorted({min(i * step, blocks - 1) for i in range(count)} | {blocks - 1})
        ends = [*spots[1:], blocks]
        return [(block * bs, _pattern(tag, block * bs, bs * min(2, end - block)))
                for tag, (block, end) in enumerate(zip(spots, ends, strict=True), first_tag)]

    async def _durable_after_reopen(self, device: _Device, workdir: Path) -> None:
        self._need_kept(device)
        before = await device.read(0, device.window(_CHUNK))
        await device.remake(lambda: self._make(workdir))
        await device.check(0, before, "made again over the same workdir, nothing written")

        writes = self._spread(device, 12, 1)
        flushed, fua = writes[::2], writes[1::2]
        for offset, data in flushed:
            await device.backend.write(offset, data)
        for offset, data in fua:
            await device.backend.write(offset, data, fua=True)
        if device.can(Op.WRITE_ZEROES):
            offset, data = flushed[0]
            await device.backend.write_zeroes(offset, device.bs)
            flushed[0] = (offset, bytes(device.bs) + data[device.bs:])
        if not device.can(Op.FLUSH):
            raise AssertionError("durable is declared and writes are served, but FLUSH is not in capabilities")
        await device.backend.flush()
        before_flush = await self._flush_among_writes(device)
        await device.remake(lambda: self._make(workdir))
        for offset, data in flushed + fua:
            await device.check(offset, data, "made again after close(): a flushed or FUA write")
        for offset, data in before_flush:
            await device.check(offset, data, "made again after close(): a write completed before a flush began "
                                             "(other writes were in flight beside the flush)")

    async def _flush_among_writes(self, device: _Device) -> list[tuple[int, bytes]]:
        """Writes in flight while a flush starts once half of them completed: returns those that had."""
        writes = self._spread(device, 12, 100, between=True)
        if not writes:
            return []
        completed: list[tuple[int, bytes]] = []
        half = trio.Event()
        before: list[tuple[int, bytes]] = []

        async def write(offset: int, data: bytes) -> None:
            await device.backend.write(offset, data)
            completed.append((offset, data))
            if len(completed) * 2 >= len(writes):
                half.set()

        async def flush() -> None:
            await half.wait()
            before.extend(completed)
            await device.backend.flush()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush)
            for offset, data in writes:
                nursery.start_soon(write, offset, data)
        assert before, "no write completed before the flush began"
        return before

    async def _concurrent_requests(self, device: _Device, workdir: Path) -> None:
        if not (device.can(Op.WRITE) and self.keeps_data):
            await self._concurrent_reads(device, workdir)
            return
        bs = device.bs
        slot = 37 * bs if device.size >= 32 * 37 * bs else bs  # not a 64 KiB divisor: neighbours share chunks
        tasks = min(32, device.size // slot)
        failures: list[str] = []
        done = [0]

        async def owner(index: int) -> None:
            rng = random.Random(self.seed * 1000 + index)
            base = index * slot
            mine = bytearray(await device.read(base, slot))
            for round_ in range(6):
                tag = 1000 * (index + 1) + round_
                length = rng.randrange(1, slot // bs + 1) * bs
                offset = base + rng.randrange(0, (slot - length) // bs + 1) * bs
                if round_ % 3 == 2 and device.can(Op.WRITE_ZEROES):
                    await device.backend.write_zeroes(offset, length)
                    mine[offset - base:offset - base + length] = bytes(length)
                else:
                    data = _pattern(tag, offset, length)
                    await device.backend.write(offset, data, fua=round_ == 4)
                    mine[offset - base:offset - base + length] = data
                await trio.lowlevel.checkpoint()
                try:
                    await device.check(base, bytes(mine), f"task {index} (owning {base}+{slot}), round {round_}")
                except AssertionError as exc:
                    failures.append(str(exc))
                    return
            done[0] += 1

        async def reader() -> None:
            rng = random.Random(self.seed)
            for _ in range(20):
                length = rng.randrange(1, min(64, device.size // bs) + 1) * bs
                offset = rng.randrange(0, (device.size - length) // bs + 1) * bs
                got = await device.read(offset, length)
                if len(got) != length:
                    failures.append(f"concurrent read({offset}, {length}) returned {len(got)} bytes")
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for index in range(tasks):
                nursery.start_soon(owner, index)
            for _ in range(4):
                nursery.start_soon(reader)
            if device.can(Op.FLUSH):
                for _ in range(3):
                    nursery.start_soon(device.backend.flush)
        if failures:
            raise AssertionError(f"{len(failures)} of {tasks} tasks found wrong data; first: {failures[0]}")
        assert done[0] == tasks

    async def _concurrent_reads(self, device: _Device, workdir: Path) -> None:
        bs = device.bs
        failures: list[str] = []
        checked = [0]

        async def reader(index: int) -> None:
            rng = random.Random(self.seed * 1000 + index)
            for _ in range(8):
                length = min(rng.randrange(1, 2 * _CHUNK // bs + 1) * bs, device.size)
                offset = rng.randrange(0, (device.size - length) // bs + 1) * bs
                got = await device.read(offset, length)
                want = self.expected(workdir, offset, length)
                try:
                    _compare(f"concurrent reader {index}: read({offset}, {length})", offset, got,
                             got if want is None else want)
                except AssertionError as exc:
                    failures.append(str(exc))
                checked[0] += 1

        async with trio.open_nursery() as nursery:
            for index in range(32):
                nursery.start_soon(reader, index)
        if failures:
            raise AssertionError(f"{len(failures)} concurrent reads were wrong; first: {failures[0]}")
        assert checked[0] == 32 * 8

    async def _missing_operations_refused(self, device: _Device, workdir: Path) -> None:
        missing = [op for op in Op if op is not Op.READ and not device.can(op)]
        if not missing:
            _skip("the backend serves every operation")
        bs = device.bs
        calls: dict[Op, Callable[[], Awaitable[None]]] = {
            Op.WRITE: lambda: device.backend.write(0, _pattern(7, 0, bs)),
            Op.FLUSH: device.backend.flush,
            Op.DISCARD: lambda: device.backend.discard(0, bs),
            Op.WRITE_ZEROES: lambda: device.backend.write_zeroes(0, bs),
        }
        for op in missing:
            before = await device.read(0, bs)
            method = getattr(type(device.backend), op.value)
            try:
                await calls[op]()
            except Unsupported:
                pass
            except Exception as exc:  # noqa: BLE001 - an overridden, disabled op may fail its own way
                if method is getattr(Backend, op.value):
                    raise AssertionError(f"{op.value}() is not overridden but raised {exc!r}, not Unsupported") from exc
            else:
                raise AssertionError(
                    f"{op.value}() is not in capabilities, yet a direct call succeeded: it must raise "
                    "(Unsupported, or an error saying why)"
                )
            await device.check(0, before, f"after the refused {op.value}()")

    async def _unknown_option_refused(self, device: _Device, workdir: Path) -> None:
        options = self.options(workdir)
        if options is None:
            _skip(f"{type(self).__name__}.options() gives no options to build the backend with")
        cls = type(device.backend)
        built = cls.from_options(dict(options))
        try:
            assert type(built) is cls, f"from_options built a {type(built).__name__}, not a {cls.__name__}"
            assert (built.size, built.block_size) == (device.size, device.bs), (
                f"from_options({options}) built size {built.size}, block_size {built.block_size}; "
                f"make_backend's has {device.size}, {device.bs}"
            )
        finally:
            await built.close()
        bogus = "no_such_option_for_conformance"
        try:
            refused = cls.from_options({**options, bogus: "1"})
        except BackendError as exc:
            assert bogus in str(exc), f"from_options refused an unknown option without naming it: {exc}"
        else:
            await refused.close()
            raise AssertionError(f"from_options accepted the unknown option {bogus}=1")
