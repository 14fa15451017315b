"""The hot loops of Zucchini's ELF apply, in pure Python, mirrored in C by ``_zucchini_native.c``.

Three loops dominate the time on real binaries: scanning executable sections
for rel32 branches, reading every reference's target in the old element, and
correcting the references (projection, nearest target, delta, write). Each is
a function here over flat arrays, with a C twin of the same signature in the
optional extension ``dmuserd.snapshot._zucchini_native``; :data:`native` is
that module, or None when it is not built. The Python versions are the
reference the tests compare the C ones against.

Arrays: offsets, RVAs and targets are ``array('I')``; reference deltas
``array('i')``; runs ``array('q')`` (index begin, index end, shift) triples;
a translator is its units sorted by RVA, flattened as (offset, offset size,
RVA, RVA size) ``array('I')``, with the fake offset start. Errors are
ValueError with a message; callers add where.
"""

from __future__ import annotations

import bisect
import re
import struct
from array import array

from dmuserd.snapshot import _zucchini_arm as arm

try:
    from dmuserd.snapshot import _zucchini_native as native
except ImportError:  # the optional extension is not built
    native = None

INVALID = 0xFFFFFFFE
OFFSET_BOUND = 0x7FFFFFFF
_M32 = 0xFFFFFFFF

# reference kinds (what a reader reads and a writer writes)
RELOC32, RELOC64, ABS32_4, ABS32_8, REL32_X86 = range(5)
ARM_KIND = 5  # ARM_KIND + AArch32 address type (A24, T8, T11, T20, T24)
A64_KIND = 10  # A64_KIND + AArch64 address type (IMMD14, IMMD19, IMMD26)


class Units:
    """A translator's units for the kernels: offset <-> RVA lookups over the flat arrays."""

    def __init__(self, flat: array, fake: int) -> None:
        self.flat, self.fake = flat, fake
        by_rva = [tuple(flat[i : i + 4]) for i in range(0, len(flat), 4)]
        self.by_rva = by_rva
        self.rva_starts = [u[2] for u in by_rva]
        self.by_offset = sorted(by_rva)
        self.off_starts = [u[0] for u in self.by_offset]

    def _rva_unit(self, rva: int):
        i = bisect.bisect_right(self.rva_starts, rva)
        if i:
            u = self.by_rva[i - 1]
            if rva - u[2] < u[3]:
                return u
        return None

    def offset_to_rva(self, offset: int) -> int:
        if offset >= self.fake:
            rva = offset - self.fake
            u = self._rva_unit(rva)
            if u is not None and u[3] > u[1] and rva - u[2] >= u[1]:
                return rva
            return INVALID
        i = bisect.bisect_right(self.off_starts, offset)
        if i:
            u = self.by_offset[i - 1]
            if offset - u[0] < u[1]:
                return offset - u[0] + u[2]
        return INVALID

    def rva_to_offset(self, rva: int) -> int:
        u = self._rva_unit(rva)
        if u is None:
            return INVALID
        delta = rva - u[2]
        return delta + u[0] if delta < u[1] else self.fake + rva

    def rva_valid(self, rva: int) -> bool:
        return rva != INVALID and self._rva_unit(rva) is not None


_X86 = re.compile(rb"(?=[\xe8\xe9]|\x0f[\x80-\x8f])", re.S)
_X64 = re.compile(rb"(?=[\xe8\xe9]|\x0f[\x80-\x8f]|\xff[\x15\x25]|[\x89\x8b\x8d][\x05\x0d\x15\x1d\x25\x2d\x35\x3d])",
                  re.S)


