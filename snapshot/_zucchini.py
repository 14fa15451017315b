"""Apply a Zucchini patch (the ZUCCHINI install operation) as AOSP's zucchini does.

A Zucchini "ensemble" patch turns an old image into a new one element by
element. The wire format (all integers little-endian):

* a 24-byte header: magic ``Zucc``, major and minor version (u16 each; the
  major must be 1), the old image's size and CRC-32, the new image's size and
  CRC-32;
* an element count (u32), then per element:

  - a 22-byte element header: old offset and length, new offset and length,
    the executable type (four ASCII characters such as ``NoOp`` or ``Ex64``)
    and the disassembler version (u16);
  - three length-prefixed (u32) varint streams describing the equivalences
    (blocks copied from old to new): source skips (signed), destination
    skips and lengths;
  - the extra data (length-prefixed): the bytes of the new element that no
    equivalence covers, in order;
  - the raw delta: two length-prefixed streams, copy-offset skips (varint)
    and byte differences (int8, never 0), added to the copied bytes;
  - the reference delta (length-prefixed signed varints): one per reference
    found by the element's disassembler in the copied old bytes, the distance
    in the new target list between the target the projection predicts and
    the real one;
  - a pool count (u32) and per pool a tag byte and a length-prefixed varint
    stream of extra targets (new targets no old one projects to).

The new elements must tile the new image. An element of type ``NoOp`` is raw
data (no references); ELF elements (x86, x86-64, ARM, AArch64) are
disassembled, their references read in the old element, projected and
corrected with the reference delta, and written into the new element
(``_zucchini_elf``). DEX elements are not implemented yet: they raise
:class:`ZucchiniUnsupportedError` naming the type.

Every count and offset in a patch is hostile: each is checked against the
declared sizes and the patch's length before use, and any malformed patch
raises :class:`ZucchiniError` (a :class:`DataError`) naming the field and
where it is. Memory is bounded by the declared new size (which must be the
``size`` the caller expects) and by the patch's own length. Where AOSP's
zucchini would stop on an internal check (a write past an element, a reader
range that cuts a reference), we raise instead.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from array import array
from typing import NamedTuple

from dmuserd.snapshot import _zucchini_kernel as _kernel
from dmuserd.snapshot._payload_data import DataError

MAGIC = b"Zucc"
MAJOR_VERSION = 1
_HEADER = struct.Struct("<4sHHIIII")
_ELEMENT_HEADER = struct.Struct("<IIIIIH")
_U32 = struct.Struct("<I")
_U32_MAX = 0xFFFFFFFF
_NO_POOL_TAG = 0xFF

# Executable types (the four ASCII characters as a little-endian u32) and the
# disassembler version each must carry; the types AOSP's build leaves out
# (Win32, ZTF) carry the "invalid" version 0xffff.
EXE_NOOP = int.from_bytes(b"NoOp", "little")
EXE_WIN32_X86 = int.from_bytes(b"Px86", "little")
EXE_WIN32_X64 = int.from_bytes(b"Px64", "little")
EXE_ELF_X86 = int.from_bytes(b"Ex86", "little")
EXE_ELF_X64 = int.from_bytes(b"Ex64", "little")
EXE_ELF_AARCH32 = int.from_bytes(b"EA32", "little")
EXE_ELF_AARCH64 = int.from_bytes(b"EA64", "little")
EXE_DEX = int.from_bytes(b"DEX ", "little")
EXE_ZTF = int.from_bytes(b"ZTF ", "little")
_VERSIONS = {
    EXE_NOOP: 1,
    EXE_ELF_X86: 1,
    EXE_ELF_X64: 1,
    EXE_ELF_AARCH32: 1,
    EXE_ELF_AARCH64: 1,
    EXE_DEX: 1,
    EXE_WIN32_X86: 0xFFFF,
    EXE_WIN32_X64: 0xFFFF,
    EXE_ZTF: 0xFFFF,
}


class ZucchiniError(DataError):
    """A Zucchini patch that is malformed or does not apply to the old image."""


class ZucchiniUnsupportedError(ZucchiniError):
    """A well-formed element whose executable type this module cannot apply yet."""


def exe_type_name(exe_type: int) -> str:
    """The four characters of an executable type (``Ex64``), or its hex value."""
    raw = exe_type.to_bytes(4, "little")
    return raw.decode("ascii") if all(0x20 <= b < 0x7F for b in raw) else f"0x{exe_type:08x}"


class PatchHeader(NamedTuple):
    major_version: int
    minor_version: int
    old_size: int
    old_crc: int
    new_size: int
    new_crc: int


class Equivalence(NamedTuple):
    """``length`` bytes of the old element at ``src`` become the new element's at ``dst``."""

    src: int
    dst: int
    length: int


