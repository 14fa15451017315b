"""Zucchini's ELF disassembler: where an ELF element's references are and how to rewrite them.

Zucchini reads an ELF image (32-bit x86 and ARM, 64-bit x86-64 and AArch64,
little-endian, executable or shared object) through its section headers:

* every section with an address maps file offsets to virtual addresses
  (RVAs), :class:`Translator`; ``.bss``-like sections give "dangling" RVAs,
  addressed by fake offsets past the image;
* relocation sections (REL/RELA) give **reloc** references: each
  ``R_*_RELATIVE`` entry's ``r_offset`` field, whose target is the place it
  relocates;
* those places are **abs32** references: pointer-sized absolute addresses;
* executable sections, scanned between the abs32 references, give **rel32**
  references: x86 ``call``/``jmp``/``jcc`` rel32 operands (and RIP-relative
  operands on x86-64), ARM and AArch64 branch immediates.

Each kind is a "reference type" in a "pool" of targets (reloc 0, abs32 1,
rel32 2). The apply step (``_zucchini_refs``) reads references in the old
element and writes corrected ones into the new element with these readers
and writers. The hot loops (scanning executable sections, reading targets,
correcting references) are in ``_zucchini_kernel``, in C when built.

Everything read from an image is bounds-checked; an image zucchini would not
accept raises :class:`ZucchiniError` naming what is wrong.
"""

from __future__ import annotations

import bisect
import struct
from array import array
from typing import Iterator, NamedTuple

from dmuserd.snapshot._zucchini import (
    EXE_ELF_AARCH32,
    EXE_ELF_AARCH64,
    EXE_ELF_X64,
    EXE_ELF_X86,
    ZucchiniError,
)
from dmuserd.snapshot import _zucchini_arm as arm
from dmuserd.snapshot import _zucchini_kernel as kernel

INVALID_OFFSET = 0xFFFFFFFE
OFFSET_BOUND = RVA_BOUND = 0x7FFFFFFF
_SIZE_BOUND = 0x7FFF0000
_M32 = 0xFFFFFFFF

_SHT_PROGBITS, _SHT_RELA, _SHT_NOBITS, _SHT_REL = 1, 4, 8, 9
_SHF_EXECINSTR, _SHF_TLS = 0x4, 0x400

# Section judgements (bits).
_SAFE, _TRANSLATE, _BOUND, _POINTERS = 1, 2, 4, 8

POOL_RELOC, POOL_ABS32, POOL_REL32 = 0, 1, 2


class _Arch(NamedTuple):
    name: str
    machine: int
    bits64: bool
    rel_type: int


_ARCHES = {
    EXE_ELF_X86: _Arch("ELF x86", 3, False, 8),
    EXE_ELF_X64: _Arch("ELF x86-64", 62, True, 8),
    EXE_ELF_AARCH32: _Arch("ELF ARM", 40, False, 23),
    EXE_ELF_AARCH64: _Arch("ELF AArch64", 183, True, 0x403),
}


class NotParsed(Exception):
    """Internal: the image is not an ELF zucchini's disassembler accepts (the reason)."""


