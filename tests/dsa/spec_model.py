"""An independent model of a DSA work queue, written from the specification.

Sources: the descriptor and completion-record tables, status codes, flags
and page-fault rules of shared/specs/dsa.md; the kernel's GENCAP bits
(drivers/dma/idxd/registers.h); batch semantics as accel-config's tests
expect them (test/dsa_test.c, parse_evl_desc: status, result and
descriptors completed; fences); the CRC definition of DML's software
kernels (sources/core/src/crc.cpp and sw_dispatcher/ref/crc.c: an MSB-first
register through 0x1EDC6F41, inversion and reflections as flags). It
shares no code with the emulator or the mover: plain Python over a
``bytearray`` standing for memory, addresses being offsets from ``base``.

``Model.run(desc)`` returns what the device writes: the completion record
(or None when it writes none) and, through ``memory``, the data. A
record-page fault is modelled the way the emulator documents it (the
operation runs; the record arrives with status 0x1a and what was done),
which is to be confirmed on DSA 2.0 hardware.
"""

from __future__ import annotations

import dataclasses
import struct

import crc32c

PAGE = 4096

# opcodes
NOOP, BATCH, DRAIN, MEMMOVE, MEMFILL, COMPARE, COMPARE_PATTERN, CREATE_DELTA, APPLY_DELTA, DUALCAST = range(10)
CRCGEN, COPY_CRC, CACHE_FLUSH = 0x10, 0x11, 0x20
KNOWN = {NOOP, BATCH, DRAIN, MEMMOVE, MEMFILL, COMPARE, COMPARE_PATTERN, CREATE_DELTA, APPLY_DELTA, DUALCAST, CRCGEN,
         COPY_CRC, CACHE_FLUSH}

# flags
FENCE, BOF, CRAV, RCR, RCI, CHECK_RESULT, CACHE_CONTROL = 0x1, 0x2, 0x4, 0x8, 0x10, 0x80, 0x100
STRICT_ORDERING, DEST_READBACK = 0x2000, 0x4000
CRC_SEED_ADDR, CRC_BYPASS_INV_REFL, CRC_BYPASS_DATA_REFL = 0x10000, 0x20000, 0x40000
GENERIC = FENCE | BOF | CRAV | RCR | RCI | CHECK_RESULT | CACHE_CONTROL | STRICT_ORDERING | DEST_READBACK

# statuses
SUCCESS, FALSE_PREDICATE, PAGE_FAULT, PAGE_REQUEST_REJECTED, BATCH_FAIL, BATCH_LIST_FAULT = 1, 2, 3, 4, 5, 6
DELTA_NOT_INCREASING, DELTA_OUT_OF_RANGE = 7, 8
UNSUPPORTED, INVALID_FLAGS, RESERVED, TRANSFER_SIZE, DESC_COUNT, DELTA_SIZE, OVERLAP, DUALCAST_ALIGN = range(0x10, 0x18)
LIST_ALIGN, RECORD_FAULT, RECORD_ALIGN = 0x18, 0x1A, 0x1B
WRITE_BIT = 0x80

# GENCAP
GEN_BOF, GEN_OVERLAP, GEN_CC_MEMORY, GEN_CC_CACHE = 1, 2, 4, 8


@dataclasses.dataclass
class Desc:
    """The 64 bytes, by field (offsets from the spec's descriptor table)."""

    opcode: int
    flags: int = CRAV | RCR
    completion: int = 0
    src: int = 0  # @16: source / pattern / descriptor list
    dst: int = 0  # @24: destination / second source / compare pattern
    size: int = 0  # @32: transfer size / descriptor count
    reserved: int = 0  # @38
    op: bytes = bytes(24)  # @40..63

    def pack(self) -> bytes:
        return struct.pack("<IIQQQIHH24s", 0, (self.flags & 0xFFFFFF) | self.opcode << 24, self.completion, self.src,
                           self.dst, self.size, 0, self.reserved, self.op)

    @classmethod
    def unpack(cls, raw: bytes) -> Desc:
        _, fo, completion, src, dst, size, _, reserved, op = struct.unpack("<IIQQQIHH24s", raw)
        return cls(fo >> 24, fo & 0xFFFFFF, completion, src, dst, size, reserved, op)

    def u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.op, off - 40)[0]

    def u64(self, off: int) -> int:
        return struct.unpack_from("<Q", self.op, off - 40)[0]