def py_scan_intel(data, gaps: array, x64: bool, units: Units, start_rva: int, end_rva: int) -> array:
    """x86/x86-64 rel32 operand locations in the gaps (lo, hi pairs), as zucchini's Rel32FinderX86/X64.

    A candidate (call/jmp/jcc rel32; on x86-64 also RIP-relative call/jmp
    through memory and mov/lea) is taken if its target RVA is mapped and, for
    branches, inside the section; taking one skips its operand.
    """
    pattern = _X64 if x64 else _X86
    out = array("I")
    for g in range(0, len(gaps), 2):
        lo, hi = gaps[g], gaps[g + 1]
        pos = lo
        for m in pattern.finditer(data, lo, hi):
            cur = m.start()
            if cur < pos:
                continue
            b0 = data[cur]
            if b0 == 0xE8 or b0 == 0xE9:
                if cur + 5 > hi:
                    continue
                op, outside = 1, False
            elif cur + 6 > hi:
                continue
            else:
                op, outside = 2, b0 != 0x0F
            location = cur + op
            disp = data[location] | data[location + 1] << 8 | data[location + 2] << 16 | data[location + 3] << 24
            target = (units.offset_to_rva(location) + 4 + disp) & _M32
            if units.rva_valid(target) and (outside or start_rva <= target < end_rva):
                out.append(location)
                pos = location + 4
    return out


def py_scan_arm(data, gaps: array, mode: int, units: Units, exec_ranges: array) -> array:
    """ARM/THUMB2/AArch64 branches in the gaps whose targets are in an executable section.

    Returns (address type, location) pairs flattened.
    """
    starts = [exec_ranges[i] for i in range(0, len(exec_ranges), 2)]
    out = array("I")
    for g in range(0, len(gaps), 2):
        lo, hi = gaps[g], gaps[g + 1]
        found = arm.scan_gap(data, lo, hi, mode, units)
        for addr_type, location, target_rva in found:
            target = units.rva_to_offset(target_rva)
            if target == INVALID:
                continue
            i = bisect.bisect_right(starts, target)
            if i and target - exec_ranges[2 * i - 2] < exec_ranges[2 * i - 1]:
                out.append(addr_type)
                out.append(location)
    return out


def py_read_refs(kind: int, data, locations: array, units: Units) -> tuple[array, array]:
    """(locations, targets) of the references of ``kind`` at ``locations`` that resolve, in order."""
    locs, targets = array("I"), array("I")
    size = len(data)
    if kind in (ABS32_4, ABS32_8):
        width = 4 if kind == ABS32_4 else 8
        for loc in locations:
            if not (loc < size and size - loc >= width):
                continue
            value = int.from_bytes(data[loc : loc + width], "little")
            if value >= OFFSET_BOUND:
                continue
            target = units.rva_to_offset(value)
            if target != INVALID:
                locs.append(loc)
                targets.append(target)
    elif kind == REL32_X86:
        for loc in locations:
            disp = int.from_bytes(data[loc : loc + 4], "little")
            locs.append(loc)
            targets.append(units.rva_to_offset((units.offset_to_rva(loc) + 4 + disp) & _M32))
    else:
        a64, addr_type = (True, kind - A64_KIND) if kind >= A64_KIND else (False, kind - ARM_KIND)
        width, halves = arm.code_width(a64, addr_type)
        for loc in locations:
            if loc + width > size:
                raise ValueError(f"a branch at old offset {loc} runs past the {size}-byte ELF image")
            code = arm.fetch(data, loc, width, halves)
            target_rva = arm.read_target(a64, addr_type, units.offset_to_rva(loc), code)
            if target_rva is not None:
                target = units.rva_to_offset(target_rva)
                if target != INVALID:
                    locs.append(loc)
                    targets.append(target)
    return locs, targets


def py_decode_varints(data, signed: bool) -> tuple[array, int]:
    """A whole stream of zucchini varints: (values, offset of the first bad one or -1).

    A varint is at most 5 bytes, little-endian groups of 7 bits; bits past 32
    are dropped as zucchini's decoder drops them. Signed ones are zigzag
    coded; they come back as int32 in an ``array('i')``.
    """
    out = array("i" if signed else "I")
    pos, end = 0, len(data)
    while pos < end:
        at = pos
        value = shift = 0
        while True:
            if pos == end:
                return out, at
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift >= 32:
                return out, at
        value &= _M32
        out.append((~(value >> 1) if value & 1 else value >> 1) if signed else value)
    return out, -1