class Translator:
    """Offsets <-> RVAs through address units (merged sections), as zucchini's AddressTranslator.

    Raises :class:`NotParsed` for inconsistent units (overlaps that disagree).
    """

    def __init__(self, units: list[list[int]]) -> None:
        # unit: [offset_begin, offset_size, rva_begin, rva_size]
        for u in units:
            if not (u[0] < OFFSET_BOUND and u[1] <= OFFSET_BOUND - u[0]
                    and u[2] < RVA_BOUND and u[3] <= RVA_BOUND - u[2]):
                raise NotParsed("an address unit overflows")
            u[1] = min(u[1], u[3])
        units = [u for u in units if u[3]]
        units.sort(key=lambda u: (u[2], u[3]))
        uniq: list[list[int]] = []
        for u in units:
            if not uniq or uniq[-1] != u:
                uniq.append(u)
        units = uniq
        if len(units) > 1:
            merged = [units[0]]
            for fast in units[1:]:
                slow = merged[-1]
                slow_rva_end = slow[2] + slow[3]
                if slow_rva_end < fast[2]:
                    merged.append(list(fast))
                    continue
                optional = slow_rva_end == fast[2]
                if fast[0] < slow[0] or fast[0] - slow[0] != fast[2] - slow[2]:
                    if optional:
                        merged.append(list(fast))
                        continue
                    raise NotParsed("sections overlap in addresses but not in offsets")
                fast_dangles, slow_dangles = fast[3] > fast[1], slow[3] > slow[1]
                if (fast_dangles and fast[0] + fast[1] < slow[0] + slow[1]) or (
                        slow_dangles and slow[0] + slow[1] < fast[0] + fast[1]):
                    if optional:
                        merged.append(list(fast))
                        continue
                    raise NotParsed("sections overlap with dangling addresses")
                slow[3] = max(slow[3], fast[2] + fast[3] - slow[2])
                slow[1] = max(slow[1], fast[0] + fast[1] - slow[0])
            units = merged
        by_offset = sorted(units, key=lambda u: u[0])
        for prev, cur in zip(by_offset, by_offset[1:]):
            if prev[0] + prev[1] > cur[0]:
                raise NotParsed("sections overlap in file offsets")
        offset_bound = max((u[0] + u[1] for u in units), default=0)
        rva_bound = max((u[2] + u[3] for u in units), default=0)
        if not (offset_bound < OFFSET_BOUND and rva_bound <= OFFSET_BOUND - offset_bound):
            raise NotParsed("addresses reach too far")
        flat = array("I", [v for u in sorted(units, key=lambda u: u[2]) for v in u])
        self.units = kernel.Units(flat, offset_bound)


class Group(NamedTuple):
    """A reference type: its tag (an index into ``groups()``), its pool and its kernel kind."""

    type_tag: int
    pool: int
    kind: int