@dataclasses.dataclass
class Rec:
    """The 32-byte completion record, by field."""

    status: int = 0
    result: int = 0
    fault_info: int = 0
    bytes_completed: int = 0
    fault_addr: int = 0
    op_specific: int = 0

    def pack(self) -> bytes:
        return struct.pack("<BBBxIQI12x", self.status, self.result, self.fault_info, self.bytes_completed,
                           self.fault_addr, self.op_specific)

    @classmethod
    def unpack(cls, raw: bytes) -> Rec:
        return cls(*struct.unpack_from("<BBBxIQI", raw))


def _reverse(value: int, bits: int) -> int:
    return int(f"{value:0{bits}b}"[::-1], 2)


_MSB_TABLE = []
for _i in range(256):
    _c = _i << 24
    for _ in range(8):
        _c = ((_c << 1) ^ 0x1EDC6F41) & 0xFFFFFFFF if _c & 0x80000000 else (_c << 1) & 0xFFFFFFFF
    _MSB_TABLE.append(_c)
_REVERSED_BYTE = bytes(_reverse(b, 8) for b in range(256))


def crc(data: bytes, seed: int, flags: int) -> int:
    """The device's CRC-32C (DML's definition) of ``data``."""
    raw, as_is = bool(flags & CRC_BYPASS_INV_REFL), bool(flags & CRC_BYPASS_DATA_REFL)
    if not raw and not as_is:
        return crc32c.crc32c(data, seed)  # the common reflected CRC-32C: an independent implementation
    reg = seed if raw else _reverse(~seed & 0xFFFFFFFF, 32)
    feed = data if as_is else bytes(data).translate(_REVERSED_BYTE)
    for byte in feed:
        reg = ((reg << 8) & 0xFFFFFFFF) ^ _MSB_TABLE[(reg >> 24) ^ byte]
    return reg if raw else ~_reverse(reg, 32) & 0xFFFFFFFF


@dataclasses.dataclass
class Config:
    max_transfer: int = 1 << 20
    max_batch: int = 32
    gen_cap: int = GEN_BOF | GEN_OVERLAP | GEN_CC_MEMORY | GEN_CC_CACHE
    ops: frozenset = frozenset(KNOWN)  # op_cap & op_config
    wq_block_on_fault: bool = False


class _Stop(Exception):
    """A status that ends the operation (the record is already filled in)."""