class ElementPatch(NamedTuple):
    """One element's part of the patch, decoded and checked against its bounds.

    ``extra_targets`` keeps each pool's stream undecoded: zucchini reads only
    the pools the element's disassembler has, so a stream of another pool is
    never interpreted (nor rejected).
    """

    index: int
    old_offset: int
    old_length: int
    new_offset: int
    new_length: int
    exe_type: int
    equivalences: list[Equivalence]
    extra_data: memoryview
    raw_delta: tuple[array, bytes]
    reference_deltas: array
    extra_targets: dict[int, tuple[memoryview, int]]


class Patch(NamedTuple):
    header: PatchHeader
    elements: list[ElementPatch]


class _Source:
    """A cursor over part of the patch that names what it reads and where."""

    __slots__ = ("data", "pos", "end", "what")

    def __init__(self, data: memoryview, pos: int, end: int, what: str) -> None:
        self.data, self.pos, self.end, self.what = data, pos, end, what

    def fail(self, field: str, detail: str, at: int | None = None) -> ZucchiniError:
        where = self.pos if at is None else at
        return ZucchiniError(f"zucchini patch: {self.what}: {field} {detail} (patch offset {where})")

    def empty(self) -> bool:
        return self.pos >= self.end

    def take(self, n: int, field: str) -> memoryview:
        if self.end - self.pos < n:
            raise self.fail(field, f"needs {n} bytes, {self.end - self.pos} are left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self, field: str) -> int:
        return _U32.unpack(self.take(4, field))[0]

    def buffer(self, field: str) -> _Source:
        """A length-prefixed (u32) sub-stream; the length is checked against what is left."""
        at = self.pos
        size = self.u32(f"{field} length")
        if size > self.end - self.pos:
            raise self.fail(f"{field} length", f"{size} runs past the {self.end - self.pos} bytes left", at)
        sub = _Source(self.data, self.pos, self.pos + size, self.what)
        self.pos += size
        return sub


def _decode(stream: _Source, signed: bool, field: str) -> array:
    """Every varint of a sub-stream (they must all decode)."""
    values, bad = _kernel.decode_varints(stream.data[stream.pos : stream.end], signed)
    if bad >= 0:
        raise stream.fail(f"{field} {len(values)}", "is a varint cut short or longer than 5 bytes",
                          stream.pos + bad)
    return values


def _parse_equivalences(src: _Source, old_length: int, new_length: int) -> list[Equivalence]:
    """The equivalences from their three streams (read in lockstep), each checked in bounds and order."""
    src_skip = src.buffer("equivalence source skips")
    dst_skip = src.buffer("equivalence destination skips")
    copy_count = src.buffer("equivalence lengths")
    lengths = _decode(copy_count, False, "equivalence length")
    src_skips = _decode(src_skip, True, "equivalence source skip")
    dst_skips = _decode(dst_skip, False, "equivalence destination skip")
    n = min(len(lengths), len(src_skips), len(dst_skips))
    for stream, values, name in ((src_skip, src_skips, "source skips"), (dst_skip, dst_skips, "destination skips"),
                                 (copy_count, lengths, "lengths")):
        if len(values) != n:
            raise stream.fail(f"equivalence {name}", f"have {len(values) - n} values past the {n} "
                              "equivalences the other streams describe")
    out: list[Equivalence] = []
    prev_src = prev_dst = 0
    for i in range(n):
        length = lengths[i]
        src_offset = prev_src + src_skips[i]
        dst_offset = prev_dst + dst_skips[i]
        if src_offset < 0 or src_offset + length > _U32_MAX:
            raise src_skip.fail(f"equivalence {i} source offset", f"{src_offset} (+{length}) overflows")
        if dst_offset + length > _U32_MAX:
            raise dst_skip.fail(f"equivalence {i} destination offset", f"{dst_offset} (+{length}) overflows")
        if not (src_offset < old_length and length <= old_length - src_offset):
            raise src_skip.fail(f"equivalence {i}", f"old block {src_offset}+{length} is outside the "
                                f"{old_length}-byte old element")
        if not (dst_offset < new_length and length <= new_length - dst_offset):
            raise dst_skip.fail(f"equivalence {i}", f"new block {dst_offset}+{length} is outside the "
                                f"{new_length}-byte new element")
        prev_src, prev_dst = src_offset + length, dst_offset + length
        out.append(Equivalence(src_offset, dst_offset, length))
    return out


def _parse_raw_delta(src: _Source) -> tuple[array, bytes]:
    """Copy offsets (strictly increasing) and their byte differences (never 0)."""
    skips = src.buffer("raw delta skips")
    diffs = src.buffer("raw delta differences")
    skip_values = _decode(skips, False, "raw delta skip")
    diff_bytes = bytes(diffs.data[diffs.pos : diffs.end])
    if len(skip_values) != len(diff_bytes):
        longer = skips if len(skip_values) > len(diff_bytes) else diffs
        raise longer.fail("raw delta streams", f"describe {len(skip_values)} and {len(diff_bytes)} deltas")
    zero = diff_bytes.find(0)
    if zero >= 0:
        raise diffs.fail(f"raw delta {zero} difference", "is 0", diffs.pos + zero)
    # copy offset k = skips 0..k summed, plus k (each delta moves past its byte)
    offsets = array("q", itertools.accumulate(map((1).__add__, skip_values)))
    if offsets and offsets[-1] - 1 >= _U32_MAX:
        raise skips.fail("raw delta copy offsets", f"reach {offsets[-1] - 1}, past 32 bits")
    return array("I", map((-1).__add__, offsets)), diff_bytes


def _parse_element(src: _Source, index: int) -> ElementPatch:
    at = src.pos
    old_offset, old_length, new_offset, new_length, exe_type, version = _ELEMENT_HEADER.unpack(
        src.take(_ELEMENT_HEADER.size, "element header"))
    if exe_type not in _VERSIONS:
        raise src.fail("executable type", f"{exe_type_name(exe_type)} is unknown", at + 16)
    if version != _VERSIONS[exe_type]:
        raise src.fail("element version", f"{version} is not the {_VERSIONS[exe_type]} that "
                       f"{exe_type_name(exe_type)} elements have", at + 20)
    if not old_length or not new_length:
        raise src.fail("element length", f"is 0 (old {old_length}, new {new_length})", at)
    equivalences = _parse_equivalences(src, old_length, new_length)
    extra = src.buffer("extra data")
    covered = sum(e.length for e in equivalences)
    if covered > new_length or extra.end - extra.pos != new_length - covered:
        raise extra.fail("extra data", f"has {extra.end - extra.pos} bytes; the equivalences leave "
                         f"{new_length - covered} of the {new_length}-byte new element", extra.pos - 4)
    raw_delta = _parse_raw_delta(src)
    reference_deltas = _decode(src.buffer("reference delta"), True, "reference delta")
    pool_count = src.u32("pool count")
    extra_targets: dict[int, tuple[memoryview, int]] = {}
    for i in range(pool_count):
        at = src.pos
        tag = src.take(1, f"pool {i} tag")[0]
        if tag == _NO_POOL_TAG:
            raise src.fail(f"pool {i} tag", "is 0xff (no pool)", at)
        if tag in extra_targets:
            raise src.fail(f"pool {i} tag", f"{tag} appears twice", at)
        stream = src.buffer(f"pool {tag} extra targets")
        extra_targets[tag] = (stream.data[stream.pos : stream.end], stream.pos)
    return ElementPatch(index, old_offset, old_length, new_offset, new_length, exe_type, equivalences,
                        extra.data[extra.pos : extra.end], raw_delta, reference_deltas, extra_targets)


def parse_patch(patch: bytes | bytearray | memoryview) -> Patch:
    """Decode and check a whole Zucchini patch (nothing of the images is needed yet)."""
    data = memoryview(patch).cast("B")
    src = _Source(data, 0, len(data), "header")
    magic, major, minor, old_size, old_crc, new_size, new_crc = _HEADER.unpack(src.take(_HEADER.size, "header"))
    if magic != MAGIC:
        raise src.fail("magic", f"{bytes(magic)!r} is not {MAGIC!r}", 0)
    if major != MAJOR_VERSION:
        raise src.fail("major version", f"{major} is not {MAJOR_VERSION}", 4)
    header = PatchHeader(major, minor, old_size, old_crc, new_size, new_crc)
    count = src.u32("element count")
    elements = []
    next_new = 0
    for i in range(count):
        src.what = f"element {i}"
        at = src.pos
        element = _parse_element(src, i)
        if element.old_offset > old_size or old_size - element.old_offset < element.old_length:
            raise src.fail("old region", f"{element.old_offset}+{element.old_length} is outside the "
                           f"{old_size}-byte old image", at)
        if element.new_offset > new_size or new_size - element.new_offset < element.new_length:
            raise src.fail("new region", f"{element.new_offset}+{element.new_length} is outside the "
                           f"{new_size}-byte new image", at + 8)
        if element.new_offset != next_new:
            raise src.fail("new offset", f"{element.new_offset} is not where the previous element "
                           f"ended ({next_new})", at + 8)
        next_new = element.new_offset + element.new_length
        elements.append(element)
    src.what = "patch"
    if next_new != new_size:
        raise src.fail("elements", f"cover {next_new} of the {new_size}-byte new image")
    if not src.empty():
        raise src.fail("end", f"has {src.end - src.pos} bytes past the last element")
    return Patch(header, elements)


def decode_targets(element: ElementPatch, pool: int) -> list[int]:
    """The extra targets of ``pool`` (delta-coded, strictly increasing); none if the patch has no stream."""
    if pool not in element.extra_targets:
        return []
    raw, where = element.extra_targets[pool]
    stream = _Source(memoryview(raw), 0, len(raw), f"element {element.index}")
    values = _decode(stream, False, f"pool {pool} extra target")
    targets = list(itertools.accumulate(v + 1 for v in values))
    if targets and targets[-1] - 1 >= _U32_MAX:
        raise ZucchiniError(f"zucchini patch: element {element.index}: pool {pool} extra targets reach "
                            f"{targets[-1] - 1}, past 32 bits (patch offset {where})")
    return [t - 1 for t in targets]


def _apply_equivalences(element: ElementPatch, old: memoryview, new: bytearray) -> None:
    """Copy the equivalences' old bytes and fill the gaps with the extra data, in order."""
    base, extra = element.new_offset, element.extra_data
    old_base = element.old_offset
    cursor = extra_pos = 0
    for src, dst, length in element.equivalences:
        gap = dst - cursor
        new[base + cursor : base + dst] = extra[extra_pos : extra_pos + gap]
        extra_pos += gap
        new[base + dst : base + dst + length] = old[old_base + src : old_base + src + length]
        cursor = dst + length
    new[base + cursor : base + element.new_length] = extra[extra_pos:]


def _apply_raw_delta(element: ElementPatch, new: bytearray) -> None:
    """Add each raw delta to the byte at its offset in the concatenated copied blocks."""
    offsets, diffs = element.raw_delta
    if not diffs:
        return
    eq_dst = array("I", [e.dst for e in element.equivalences])
    eq_len = array("I", [e.length for e in element.equivalences])
    bad = _kernel.apply_raw_delta(new, element.new_offset, element.new_length, eq_dst, eq_len, offsets, diffs)
    if bad >= 0:
        raise ZucchiniError(f"zucchini patch: element {element.index}: raw delta {bad} at copy offset "
                            f"{offsets[bad]} is past the {sum(eq_len)} bytes the equivalences copy")


def _apply_references(element: ElementPatch, old: memoryview, new: bytearray) -> None:
    if element.exe_type == EXE_NOOP:
        if element.reference_deltas:
            raise ZucchiniError(f"zucchini patch: element {element.index}: {len(element.reference_deltas)} "
                                "reference deltas for a raw (NoOp) element, which has no references")
        return
    if element.exe_type in (EXE_ELF_X86, EXE_ELF_X64, EXE_ELF_AARCH32, EXE_ELF_AARCH64):
        from dmuserd.snapshot import _zucchini_refs

        _zucchini_refs.correct_references(element, old, new)
        return
    raise ZucchiniUnsupportedError(f"zucchini patch: element {element.index}: executable type "
                                   f"{exe_type_name(element.exe_type)} is not supported")


def zucchini_apply(patch: bytes | bytearray | memoryview, old: bytes | bytearray | memoryview, size: int) -> bytes:
    """Apply a Zucchini ``patch`` to ``old``; the result must be ``size`` bytes.

    The patch must be whole and well-formed, its declared old size and CRC-32
    must match ``old``, its new size must be ``size``, and the new image it
    builds must match its declared CRC-32. Raises :class:`ZucchiniError`
    (:class:`ZucchiniUnsupportedError` for an element type not implemented).
    """
    parsed = parse_patch(patch)
    header = parsed.header
    if header.new_size != size:
        raise ZucchiniError(f"zucchini patch makes {header.new_size} bytes, its destination holds {size}")
    old_view = memoryview(old).cast("B")
    if len(old_view) != header.old_size:
        raise ZucchiniError(f"zucchini patch is for a {header.old_size}-byte old image, the source has "
                            f"{len(old_view)} bytes")
    if zlib.crc32(old_view) != header.old_crc:
        raise ZucchiniError(f"zucchini patch: the old image's CRC-32 {zlib.crc32(old_view):08x} is not "
                            f"the {header.old_crc:08x} the patch was made from")
    new = bytearray(size)
    for element in parsed.elements:
        _apply_equivalences(element, old_view, new)
        _apply_raw_delta(element, new)
        _apply_references(element, old_view, new)
    crc = zlib.crc32(new)
    if crc != header.new_crc:
        raise ZucchiniError(f"zucchini patch: the new image's CRC-32 {crc:08x} is not the "
                            f"{header.new_crc:08x} the patch declares")
    return bytes(new)