def py_apply_raw_delta(buf: bytearray, base: int, length: int, eq_dst: array, eq_len: array, offsets: array,
                       diffs: bytes) -> int:
    """Add ``diffs[k]`` to the byte at copy offset ``offsets[k]`` of the concatenated copied blocks.

    The blocks (new offsets ``eq_dst``, lengths ``eq_len``, in patch order)
    belong to the element at ``base``. Returns -1, or the index of the first
    delta past the bytes the blocks copy.
    """
    i = covered = 0
    neq = len(eq_dst)
    for k, (offset, diff) in enumerate(zip(offsets, diffs)):
        while i < neq and covered + eq_len[i] <= offset:
            covered += eq_len[i]
            i += 1
        if i == neq:
            return k
        pos = base + eq_dst[i] + offset - covered
        buf[pos] = (buf[pos] + diff) & 0xFF
    return -1


def py_block_runs(locs: array, src: array, end: array, dst: array) -> array:
    """Per equivalence, the slice of the sorted ``locs`` in [src, end) and the shift dst - src."""
    runs = array("q")
    for s, e, d in zip(src, end, dst):
        runs.extend((bisect.bisect_left(locs, s), bisect.bisect_left(locs, e), d - s))
    return runs


def py_project_all(offsets: array, msrc: array, mdst: array, mend: array) -> array:
    """Sorted old offsets that a (pruned) equivalence covers, moved to the new element; the others dropped."""
    out = array("I")
    i, n = 0, len(msrc)
    for off in offsets:
        while i < n and mend[i] <= off:
            i += 1
        if i < n and msrc[i] <= off:
            out.append(off - msrc[i] + mdst[i])
    return out


def py_correct_group(kind: int, buf: bytearray, base: int, length: int, locs: array, targets: array, runs: array,
                  msrc: array, mdst: array, mend: array, old_size: int, new_size: int, pool: array,
                  deltas: array, delta_pos: int, units: Units) -> int:
    """Correct one reference type's references; returns the next reference delta's index.

    ``runs`` lists, per equivalence in patch order, the slice of (``locs``,
    ``targets``) in its old block and the shift to its new block. Each
    reference's old target is projected (nearest block's shift, clamped),
    the nearest ``pool`` target's index plus the next delta picks the new
    target, and the reference is written at its shifted location.
    """
    count = len(pool)
    nmap = len(msrc)
    for r in range(0, len(runs), 3):
        shift = runs[r + 2]
        for k in range(runs[r], runs[r + 1]):
            if delta_pos >= len(deltas):
                raise ValueError(f"the reference delta stream ends after {len(deltas)} references, "
                                 "the old element has more")
            offset = targets[k]
            # the projection of the old target (extended to offsets no block covers)
            if offset < old_size:
                p = bisect.bisect_right(msrc, offset)
                if p and (p == nmap or offset < mend[p - 1] or offset - mend[p - 1] < msrc[p] - offset):
                    p -= 1
                projected = min(max(0, offset - msrc[p] + mdst[p]), new_size - 1)
            else:
                delta = offset - old_size
                projected = new_size + delta if delta < OFFSET_BOUND - new_size else OFFSET_BOUND - 1
            key = bisect.bisect_left(pool, projected)
            if key and (key == count or pool[key] - projected >= projected - pool[key - 1]):
                key -= 1
            key += deltas[delta_pos]
            if not 0 <= key < count:
                raise ValueError(f"reference delta {delta_pos} ({deltas[delta_pos]}) points outside the "
                                 f"pool's {count} targets")
            delta_pos += 1
            _write(kind, buf, base, length, locs[k] + shift, pool[key], units)
    return delta_pos