class Model:
    """``memory`` is the whole address range [base, base + len(memory)); pages in
    ``missing`` are not present (``sticky``: the OS cannot bring them in)."""

    def __init__(self, memory: bytearray, base: int, config: Config | None = None,
                 missing: set[int] | None = None, sticky: set[int] | None = None) -> None:
        self.memory, self.base, self.config = memory, base, config or Config()
        self.missing, self.sticky = set(missing or ()), set(sticky or ())

    # -- memory --------------------------------------------------------------

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.memory[addr - self.base : addr - self.base + n])

    def write(self, addr: int, data: bytes) -> None:
        self.memory[addr - self.base : addr - self.base + len(data)] = data

    def _absent(self, addr: int) -> bool:
        return addr // PAGE * PAGE in self.missing

    def first_missing(self, addr: int, n: int) -> int:
        """Offset of the first non-present byte of [addr, addr + n), or n."""
        for page in range(addr // PAGE * PAGE, addr + n, PAGE):
            if page in self.missing:
                return max(page, addr) - addr
        return n

    def last_missing(self, addr: int, n: int) -> int:
        """Offset of the last non-present byte of [addr, addr + n), or -1."""
        for page in range((addr + n - 1) // PAGE * PAGE, addr // PAGE * PAGE - 1, -PAGE):
            if page in self.missing:
                return min(page + PAGE, addr + n) - 1 - addr
        return -1

    # -- one descriptor -----------------------------------------------------------

    def run(self, desc: Desc) -> Rec | None:
        """Execute ``desc``; the record it writes (None when it writes none)."""
        rec, written = self._one(desc, in_batch=False)
        return rec if written else None

    def _one(self, d: Desc, in_batch: bool) -> tuple[Rec, bool]:
        """The operation's outcome, and whether its record is written (to memory too)."""
        rec = Rec()
        record_missing = False
        if d.flags & CRAV:
            if d.completion % 32:
                rec.status, rec.fault_addr = RECORD_ALIGN, d.completion
                self.write(d.completion, rec.pack())
                return rec, True
            record_missing = self._absent(d.completion)
            page = d.completion // PAGE * PAGE
            if (record_missing and d.flags & BOF and self.config.gen_cap & GEN_BOF and self.config.wq_block_on_fault
                    and page not in self.sticky):
                self.missing.discard(page)  # block on fault: the record's page is brought in, the device waits
                record_missing = False
        try:
            self._body(d, rec, in_batch)
        except _Stop:
            pass
        if not d.flags & CRAV:
            return rec, False
        if record_missing:
            ok = rec.status in (SUCCESS, FALSE_PREDICATE)
            partial = rec.status & 0x7F in (PAGE_FAULT, PAGE_REQUEST_REJECTED)
            found = d.opcode in (COMPARE, COMPARE_PATTERN) and rec.result == 1
            if ok and not found and d.opcode not in (BATCH, NOOP, DRAIN, CREATE_DELTA):
                rec.bytes_completed = d.size
            if ok or partial:
                rec.status, rec.fault_addr, rec.fault_info = RECORD_FAULT, d.completion, 1
            self.write(d.completion, rec.pack())
            return rec, True
        if d.flags & RCR or rec.status != SUCCESS:
            self.write(d.completion, rec.pack())
            return rec, True
        return rec, False

    def _fail(self, rec: Rec, status: int, **fields) -> None:
        rec.status = status
        for key, value in fields.items():
            setattr(rec, key, value)
        raise _Stop

    def _streams_stop(self, rec: Rec, streams: list[tuple[int, bool]], n: int, bof: bool) -> int:
        """Bytes that can be done over all streams before a fault; fills in
        the fault (reads win ties, as they are listed first)."""
        while True:
            at, culprit = n, None
            for addr, is_write in streams:
                off = self.first_missing(addr, n)
                if off < at:
                    at, culprit = off, (addr, is_write)
            if culprit is None:
                return n
            addr = culprit[0] + at
            if bof and addr // PAGE * PAGE not in self.sticky:
                self.missing.discard(addr // PAGE * PAGE)  # the page request is served; the device waits
                continue
            if bof:
                rec.status = PAGE_REQUEST_REJECTED
            else:
                rec.status = PAGE_FAULT | (WRITE_BIT if culprit[1] else 0)
            rec.fault_info, rec.fault_addr, rec.bytes_completed = int(culprit[1]), addr, at
            return at

    def _body(self, d: Desc, rec: Rec, in_batch: bool) -> None:
        cfg, op, flags = self.config, d.opcode, d.flags
        if op not in KNOWN or op not in cfg.ops or (in_batch and op == BATCH):
            self._fail(rec, UNSUPPORTED)
        crc_op = op in (CRCGEN, COPY_CRC)
        allowed = GENERIC | (CRC_SEED_ADDR | CRC_BYPASS_INV_REFL | CRC_BYPASS_DATA_REFL if crc_op else 0)
        bad = flags & ~allowed
        if flags & BOF and not (cfg.gen_cap & GEN_BOF and cfg.wq_block_on_fault):
            bad |= BOF
        if flags & CACHE_CONTROL and not cfg.gen_cap & (GEN_CC_CACHE if op == CACHE_FLUSH else GEN_CC_MEMORY):
            bad |= CACHE_CONTROL
        if flags & RCR and not flags & CRAV:
            bad |= RCR
        if bad:
            self._fail(rec, INVALID_FLAGS, op_specific=bad)
        if d.reserved:
            self._fail(rec, RESERVED)
        bof = bool(flags & BOF)
        rec.status = SUCCESS
        n = d.size
        if op in (NOOP, DRAIN):
            return
        if op == BATCH:
            return self._batch(d, rec, bof)
        if op == CREATE_DELTA:
            return self._create_delta(d, rec, bof)
        if op == APPLY_DELTA:
            return self._apply_delta(d, rec, bof)
        if not 0 < n <= cfg.max_transfer:
            self._fail(rec, TRANSFER_SIZE)
        overlap = lambda a, b: a < b + n and b < a + n  # noqa: E731
        if op == MEMMOVE:
            src, dst = d.src, d.dst
            if overlap(src, dst) and not cfg.gen_cap & GEN_OVERLAP:
                self._fail(rec, OVERLAP)
            if src < dst < src + n:  # overlapping, destination above: the copy runs backwards
                rec.result = 1
                return self._backward(d, rec, bof)
            at = self._streams_stop(rec, [(src, False), (dst, True)], n, bof)
            self.write(dst, self.read(src, at))
        elif op == MEMFILL:
            at = self._streams_stop(rec, [(d.dst, True)], n, bof)
            pattern = struct.pack("<Q", d.src)
            self.write(d.dst, (pattern * (at // 8 + 1))[:at])
        elif op in (COMPARE, COMPARE_PATTERN):
            streams = [(d.src, False)] + ([(d.dst, False)] if op == COMPARE else [])
            saved = dataclasses.replace(rec)
            at = self._streams_stop(rec, streams, n, bof)
            a = self.read(d.src, at)
            b = self.read(d.dst, at) if op == COMPARE else (struct.pack("<Q", d.dst) * (at // 8 + 1))[:at]
            diff = next((i for i in range(at) if a[i] != b[i]), None)
            if diff is not None:  # a difference before any fault: that is the answer
                rec.__dict__.update(saved.__dict__)
                rec.status, rec.result, rec.bytes_completed = SUCCESS, 1, diff
            if rec.status == SUCCESS and flags & CHECK_RESULT and rec.result != d.op[0]:
                rec.status = FALSE_PREDICATE
        elif op in (CRCGEN, COPY_CRC):
            if op == COPY_CRC and overlap(d.src, d.dst):
                self._fail(rec, OVERLAP)
            seed = d.u32(40)
            if flags & CRC_SEED_ADDR:
                seed_addr = d.u64(48)
                if self._streams_stop(rec, [(seed_addr, False)], 4, bof) < 4 or rec.status != SUCCESS:
                    rec.bytes_completed = 0
                    raise _Stop
                seed = struct.unpack("<I", self.read(seed_addr, 4))[0]
            streams = [(d.src, False)] + ([(d.dst, True)] if op == COPY_CRC else [])
            at = self._streams_stop(rec, streams, n, bof)
            if op == COPY_CRC:
                self.write(d.dst, self.read(d.src, at))
            rec.op_specific = crc(self.read(d.src, at), seed, flags)
        elif op == DUALCAST:
            dst2 = d.u64(40)
            if d.dst % PAGE != dst2 % PAGE:
                self._fail(rec, DUALCAST_ALIGN)
            if overlap(d.src, d.dst) or overlap(d.src, dst2) or overlap(d.dst, dst2):
                self._fail(rec, OVERLAP)
            at = self._streams_stop(rec, [(d.src, False), (d.dst, True), (dst2, True)], n, bof)
            data = self.read(d.src, at)
            self.write(d.dst, data)
            self.write(dst2, data)
        elif op == CACHE_FLUSH:
            self._streams_stop(rec, [(d.dst, False)], n, bof)

    def _backward(self, d: Desc, rec: Rec, bof: bool) -> None:
        """Overlapping memmove from the top down; a fault leaves the top done."""
        n = d.size
        while True:
            hi, culprit = -1, None
            for addr, is_write in ((d.src, False), (d.dst, True)):
                off = self.last_missing(addr, n)
                if off > hi:
                    hi, culprit = off, (addr, is_write)
            if culprit and bof and (culprit[0] + hi) // PAGE * PAGE not in self.sticky:
                self.missing.discard((culprit[0] + hi) // PAGE * PAGE)
                continue
            break
        at = hi + 1
        self.write(d.dst + at, self.read(d.src + at, n - at))
        if culprit is not None:
            rec.status = PAGE_REQUEST_REJECTED if bof else PAGE_FAULT | (WRITE_BIT if culprit[1] else 0)
            rec.fault_info, rec.fault_addr, rec.bytes_completed = int(culprit[1]), culprit[0] + hi, n - at

    def _batch(self, d: Desc, rec: Rec, bof: bool) -> None:
        """Members in order; one that is not Success (a false predicate too)
        fails the batch; a FENCE after a failure abandons the rest; a missing
        list page stops it (status 6, descriptors completed so far)."""
        if d.src % 64:
            self._fail(rec, LIST_ALIGN)
        if not 2 <= d.size <= self.config.max_batch:
            self._fail(rec, DESC_COUNT)
        failed = False
        for i in range(d.size):
            addr = d.src + 64 * i
            probe = Rec()
            if self._streams_stop(probe, [(addr, False)], 64, bof) < 64 or probe.status == PAGE_REQUEST_REJECTED:
                self._fail(rec, BATCH_LIST_FAULT, fault_addr=probe.fault_addr, bytes_completed=i, result=int(failed))
            member = Desc.unpack(self.read(addr, 64))
            if member.flags & FENCE and failed:
                self._fail(rec, BATCH_FAIL, result=1, bytes_completed=i)
            outcome, _ = self._one(member, in_batch=True)
            failed = failed or outcome.status != SUCCESS
        rec.status = BATCH_FAIL if failed else SUCCESS
        rec.result, rec.bytes_completed = int(failed), d.size

    def _create_delta(self, d: Desc, rec: Rec, bof: bool) -> None:
        n, delta, cap = d.size, d.u64(40), d.u32(48)
        if not n or n % 8 or n > 0x10000 * 8 or n > self.config.max_transfer:
            self._fail(rec, TRANSFER_SIZE)
        if not cap or cap % 10:
            self._fail(rec, DELTA_SIZE)
        if delta < d.src + n and d.src < delta + cap or delta < d.dst + n and d.dst < delta + cap:
            self._fail(rec, OVERLAP)
        done = self._streams_stop(rec, [(d.src, False), (d.dst, False)], n, bof)
        if done == n:
            if self._streams_stop(rec, [(delta, True)], cap, bof) < cap or rec.status != SUCCESS:
                rec.bytes_completed = 0
                raise _Stop
        else:
            rec.bytes_completed = 0
            raise _Stop
        a, b, out = self.read(d.src, n), self.read(d.dst, n), bytearray()
        for off in range(0, n, 8):
            if a[off : off + 8] != b[off : off + 8]:
                if len(out) + 10 > cap:
                    rec.result, rec.bytes_completed, rec.op_specific = 2, off, len(out)
                    self.write(delta, bytes(out))
                    return
                out += struct.pack("<H", off // 8) + b[off : off + 8]
        self.write(delta, bytes(out))
        rec.result, rec.bytes_completed, rec.op_specific = int(bool(out)), n, len(out)

    def _apply_delta(self, d: Desc, rec: Rec, bof: bool) -> None:
        n, size, delta = d.size, d.u32(40), d.src
        if not n or n % 8 or n > 0x10000 * 8 or n > self.config.max_transfer:
            self._fail(rec, TRANSFER_SIZE)
        if not size or size % 10 or size > n // 8 * 10:
            self._fail(rec, DELTA_SIZE)
        if delta < d.dst + n and d.dst < delta + size:
            self._fail(rec, OVERLAP)
        if self._streams_stop(rec, [(delta, False)], size, bof) < size or rec.status != SUCCESS:
            rec.bytes_completed = 0
            raise _Stop
        if self._streams_stop(rec, [(d.dst, True)], n, bof) < n or rec.status != SUCCESS:
            rec.bytes_completed = 0
            raise _Stop
        record = self.read(delta, size)
        previous = -1
        for i in range(0, size, 10):
            (granule,) = struct.unpack_from("<H", record, i)
            if granule <= previous:
                self._fail(rec, DELTA_NOT_INCREASING, bytes_completed=i)
            if granule * 8 + 8 > n:
                self._fail(rec, DELTA_OUT_OF_RANGE, bytes_completed=i)
            previous = granule
        for i in range(0, size, 10):
            (granule,) = struct.unpack_from("<H", record, i)
            self.write(d.dst + granule * 8, record[i + 2 : i + 10])
        rec.bytes_completed = n