class ElfImage:
    """One ELF element, parsed as zucchini's DisassemblerElf does.

    ``full`` also finds the references (needed for the old element); the new
    element only needs its address translation for the writers.
    """

    def __init__(self, exe_type: int, data: memoryview, full: bool) -> None:
        self.exe_type = exe_type
        arch = self.arch = _ARCHES[exe_type]
        self.bits64 = arch.bits64
        self.width = 8 if arch.bits64 else 4
        self._parse_header(data)
        self.data = data[: self.size]
        self.reloc_dims: list[tuple[int, int, int]] = []
        self.exec_sections: list[tuple[int, int, int]] = []  # (offset, size, addr)
        self.abs32: list[int] = []
        self.rel32: dict[int, list[int]] = {}
        if full:
            self._find_sections()
            self._find_abs32()
            self._find_rel32()

    # -- header ---------------------------------------------------------------

    def _parse_header(self, data: memoryview) -> None:
        size = len(data)
        if size > _M32:
            raise NotParsed("larger than 4 GiB")
        b64 = self.bits64
        ehdr = struct.Struct("<16sHHIQQQIHHHHHH" if b64 else "<16sHHIIIIIHHHHHH")
        if size < ehdr.size or bytes(data[:4]) != b"\x7fELF":
            raise NotParsed("no ELF header")
        (ident, e_type, machine, version, _entry, phoff, shoff, _flags, _ehsize, _phentsize, phnum,
         shentsize, shnum, shstrndx) = ehdr.unpack_from(data, 0)
        if ident[4] != (2 if b64 else 1):
            raise NotParsed(f"ELF class {ident[4]} is not {'64' if b64 else '32'}-bit")
        if ident[5] != 1:
            raise NotParsed("not little-endian")
        if e_type not in (2, 3):
            raise NotParsed(f"ELF type {e_type} is neither an executable nor a shared object")
        if version != 1 or ident[6] != 1:
            raise NotParsed("ELF version is not 1")
        if machine != self.arch.machine:
            raise NotParsed(f"machine {machine} is not {self.arch.machine}")
        shdr = struct.Struct("<IIQQQQIIQQ" if b64 else "<IIIIIIIIII")
        if shentsize != shdr.size:
            raise NotParsed(f"section header size {shentsize} is not {shdr.size}")
        phdr_size = 56 if b64 else 32
        sh_start = min(shoff, size)
        if (size - sh_start) // shdr.size < shnum:
            raise NotParsed(f"{shnum} section headers at {shoff} run past the image")
        section_table_end = sh_start + shnum * shdr.size
        sections = [shdr.unpack_from(data, sh_start + i * shdr.size) for i in range(shnum)]
        ph_start = min(phoff, size)
        if (size - ph_start) // phdr_size < phnum:
            raise NotParsed(f"{phnum} program headers at {phoff} run past the image")
        segment_table_end = ph_start + phnum * phdr_size
        if shstrndx >= shnum:
            raise NotParsed(f"section name table index {shstrndx} is not below the {shnum} sections")
        names = sections[shstrndx]
        names_size, names_offset = names[5], names[4]
        if names_size > 0:
            start = min(names_offset, size)
            if size - start < names_size or data[start + names_size - 1] != 0:
                raise NotParsed("section name table is cut or not NUL-terminated")
        offset_bound = max(section_table_end, segment_table_end)
        for i in range(phnum):
            at = ph_start + i * phdr_size
            if b64:
                p_offset, p_filesz = struct.unpack_from("<Q", data, at + 8)[0], struct.unpack_from("<Q", data, at + 32)[0]
            else:
                p_offset, p_filesz = struct.unpack_from("<I", data, at + 4)[0], struct.unpack_from("<I", data, at + 16)[0]
            end = p_offset + p_filesz
            if p_offset > _M32 or p_filesz > _M32 or end > _M32 or p_offset > size or size - p_offset < p_filesz:
                raise NotParsed(f"segment {i} ({p_offset}+{p_filesz}) is outside the image")
            offset_bound = max(offset_bound, end)
        units = []
        judgements = []
        for i, (_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, _link, _info, _align, _entsize) in \
                enumerate(sections):
            judgement = self._judge(size, sh_type, sh_flags, sh_addr, sh_offset, sh_size)
            if not judgement & _SAFE:
                raise NotParsed(f"section {i} ({sh_offset}+{sh_size} at address {sh_addr:#x}) is malformed")
            judgements.append(judgement)
            if judgement & _TRANSLATE:
                units.append([sh_offset, sh_size, sh_addr, sh_size])
            if judgement & _BOUND:
                offset_bound = max(offset_bound, sh_offset + sh_size)
        self.units = Translator(units).units
        self.sections = sections
        self.judgements = judgements
        self.size = offset_bound

    @staticmethod
    def _judge(image_size: int, sh_type: int, sh_flags: int, sh_addr: int, sh_offset: int, sh_size: int) -> int:
        if not (sh_addr <= _SIZE_BOUND and _SIZE_BOUND - sh_addr >= sh_size):
            return 0
        bound = _SIZE_BOUND if sh_type == _SHT_NOBITS else image_size
        if not (sh_offset <= bound and bound - sh_offset >= sh_size):
            return 0
        if sh_size == 0 or sh_addr == 0:
            return _SAFE
        if sh_type == _SHT_NOBITS:
            return _SAFE if sh_flags & _SHF_TLS else _SAFE | _TRANSLATE
        return _SAFE | _TRANSLATE | _BOUND | _POINTERS

    # -- reference discovery ----------------------------------------------------

    def _find_sections(self) -> None:
        rel_size, rela_size = (16, 24) if self.bits64 else (8, 12)
        for (_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, _l, _i, _a, entsize), judgement in zip(
                self.sections, self.judgements):
            if not judgement & _POINTERS:
                continue
            if (sh_type == _SHT_REL and entsize == rel_size) or (sh_type == _SHT_RELA and entsize == rela_size):
                self.reloc_dims.append((sh_offset, sh_size, entsize))
            elif sh_type == _SHT_PROGBITS and sh_flags & _SHF_EXECINSTR:
                self.exec_sections.append((sh_offset, sh_size, sh_addr))
        self.reloc_dims.sort(key=lambda d: d[0])
        self.exec_sections.sort(key=lambda s: s[0])
        self.reloc_starts = [d[0] for d in self.reloc_dims]

    def _find_abs32(self) -> None:
        locations = array("I", sorted(t for _, t in self.read_relocs(0, self.size)))
        # abs32 targets must translate to offsets
        kept, _ = kernel.read_refs(self.abs32_kind, self.data, locations, self.units)
        # bodies must not overlap: keep the first of each overlapping run
        out = array("I")
        width = self.width
        for loc in kept:
            if not out or loc - out[-1] >= width:
                out.append(loc)
        self.abs32 = out

    @property
    def abs32_kind(self) -> int:
        return kernel.ABS32_8 if self.bits64 else kernel.ABS32_4

    def _gaps(self, lo: int, hi: int) -> array:
        """The stretches of ``[lo, hi)`` between abs32 reference bodies, as (lo, hi) pairs."""
        abs32, width = self.abs32, self.width
        out = array("I")
        i = bisect.bisect_left(abs32, lo)
        cur = lo
        if i:
            cur = max(cur, abs32[i - 1] + width)
        while i < len(abs32) and abs32[i] < hi:
            if abs32[i] > cur:
                out.extend((cur, abs32[i]))
            cur = abs32[i] + width
            i += 1
        if cur < hi:
            out.extend((cur, hi))
        return out

    def _find_rel32(self) -> None:
        if self.exe_type in (EXE_ELF_X86, EXE_ELF_X64):
            found = array("I")
            for offset, size, addr in self.exec_sections:
                found.extend(kernel.scan_intel(self.data, self._gaps(offset, offset + size),
                                               self.exe_type == EXE_ELF_X64, self.units, addr, addr + size))
            self.rel32 = {0: array("I", sorted(found))}
            return
        exec_ranges = array("I", [v for s in self.exec_sections for v in s[:2]])
        table: dict[int, list[int]] = {}
        for offset, size, addr in self.exec_sections:
            if self.exe_type == EXE_ELF_AARCH32:
                mode = arm.MODE_T32 if arm.is_thumb2(self.data, offset, size, addr) else arm.MODE_A32
            else:
                mode = arm.MODE_A64
            found = kernel.scan_arm(self.data, self._gaps(offset, offset + size), mode, self.units, exec_ranges)
            for i in range(0, len(found), 2):
                table.setdefault(found[i], []).append(found[i + 1])
        self.rel32 = {t: array("I", sorted(v)) for t, v in table.items()}

    # -- readers ---------------------------------------------------------------

    def read_relocs(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """Reloc references with entries in ``[lo, hi)``: (entry offset, target offset), as RelocReaderElf."""
        dims = self.reloc_dims
        if not dims:
            return
        data, units, width, size = self.data, self.units, self.width, self.size
        idx = bisect.bisect_right(self.reloc_starts, lo)
        if idx:
            idx -= 1
        offset, sec_size, entsize = dims[idx]
        cursor = offset
        if cursor < lo:
            cursor += -(-(lo - cursor) // entsize) * entsize
        e = bisect.bisect_right(self.reloc_starts, hi)
        if e:
            e_off, e_size, e_ent = dims[e - 1]
            if hi - e_off < e_size:
                hi = e_off + -(-(hi - e_off) // e_ent) * e_ent
        sec_end = offset + sec_size
        rel_size = 16 if self.bits64 else 8
        rel_type = self.arch.rel_type
        while cursor + entsize <= hi:
            while cursor >= sec_end:
                idx += 1
                if idx == len(dims):
                    return
                offset, sec_size, entsize = dims[idx]
                cursor = offset
                if cursor + entsize > hi:
                    return
                sec_end = offset + sec_size
            if cursor + rel_size > size:
                raise ZucchiniError(f"relocation entry at {cursor} runs past the {size}-byte ELF image")
            if self.bits64:
                r_offset, r_info = struct.unpack_from("<QQ", data, cursor)
                ok = (r_info & _M32) == rel_type and r_offset <= _M32
            else:
                r_offset, r_info = struct.unpack_from("<II", data, cursor)
                ok = (r_info & 0xFF) == rel_type
            location = cursor
            cursor += entsize
            if not ok:
                continue
            target = units.rva_to_offset(r_offset)
            if target == INVALID_OFFSET or target > size or size - target < width:
                continue
            yield location, target

    def groups(self) -> list[Group]:
        """The reference types, indexed by type tag, as zucchini's MakeReferenceGroups lists them."""
        out = [Group(0, POOL_RELOC, kernel.RELOC64 if self.bits64 else kernel.RELOC32),
               Group(1, POOL_ABS32, self.abs32_kind)]
        if self.exe_type in (EXE_ELF_X86, EXE_ELF_X64):
            out.append(Group(2, POOL_REL32, kernel.REL32_X86))
        else:
            a64 = self.exe_type == EXE_ELF_AARCH64
            for t in arm.addr_types(a64):
                out.append(Group(2 + t, POOL_REL32, (kernel.A64_KIND if a64 else kernel.ARM_KIND) + t))
        return out

    def all_refs(self, group: Group) -> tuple[array, array]:
        """(locations, targets) of every reference of ``group`` in the image, by location."""
        if group.type_tag == 0:
            refs = list(self.read_relocs(0, self.size))
            return array("I", [r[0] for r in refs]), array("I", [r[1] for r in refs])
        if group.type_tag == 1:
            return kernel.read_refs(group.kind, self.data, self.abs32, self.units)
        return kernel.read_refs(group.kind, self.data, self.rel32.get(group.type_tag - 2, array("I")), self.units)

    def refs_in_blocks(self, group: Group, equivalences) -> tuple[array, array, array]:
        """The references in each equivalence's old block, in patch order, with runs (begin, end, shift)."""
        runs = array("q")
        if group.type_tag == 0:
            locs, targets = array("I"), array("I")
            for eq in equivalences:
                begin = len(locs)
                for loc, target in self.read_relocs(eq.src, eq.src + eq.length):
                    locs.append(loc)
                    targets.append(target)
                runs.extend((begin, len(locs), eq.dst - eq.src))
            return locs, targets, runs
        locs, targets = self.all_refs(group)
        src = array("I", [eq.src for eq in equivalences])
        end = array("I", [eq.src + eq.length for eq in equivalences])
        if group.type_tag == 1:
            # zucchini stops if a block boundary cuts an abs32 reference's body
            abs32, width = self.abs32, self.width
            for bounds in (src, end):
                starts = kernel.block_runs(abs32, bounds, bounds, bounds)
                for k in range(0, len(starts), 3):
                    i = starts[k]
                    if i and bounds[k // 3] - abs32[i - 1] < width:
                        raise ZucchiniError(f"an equivalence boundary at old offset {bounds[k // 3]} cuts the "
                                            f"abs32 reference at {abs32[i - 1]}")
        runs = kernel.block_runs(locs, src, end, array("I", [eq.dst for eq in equivalences]))
        return locs, targets, runs


def disassemble(exe_type: int, data: memoryview, full: bool, what: str) -> ElfImage:
    """``data`` parsed as an ELF element of ``exe_type``; :class:`ZucchiniError` if zucchini would not."""
    try:
        return ElfImage(exe_type, data, full)
    except NotParsed as exc:
        raise ZucchiniError(f"{what} is not an {_ARCHES[exe_type].name} image zucchini reads: {exc}") from None