def _write(kind: int, buf: bytearray, base: int, length: int, location: int, target: int, units: Units) -> None:
    if kind == REL32_X86:
        if location + 4 > length:
            raise ValueError(f"a rel32 reference at new offset {location} runs past the {length}-byte element")
        code = (units.offset_to_rva(target) - (units.offset_to_rva(location) + 4)) & _M32
        struct.pack_into("<I", buf, base + location, code)
    elif kind in (ABS32_4, ABS32_8):
        width = 4 if kind == ABS32_4 else 8
        rva = units.offset_to_rva(target)
        if rva != INVALID and location < length and length - location >= width:
            buf[base + location : base + location + width] = rva.to_bytes(width, "little")
    elif kind in (RELOC32, RELOC64):
        width = 8 if kind == RELOC32 else 16
        if location + width > length:
            raise ValueError(f"a reloc reference at new offset {location} runs past the {length}-byte element")
        field = 4 if kind == RELOC32 else 8
        buf[base + location : base + location + field] = units.offset_to_rva(target).to_bytes(field, "little")
    else:
        a64, addr_type = (True, kind - A64_KIND) if kind >= A64_KIND else (False, kind - ARM_KIND)
        width, halves = arm.code_width(a64, addr_type)
        if location + width > length:
            raise ValueError(f"a branch at new offset {location} runs past the {length}-byte element")
        code = arm.fetch(buf, base + location, width, halves)
        new_code = arm.write_target(a64, addr_type, units.offset_to_rva(location), units.offset_to_rva(target), code)
        if new_code is not None:
            arm.store(buf, base + location, width, halves, new_code)


# -- dispatch: the C kernel when built, else the Python one -------------------------------


def _u32(raw: bytes) -> array:
    out = array("I")
    out.frombytes(raw)
    return out


def scan_intel(data, gaps: array, x64: bool, units: Units, start_rva: int, end_rva: int) -> array:
    if native is not None:
        return _u32(native.scan_intel(data, gaps, x64, units.flat, units.fake, start_rva, end_rva))
    return py_scan_intel(data, gaps, x64, units, start_rva, end_rva)


def scan_arm(data, gaps: array, mode: int, units: Units, exec_ranges: array) -> array:
    if native is not None:
        return _u32(native.scan_arm(data, gaps, mode, units.flat, units.fake, exec_ranges))
    return py_scan_arm(data, gaps, mode, units, exec_ranges)


def read_refs(kind: int, data, locations: array, units: Units) -> tuple[array, array]:
    if native is not None:
        locs, targets = native.read_refs(kind, data, locations, units.flat, units.fake)
        return _u32(locs), _u32(targets)
    return py_read_refs(kind, data, locations, units)


def decode_varints(data, signed: bool) -> tuple[array, int]:
    if native is not None:
        raw, bad = native.decode_varints(data, signed)
        out = array("i" if signed else "I")
        out.frombytes(raw)
        return out, bad
    return py_decode_varints(data, signed)


def apply_raw_delta(buf: bytearray, base: int, length: int, eq_dst: array, eq_len: array, offsets: array,
                    diffs: bytes) -> int:
    if native is not None:
        return native.apply_raw_delta(buf, base, length, eq_dst, eq_len, offsets, diffs)
    return py_apply_raw_delta(buf, base, length, eq_dst, eq_len, offsets, diffs)


def block_runs(locs: array, src: array, end: array, dst: array) -> array:
    if native is not None:
        out = array("q")
        out.frombytes(native.block_runs(locs, src, end, dst))
        return out
    return py_block_runs(locs, src, end, dst)


def project_all(offsets: array, msrc: array, mdst: array, mend: array) -> array:
    if native is not None:
        return _u32(native.project_all(offsets, msrc, mdst, mend))
    return py_project_all(offsets, msrc, mdst, mend)


def correct_group(kind: int, buf: bytearray, base: int, length: int, locs: array, targets: array, runs: array,
                  msrc: array, mdst: array, mend: array, old_size: int, new_size: int, pool: array,
                  deltas: array, delta_pos: int, units: Units) -> int:
    if native is not None:
        return native.correct_group(kind, buf, base, length, locs, targets, runs, msrc, mdst, mend, old_size,
                                    new_size, pool, deltas, delta_pos, units.flat, units.fake)
    return py_correct_group(kind, buf, base, length, locs, targets, runs, msrc, mdst, mend, old_size, new_size,
                            pool, deltas, delta_pos, units)
