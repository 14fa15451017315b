"""Zucchini patch apply (snapshot/_zucchini*.py) against AOSP's zucchini.

* The AOSP samples in shared/testdata (raw text, ELF x86-64) apply byte-exact.
* Differential cases made here with AOSP's ``zucchini_tool gen``: random raw
  data with edits (hypothesis), real ELF files of this machine (x86-64 and
  32-bit x86), and synthetic ELF images for x86, x86-64, ARM (ARM and THUMB2
  code), AArch64 built from random "programs" whose edits move every
  reference; our output must equal both the new file and ``zucchini_tool
  apply``'s output.
* Hostile patches: every field of the format, truncations, and fuzzing
  (random bytes, mutated real patches) may only raise ZucchiniError; mutated
  patches must fail or succeed exactly where the AOSP tool does, with the
  same bytes.
* The C kernels (when built) give what the pure-Python ones give.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import struct
import sys
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmuserd.snapshot import _zucchini_refs
from dmuserd.snapshot._payload_data import DataError
from dmuserd.snapshot._zucchini import (
    EXE_ELF_AARCH32,
    EXE_ELF_AARCH64,
    EXE_ELF_X64,
    EXE_ELF_X86,
    EXE_NOOP,
    ZucchiniError,
    ZucchiniUnsupportedError,
    parse_patch,
    zucchini_apply,
)

SAMPLES = Path(os.environ.get("DMUSERD_SHARED", "/work/shared")) / "testdata" / "aosp-patches" / "zucchini"
TOOL = Path(os.environ.get("DMUSERD_SHARED", "/work/shared")) / "tools" / "aosp" / "bin" / "zucchini_tool"
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=200)
DIFF = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=25)


@functools.cache
def _tool_runs() -> str:
    """'' when zucchini_tool runs here, else why not (tests that need it skip with that reason)."""
    if not TOOL.exists():
        return f"{TOOL} is missing"
    try:
        proc = subprocess.run([str(TOOL)], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"{TOOL} does not start: {exc}"
    if "usage" not in (proc.stdout + proc.stderr):
        return f"{TOOL} does not run here: {(proc.stdout + proc.stderr).strip()[:200]}"
    return ""


def need_tool() -> None:
    reason = _tool_runs()
    if reason:
        pytest.skip(reason)


def tool_gen(old: bytes, new: bytes, raw: bool = False) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, n) for n in ("old", "new", "patch")]
        Path(paths[0]).write_bytes(old)
        Path(paths[1]).write_bytes(new)
        proc = subprocess.run([str(TOOL), "genraw" if raw else "gen", *paths], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return Path(paths[2]).read_bytes()


def tool_apply(old: bytes, patch: bytes) -> bytes | None:
    """The AOSP tool's output, or None where it fails (an error or an internal check that aborts)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, n) for n in ("old", "patch", "out")]
        Path(paths[0]).write_bytes(old)
        Path(paths[1]).write_bytes(patch)
        proc = subprocess.run([str(TOOL), "apply", *paths], capture_output=True, timeout=300)
        if proc.returncode != 0 or not os.path.exists(paths[2]):
            return None
        return Path(paths[2]).read_bytes()


def ours(patch: bytes, old: bytes, size: int) -> bytes | None:
    try:
        return zucchini_apply(patch, old, size)
    except ZucchiniError:
        return None


def check_pair(old: bytes, new: bytes, raw: bool = False, expect: int | None = None) -> bytes:
    """Make a patch with the tool; ours must rebuild ``new`` exactly as the tool does."""
    patch = tool_gen(old, new, raw)
    if expect is not None:
        types = [e.exe_type for e in parse_patch(patch).elements]
        assert expect in types, f"the tool found no element of the expected type: {types}"
    assert zucchini_apply(patch, old, len(new)) == new
    assert tool_apply(old, patch) == new
    return patch


# -- AOSP samples -------------------------------------------------------------------


@pytest.mark.parametrize("case", ["text_raw", "elf_x86_64_small_change"])
def test_aosp_sample_applies_byte_exact(case):
    folder = SAMPLES / case
    if not folder.exists():
        pytest.skip(f"{folder} is missing")
    old, new = (folder / "old.bin").read_bytes(), (folder / "new.bin").read_bytes()
    patch = (folder / "patch.zucchini").read_bytes()
    assert zucchini_apply(patch, old, len(new)) == new
    kinds = {e.exe_type for e in parse_patch(patch).elements}
    assert kinds == ({EXE_NOOP} if case == "text_raw" else {EXE_ELF_X64})


# -- raw data against the tool --------------------------------------------------------


@st.composite
def edited_pair(draw):
    rnd = random.Random(draw(st.integers(0, 2**32)))
    size = draw(st.integers(1, 20000))
    # blocks of repeated and random bytes, so there is something to match
    old = bytearray()
    while len(old) < size:
        n = rnd.randint(1, 600)
        old += bytes([rnd.randrange(256)]) * n if rnd.random() < 0.2 else rnd.randbytes(n)
    old = bytes(old[:size])
    new = bytearray(old)
    for _ in range(draw(st.integers(0, 12))):
        pos = rnd.randint(0, len(new))
        op = rnd.random()
        if op < 0.4:
            new[pos:pos] = rnd.randbytes(rnd.randint(1, 300))
        elif op < 0.7:
            del new[pos : pos + rnd.randint(1, 300)]
        elif op < 0.9:
            for i in range(pos, min(len(new), pos + rnd.randint(1, 40))):
                new[i] = (new[i] + rnd.randint(1, 3)) & 0xFF
        else:
            start = rnd.randint(0, len(old))
            new[pos:pos] = old[start : start + rnd.randint(1, 500)]
    return old, bytes(new)


@DIFF
@given(edited_pair())
def test_raw_patches_match_the_tool(pair):
    need_tool()
    old, new = pair
    if not new:
        new = b"\0"
    check_pair(old, new, raw=True)


# -- real ELF files ---------------------------------------------------------------------

_VALGRIND = Path("/usr/libexec/valgrind")
REAL_PAIRS = [
    ("/usr/bin/cat", "/usr/bin/head", EXE_ELF_X64),
    ("/usr/bin/ls", "/usr/bin/cp", EXE_ELF_X64),
    (str(_VALGRIND / "vgpreload_drd-x86-linux.so"), str(_VALGRIND / "vgpreload_helgrind-x86-linux.so"), EXE_ELF_X86),
    (str(_VALGRIND / "memcheck-amd64-linux"), str(_VALGRIND / "helgrind-amd64-linux"), EXE_ELF_X64),
    (str(_VALGRIND / "memcheck-x86-linux"), str(_VALGRIND / "drd-x86-linux"), EXE_ELF_X86),
]


@pytest.mark.parametrize("old_path,new_path,exe_type", REAL_PAIRS, ids=lambda v: os.path.basename(str(v)))
def test_real_elf_pairs_match_the_tool(old_path, new_path, exe_type):
    need_tool()
    if not (os.path.exists(old_path) and os.path.exists(new_path)):
        pytest.skip(f"{old_path} or {new_path} is not on this machine")
    old, new = Path(old_path).read_bytes(), Path(new_path).read_bytes()
    patch = check_pair(old, new, expect=exe_type)
    element = next(e for e in parse_patch(patch).elements if e.exe_type == exe_type)
    assert element.reference_deltas, "the ELF element corrected no references"


# -- synthetic ELF images ------------------------------------------------------------------
#
# A "program" is a list of code items (filler or a branch to another item) and
# of data pointers (to code items or to other pointers, each with a RELATIVE
# relocation). Rendering lays out .text, .data, .rel(a).dyn, .shstrtab and the
# section headers; an edit inserts, deletes and retargets items, so that the
# new image moves most references.

_BASE = 0x10000
_ARCH = {
    # exe type: (machine, 64-bit, relative reloc type, RELA)
    EXE_ELF_X86: (3, False, 8, False),
    EXE_ELF_X64: (62, True, 8, True),
    EXE_ELF_AARCH32: (40, False, 23, False),
    EXE_ELF_AARCH64: (183, True, 1027, True),
}
_SHSTRTAB = b"\0.text\0.data\0.rel.dyn\0.shstrtab\0"


def _item_size(arch: str, item) -> int:
    kind = item[0]
    if kind == "raw":
        return len(item[1])
    return {"x86": 5, "x86jcc": 6, "a64": 4, "a32": 4, "t16": 2, "t32": 4}[item[1]]


def _encode_branch(arch: str, item, pc: int, target: int) -> bytes:
    _, form, op = item
    disp = target - pc
    if form == "x86":  # call/jmp rel32
        return bytes([op]) + struct.pack("<i", disp - 5)
    if form == "x86jcc":
        return bytes([0x0F, 0x80 | op]) + struct.pack("<i", disp - 6)
    if form == "a64":
        if op == "b":
            return struct.pack("<I", 0x14000000 | ((disp >> 2) & 0x3FFFFFF))
        if op == "bl":
            return struct.pack("<I", 0x94000000 | ((disp >> 2) & 0x3FFFFFF))
        if op == "bcond":
            return struct.pack("<I", 0x54000000 | (((disp >> 2) & 0x7FFFF) << 5) | 1)
        if op == "cbz":
            return struct.pack("<I", 0xB4000000 | (((disp >> 2) & 0x7FFFF) << 5) | 3)
        return struct.pack("<I", 0x36000000 | (5 << 19) | (((disp >> 2) & 0x3FFF) << 5) | 2)  # tbz
    if form == "a32":
        return struct.pack("<I", (0xEB if op == "bl" else 0xEA) << 24 | (((disp - 8) >> 2) & 0xFFFFFF))
    d = disp - 4
    if form == "t16":
        if op == "b":
            return struct.pack("<H", 0xE000 | ((d >> 1) & 0x7FF))
        return struct.pack("<H", 0xD100 | ((d >> 1) & 0xFF))  # bne
    s = (d >> 24) & 1
    if op == "bl":
        i1, i2 = (d >> 23) & 1, (d >> 22) & 1
        hw1 = 0xF000 | (s << 10) | ((d >> 12) & 0x3FF)
        hw2 = 0xD000 | ((i1 ^ s ^ 1) << 13) | ((i2 ^ s ^ 1) << 11) | ((d >> 1) & 0x7FF)
    else:  # b.w with a condition (T20)
        s = (d >> 20) & 1
        hw1 = 0xF000 | (s << 10) | (1 << 6) | ((d >> 12) & 0x3F)
        hw2 = 0x8000 | (((d >> 18) & 1) << 13) | (((d >> 19) & 1) << 11) | ((d >> 1) & 0x7FF)
    return struct.pack("<HH", hw1, hw2)


def _filler(arch: str, rnd: random.Random) -> tuple:
    if arch in ("x86", "x64"):
        return ("raw", rnd.choice([b"\x90", b"\x48\x89\xe5", b"\x55", b"\xc3", b"\x31\xc0", b"\x8b\x45\xfc",
                                   b"\x48\x8d\x05" + rnd.randbytes(4), rnd.randbytes(rnd.randint(1, 7))]))
    if arch == "a64":
        return ("raw", struct.pack("<I", rnd.choice([0xD503201F, 0x910003FD, 0xAA0103E0, 0xF9400000 |
                                                     rnd.randrange(1 << 22), rnd.randrange(1 << 32)])))
    if arch == "a32":
        return ("raw", struct.pack("<I", rnd.choice([0xE1A00000 | rnd.randrange(1 << 16), 0xE5900000 |
                                                     rnd.randrange(1 << 20), rnd.randrange(1 << 32)])))
    return ("raw", struct.pack("<H", rnd.choice([0x4600 | rnd.randrange(256), 0x2000 | rnd.randrange(256),
                                                 0xBF00])))


def _branch(arch: str, rnd: random.Random, target: int) -> tuple:
    if arch in ("x86", "x64"):
        if rnd.random() < 0.3:
            return ("br", "x86jcc", rnd.randrange(16), target)
        return ("br", "x86", rnd.choice([0xE8, 0xE9]), target)
    if arch == "a64":
        return ("br", "a64", rnd.choice(["b", "bl", "bcond", "cbz", "tbz"]), target)
    if arch == "a32":
        return ("br", "a32", rnd.choice(["b", "bl"]), target)
    return ("br", "t32", rnd.choice(["bl", "bw"]), target) if rnd.random() < 0.6 else \
        ("br", "t16", rnd.choice(["b", "bne"]), target)


def _program(arch: str, rnd: random.Random, n: int) -> dict:
    code = []
    for _ in range(n):
        code.append(_branch(arch, rnd, rnd.randrange(n)) if rnd.random() < 0.35 else _filler(arch, rnd))
    data = [("code", rnd.randrange(n)) if rnd.random() < 0.7 else ("data", rnd.randrange(max(1, n // 4)))
            for _ in range(max(1, n // 4))]
    return {"code": code, "data": data}


def _edit(arch: str, prog: dict, rnd: random.Random) -> dict:
    """Insert, delete and retarget items; branches and pointers follow the items they point at."""
    code = [list(i) for i in prog["code"]]
    data = [list(d) for d in prog["data"]]

    def shift(at: int, by: int) -> None:
        for it in code:
            if it[0] == "br" and it[3] >= at:
                it[3] = max(at, it[3] + by)
        for d in data:
            if d[0] == "code" and d[1] >= at:
                d[1] = max(at, d[1] + by)

    for _ in range(rnd.randint(1, 8)):
        pos = rnd.randrange(len(code) + 1)
        op = rnd.random()
        if op < 0.5:
            added = [list(_filler(arch, rnd)) for _ in range(rnd.randint(1, 6))]
            shift(pos, len(added))
            code[pos:pos] = added
        elif op < 0.7 and len(code) > 8:
            count = min(rnd.randint(1, 3), len(code) - pos)
            del code[pos : pos + count]
            shift(pos, -count)
        else:
            it = code[rnd.randrange(len(code))]
            if it[0] == "br":
                it[3] = rnd.randrange(len(code))
    n = len(code)
    for it in code:
        if it[0] == "br":
            it[3] = min(it[3], n - 1)
    for d in data:
        d[1] = min(d[1], n - 1 if d[0] == "code" else len(data) - 1)
    if rnd.random() < 0.5:
        data.insert(rnd.randrange(len(data) + 1), ["code", rnd.randrange(n)])
    return {"code": [tuple(i) for i in code], "data": [tuple(d) for d in data]}


def render_elf(exe_type: int, arch: str, prog: dict) -> bytes:
    machine, b64, rel_type, rela = _ARCH[exe_type]
    ehdr, phdr, shdr = (64, 56, 64) if b64 else (52, 32, 40)
    ptr = 8 if b64 else 4
    ent = (24 if rela else 16) if b64 else (12 if rela else 8)
    text_off = (ehdr + phdr + 15) & ~15
    offsets, pos = [], text_off
    for item in prog["code"]:
        offsets.append(pos)
        pos += _item_size(arch, item) if item[0] == "raw" else _item_size(arch, ("br", item[1]))
    text_end = pos
    text = bytearray()
    for item, off in zip(prog["code"], offsets):
        if item[0] == "raw":
            text += item[1]
        else:
            text += _encode_branch(arch, item[:3], off + _BASE, offsets[item[3]] + _BASE)
    data_off = (text_end + 7) & ~7
    data = bytearray()
    for kind, t in prog["data"]:
        target = offsets[t] if kind == "code" else data_off + t * ptr
        data += (target + _BASE).to_bytes(ptr, "little")
    rel_off = data_off + len(data)
    rel = bytearray()
    for i in range(len(prog["data"])):
        where = data_off + i * ptr + _BASE
        if b64:
            rel += struct.pack("<QQ", where, rel_type) + (b"\0" * 8 if rela else b"")
        else:
            rel += struct.pack("<II", where, rel_type) + (b"\0" * 4 if rela else b"")
    str_off = rel_off + len(rel)
    sh_off = (str_off + len(_SHSTRTAB) + 7) & ~7
    file_size = sh_off + 5 * shdr
    out = bytearray(file_size)
    ident = b"\x7fELF" + bytes([2 if b64 else 1, 1, 1]) + b"\0" * 9
    if b64:
        out[0:ehdr] = ident + struct.pack("<HHIQQQIHHHHHH", 3, machine, 1, _BASE + text_off, ehdr, sh_off, 0,
                                          ehdr, phdr, 1, shdr, 5, 4)
        out[ehdr : ehdr + phdr] = struct.pack("<IIQQQQQQ", 1, 7, 0, _BASE, _BASE, str_off, str_off, 0x1000)
    else:
        out[0:ehdr] = ident + struct.pack("<HHIIIIIHHHHHH", 3, machine, 1, _BASE + text_off, ehdr, sh_off, 0,
                                          ehdr, phdr, 1, shdr, 5, 4)
        out[ehdr : ehdr + phdr] = struct.pack("<IIIIIIII", 1, 0, _BASE, _BASE, str_off, str_off, 7, 0x1000)
    out[text_off:text_end] = text
    out[data_off:rel_off] = data
    out[rel_off:str_off] = rel
    out[str_off : str_off + len(_SHSTRTAB)] = _SHSTRTAB
    sections = [
        (0, 0, 0, 0, 0, 0, 0),
        (1, 1, 6, _BASE + text_off, text_off, text_end - text_off, 0),  # .text AX
        (7, 1, 3, _BASE + data_off, data_off, len(data), 0),  # .data WA
        (13, 4 if rela else 9, 2, _BASE + rel_off, rel_off, len(rel), ent),
        (22, 3, 0, 0, str_off, len(_SHSTRTAB), 0),
    ]
    for i, (name, typ, flags, addr, off, size, entsize) in enumerate(sections):
        at = sh_off + i * shdr
        if b64:
            out[at : at + shdr] = struct.pack("<IIQQQQIIQQ", name, typ, flags, addr, off, size, 0, 0, 4, entsize)
        else:
            out[at : at + shdr] = struct.pack("<IIIIIIIIII", name, typ, flags, addr, off, size, 0, 0, 4, entsize)
    return bytes(out)


_SYNTH = [(EXE_ELF_X86, "x86"), (EXE_ELF_X64, "x64"), (EXE_ELF_AARCH32, "a32"), (EXE_ELF_AARCH32, "t32"),
          (EXE_ELF_AARCH64, "a64")]


def synthetic_pair(exe_type: int, arch: str, seed: int, n: int) -> tuple[bytes, bytes]:
    rnd = random.Random(seed)
    prog = _program(arch, rnd, n)
    old = render_elf(exe_type, arch, prog)
    new = render_elf(exe_type, arch, _edit(arch, prog, rnd))
    while new == old:
        new = render_elf(exe_type, arch, _edit(arch, prog, rnd))
    return old, new


@pytest.mark.parametrize("exe_type,arch", _SYNTH, ids=[a for _, a in _SYNTH])
@DIFF
@given(seed=st.integers(0, 2**32), n=st.integers(40, 700))
def test_synthetic_elf_patches_match_the_tool(exe_type, arch, seed, n):
    need_tool()
    old, new = synthetic_pair(exe_type, arch, seed, n)
    check_pair(old, new, expect=exe_type)


# -- hostile patches ----------------------------------------------------------------------


def _varuint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint(value: int) -> bytes:
    return _varuint(((~value) << 1) | 1 if value < 0 else value << 1)


def _buf(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def raw_element(old_len: int, new_len: int, eqs, extra: bytes, deltas=(), exe_type: int = EXE_NOOP,
                version: int = 1, old_off: int = 0, new_off: int = 0, refs: bytes = b"", pools: bytes = None) -> bytes:
    """One element as zucchini's patch writer lays it out; ``eqs`` are (src, dst, length)."""
    src_skip, dst_skip, counts = bytearray(), bytearray(), bytearray()
    prev_src = prev_dst = 0
    for src, dst, length in eqs:
        counts += _varuint(length)
        src_skip += _varint(src - prev_src)
        dst_skip += _varuint(dst - prev_dst)
        prev_src, prev_dst = src + length, dst + length
    skips, diffs = bytearray(), bytearray()
    nxt = 0
    for off, diff in deltas:
        skips += _varuint(off - nxt)
        diffs.append(diff & 0xFF)
        nxt = off + 1
    return (struct.pack("<IIIIIH", old_off, old_len, new_off, new_len, exe_type, version)
            + _buf(bytes(src_skip)) + _buf(bytes(dst_skip)) + _buf(bytes(counts)) + _buf(extra)
            + _buf(bytes(skips)) + _buf(bytes(diffs)) + _buf(refs)
            + (struct.pack("<I", 0) if pools is None else pools))


def make_patch(old: bytes, new: bytes, elements: list[bytes], major: int = 1) -> bytes:
    return (struct.pack("<4sHHIIII", b"Zucc", major, 0, len(old), zlib.crc32(old), len(new), zlib.crc32(new))
            + struct.pack("<I", len(elements)) + b"".join(elements))


OLD = bytes(range(256)) * 4
NEW = OLD[:100] + b"inserted" + OLD[100:900] + bytes([OLD[900] + 1]) + OLD[901:]


def good_patch() -> bytes:
    return make_patch(OLD, NEW, [raw_element(len(OLD), len(NEW), [(0, 0, 100), (100, 108, 800), (900, 908, 124)],
                                             b"inserted", [(900, 1)])])


def test_hand_made_raw_patch_applies():
    assert zucchini_apply(good_patch(), OLD, len(NEW)) == NEW


def _rejects(patch: bytes, *words: str, old: bytes = OLD, size: int = len(NEW), kind=ZucchiniError) -> str:
    with pytest.raises(kind) as info:
        zucchini_apply(patch, old, size)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert isinstance(info.value, DataError)
    return message


def test_header_fields_are_checked():
    patch = good_patch()
    _rejects(b"", "header", "needs 24 bytes")
    _rejects(b"Zucd" + patch[4:], "magic")
    _rejects(make_patch(OLD, NEW, [], major=2), "major version", "2")
    _rejects(patch, "destination holds 5", size=5)
    _rejects(patch, "old image", old=OLD[:-1])
    _rejects(patch, "CRC-32", old=OLD[:-1] + b"\x01")
    _rejects(patch[:24] + struct.pack("<I", 0xFFFFFFFF), "element 0", "element header")
    _rejects(patch + b"\0", "past the last element", "patch offset")
    _rejects(make_patch(OLD, NEW, []), "cover 0 of the")


def test_element_fields_are_checked():
    n = len(NEW)
    el = lambda **kw: make_patch(OLD, NEW, [raw_element(**{"old_len": len(OLD), "new_len": n, "eqs": [],
                                                            "extra": NEW, **kw})])
    _rejects(el(exe_type=int.from_bytes(b"XXXX", "little")), "executable type", "XXXX")
    _rejects(el(version=2), "element version")
    _rejects(el(new_len=0, extra=b""), "element length")
    _rejects(el(old_off=1), "old region")
    _rejects(el(new_off=1), "new region")
    _rejects(el(eqs=[(0, 0, 2000)]), "equivalence 0", "outside")
    _rejects(el(eqs=[(1000, 0, 100)], extra=NEW[100:]), "equivalence 0", "old block")
    _rejects(el(extra=NEW[1:]), "extra data")
    _rejects(el(eqs=[(0, 0, 10)], extra=NEW[10:], deltas=[(10, 1)]), "raw delta", "copy offset 10")
    _rejects(el(eqs=[(0, 0, 10)], extra=NEW[10:], deltas=[(1, 0)]), "raw delta 0 difference", "is 0")
    _rejects(el(refs=_varint(3)), "reference deltas for a raw")
    _rejects(el(pools=struct.pack("<I", 0xFFFFFFFF)), "pool 0 tag", "needs 1 bytes")
    _rejects(el(pools=struct.pack("<IB", 1, 0xFF) + _buf(b"")), "pool 0 tag", "0xff")
    _rejects(el(pools=struct.pack("<IB", 2, 3) + _buf(b"") + b"\x03" + _buf(b"")), "appears twice")
    # an unused pool's stream is never read, as in zucchini
    assert zucchini_apply(el(pools=struct.pack("<IB", 1, 7) + _buf(b"\xff\xff")), OLD, n) == NEW


def test_streams_are_bounded_by_the_patch():
    raw = raw_element(len(OLD), len(NEW), [], NEW)
    cut = raw[:22] + struct.pack("<I", 0xFFFFFF00) + raw[26:]
    _rejects(make_patch(OLD, NEW, [cut]), "equivalence source skips length", "runs past")
    for bad_varint in (b"\x80", b"\xff\xff\xff\xff\x80\x01"):
        broken = raw_element(len(OLD), len(NEW), [], NEW)
        broken = broken[:22] + _buf(b"\x00") + _buf(b"\x00") + _buf(bad_varint) + broken[34:]
        _rejects(make_patch(OLD, NEW, [broken]), "equivalence length 0", "varint")
    # five-byte varints drop their bits past 32, as zucchini's decoder does
    assert struct.unpack("<I", struct.pack("<I", 0xFFFFFFFF))[0] == 0xFFFFFFFF


def test_trailing_stream_bytes_are_rejected():
    base = [(0, 0, 100)]
    el = raw_element(len(OLD), len(NEW), base, NEW[100:])
    # add a second source skip with no length/destination to go with it
    i = 22
    src_len = struct.unpack_from("<I", el, i)[0]
    el2 = el[:i] + struct.pack("<I", src_len + 1) + el[i + 4 : i + 4 + src_len] + b"\x00" + el[i + 4 + src_len :]
    _rejects(make_patch(OLD, NEW, [el2]), "equivalence source skips", "past the 1 equivalences")


def test_new_image_crc_is_checked():
    patch = bytearray(good_patch())
    pos = bytes(patch).index(b"inserted")
    patch[pos] ^= 1
    _rejects(bytes(patch), "new image's CRC-32")


def test_unimplemented_and_disabled_element_types_name_themselves():
    n = len(NEW)
    for name, version in ((b"DEX ", 1), (b"Px86", 0xFFFF), (b"ZTF ", 0xFFFF)):
        exe = int.from_bytes(name, "little")
        patch = make_patch(OLD, NEW, [raw_element(len(OLD), n, [], NEW, exe_type=exe, version=version)])
        message = _rejects(patch, name.decode().strip(), "not supported", kind=ZucchiniUnsupportedError)
        assert "\n" not in message


def test_elf_element_that_is_not_elf_is_rejected():
    n = len(NEW)
    patch = make_patch(OLD, NEW, [raw_element(len(OLD), n, [], NEW, exe_type=EXE_ELF_X64)])
    _rejects(patch, "ELF x86-64", "not an", "old element")


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_zucchini_error(data):
    for blob in (data, b"Zucc\x01\x00\x00\x00" + data):
        try:
            out = zucchini_apply(blob, OLD, len(NEW))
        except ZucchiniError:
            continue
        assert len(out) == len(NEW)


def _mutate(patch: bytes, draw_ops) -> bytes:
    out = bytearray(patch)
    for kind, pos, value in draw_ops:
        pos %= max(1, len(out))
        if kind == 0 and out:
            out[pos] = value
        elif kind == 1:
            out[pos:pos] = bytes([value])
        elif kind == 2:
            del out[pos : pos + 1 + value % 4]
        else:
            out[pos : pos + 4] = struct.pack("<I", value * 0x01010101)
    return bytes(out)


_OPS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4)


@functools.cache
def _mutation_cases() -> list[tuple[bytes, bytes, int]]:
    cases = [(good_patch(), OLD, len(NEW))]
    for case in ("text_raw", "elf_x86_64_small_change"):
        folder = SAMPLES / case
        if folder.exists():
            cases.append(((folder / "patch.zucchini").read_bytes(), (folder / "old.bin").read_bytes(),
                          len((folder / "new.bin").read_bytes())))
    return cases


@FUZZ
@given(st.integers(0, 2), _OPS)
def test_mutated_patches_only_raise_zucchini_error(which, ops):
    cases = _mutation_cases()
    patch, old, size = cases[which % len(cases)]
    try:
        out = zucchini_apply(_mutate(patch, ops), old, size)
    except ZucchiniError:
        return
    assert len(out) == size and zlib.crc32(out) == parse_patch(_mutate(patch, ops)).header.new_crc


@DIFF
@given(st.integers(0, 2), _OPS)
def test_mutated_patches_fail_and_succeed_where_the_tool_does(which, ops):
    need_tool()
    cases = _mutation_cases()
    patch, old, size = cases[which % len(cases)]
    bad = _mutate(patch, ops)
    expected = tool_apply(old, bad)
    got = ours(bad, old, size if expected is None else len(expected))
    assert got == expected


@DIFF
@given(st.data())
def test_random_valid_raw_patches_match_the_tool(data):
    """Patches zucchini's generator would not write (overlapping old blocks, raw deltas anywhere)."""
    need_tool()
    old = data.draw(st.binary(min_size=1, max_size=400))
    new_len = data.draw(st.integers(1, 600))
    eqs, dst = [], 0
    while dst < new_len and data.draw(st.booleans()):
        dst += data.draw(st.integers(0, 20))
        length = data.draw(st.integers(0, 60))
        src = data.draw(st.integers(0, len(old) - 1))
        length = min(length, len(old) - src, max(0, new_len - dst))
        if dst >= new_len:
            break
        eqs.append((src, dst, length))
        dst += length
    covered = sum(e[2] for e in eqs)
    extra = data.draw(st.binary(min_size=new_len - covered, max_size=new_len - covered))
    offsets = sorted(set(data.draw(st.lists(st.integers(0, max(0, covered - 1)), max_size=10)))) if covered else []
    deltas = [(o, data.draw(st.integers(1, 255))) for o in offsets]
    # the new image the patch describes, built independently
    new = bytearray(new_len)
    cursor, pos = 0, 0
    for src, d, length in eqs:
        new[cursor:d] = extra[pos : pos + d - cursor]
        pos += d - cursor
        new[d : d + length] = old[src : src + length]
        cursor = d + length
    new[cursor:] = extra[pos:]
    copied = [d + k for _, d, length in eqs for k in range(length)]
    for o, diff in deltas:
        new[copied[o]] = (new[copied[o]] + diff) & 0xFF
    patch = make_patch(old, bytes(new), [raw_element(len(old), new_len, eqs, extra, deltas)])
    assert both_kernels(lambda: zucchini_apply(patch, old, new_len)) == [("ok", bytes(new))] * 2
    assert tool_apply(old, patch) == bytes(new)


def test_prune_order_matches_gcc_std_sort(tmp_path):
    """The equivalence prune sorts like GCC's std::sort, ties included (checked against g++ itself)."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not installed")
    src = tmp_path / "s.cc"
    src.write_text("#include <algorithm>\n#include <deque>\n#include <cstdio>\n"
                   "struct E { unsigned s, i; };\n"
                   "int main(int argc, char**) { unsigned n; std::deque<E> v;\n"
                   " while (scanf(\"%u\", &n) == 1) { E e{n, (unsigned)v.size()}; v.push_back(e); }\n"
                   " auto less = [](const E& a, const E& b) { return a.s < b.s; };\n"
                   " if (argc > 1) std::partial_sort(v.begin(), v.end(), v.end(), less);\n"
                   " else std::sort(v.begin(), v.end(), less);\n"
                   " for (auto& e : v) printf(\"%u\\n\", e.i); }\n")
    exe = tmp_path / "s"
    subprocess.run([cxx, "-O1", "-o", str(exe), str(src)], check=True, capture_output=True)
    rnd = random.Random(7)
    for n in (1, 5, 16, 17, 40, 300, 5000):
        for keys in ([rnd.randrange(max(1, n // 3)) for _ in range(n)], [3] * n, list(range(n, 0, -1)),
                     [rnd.randrange(4) for _ in range(n)]):
            want = subprocess.run([str(exe)], input="\n".join(map(str, keys)), capture_output=True, text=True,
                                  check=True).stdout.split()
            items = [[k, i] for i, k in enumerate(keys)]
            _zucchini_refs.cxx_sort(items)
            assert [str(i) for _, i in items] == want
            # the heapsort that introsort falls back to past its depth limit
            want = subprocess.run([str(exe), "heap"], input="\n".join(map(str, keys)), capture_output=True,
                                  text=True, check=True).stdout.split()
            items = [[k, i] for i, k in enumerate(keys)]
            _zucchini_refs._heap_sort(items, 0, len(items))
            assert [str(i) for _, i in items] == want


# -- the C kernels against the Python ones -----------------------------------------------

from array import array  # noqa: E402

from dmuserd.snapshot import _zucchini_kernel as kernel  # noqa: E402


def need_native():
    if kernel.native is None:
        pytest.skip("the optional C extension dmuserd.snapshot._zucchini_native is not built")


def both_kernels(fn):
    """``fn()`` with the C kernels and with the Python ones (whatever each returns or raises)."""
    results = []
    saved = kernel.native
    for native in (saved, None):
        kernel.native = native
        try:
            results.append(("ok", fn()))
        except ZucchiniError as exc:
            results.append(("error", str(exc)))
        finally:
            kernel.native = saved
    return results


@pytest.mark.parametrize("exe_type,arch", _SYNTH, ids=[a for _, a in _SYNTH])
@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 2**32), ops=_OPS)
def test_c_and_python_kernels_agree_on_synthetic_elf(exe_type, arch, seed, ops):
    need_native()
    need_tool()
    old, new = synthetic_pair(exe_type, arch, seed, 300)
    patch = tool_gen(old, new)
    c, py = both_kernels(lambda: zucchini_apply(patch, old, len(new)))
    assert c == py == ("ok", new)
    bad = _mutate(patch, ops)
    c, py = both_kernels(lambda: zucchini_apply(bad, old, len(new)))
    assert c == py


def test_c_and_python_kernels_agree_on_a_real_elf():
    need_native()
    need_tool()
    old_path, new_path, _ = REAL_PAIRS[1]
    if not os.path.exists(old_path):
        pytest.skip(f"{old_path} is not on this machine")
    old, new = Path(old_path).read_bytes(), Path(new_path).read_bytes()
    patch = tool_gen(old, new)
    c, py = both_kernels(lambda: zucchini_apply(patch, old, len(new)))
    assert c == py == ("ok", new)


@FUZZ
@given(data=st.binary(min_size=8, max_size=600), seed=st.integers(0, 2**32))
def test_c_and_python_scans_and_reads_agree_on_random_bytes(data, seed):
    need_native()
    rnd = random.Random(seed)
    n = len(data)
    # two units (one with dangling RVAs) over random stretches of the image
    a, b = sorted(rnd.sample(range(n + 1), 2))
    units = kernel.Units(array("I", [a, b - a, 0x1000 + a, b - a, b, n - b, 0x9000, n - b + rnd.randrange(64)]), n)
    cuts = sorted(rnd.randrange(n + 1) for _ in range(4))
    gaps = array("I", cuts)
    exec_ranges = array("I", [a, b - a])
    py_native = kernel.native
    for x64 in (False, True):
        assert kernel.py_scan_intel(data, gaps, x64, units, 0x1000 + a, 0x1000 + b) == \
            kernel._u32(py_native.scan_intel(data, gaps, x64, units.flat, units.fake, 0x1000 + a, 0x1000 + b))
    for mode in range(3):
        assert kernel.py_scan_arm(data, gaps, mode, units, exec_ranges) == \
            kernel._u32(py_native.scan_arm(data, gaps, mode, units.flat, units.fake, exec_ranges))
    locations = array("I", sorted(rnd.randrange(n - 4) for _ in range(20)))
    for kind in range(kernel.ABS32_4, 13):
        want = kernel.py_read_refs(kind, data, locations, units)
        got = py_native.read_refs(kind, data, locations, units.flat, units.fake)
        assert (kernel._u32(got[0]), kernel._u32(got[1])) == want
    src = array("I", sorted(rnd.randrange(n) for _ in range(5)))
    end = array("I", [x + rnd.randrange(50) for x in src])
    dst = array("I", [rnd.randrange(n) for _ in src])
    runs = array("q")
    runs.frombytes(py_native.block_runs(locations, src, end, dst))
    assert runs == kernel.py_block_runs(locations, src, end, dst)
    for signed in (False, True):
        values, bad = py_native.decode_varints(data, signed)
        want = kernel.py_decode_varints(data, signed)
        assert (array("i" if signed else "I", values), bad) == want


def test_apply_without_the_extension_matches(tmp_path):
    """A fresh Python that cannot import the C extension applies the AOSP ELF sample exactly."""
    folder = SAMPLES / "elf_x86_64_small_change"
    if not folder.exists():
        pytest.skip(f"{folder} is missing")
    script = ("import sys\nsys.modules['dmuserd.snapshot._zucchini_native'] = None\n"
              "from dmuserd.snapshot import _zucchini_kernel\nassert _zucchini_kernel.native is None\n"
              "from dmuserd.snapshot._zucchini import zucchini_apply\n"
              f"d = {str(folder)!r}\n"
              "new = open(d + '/new.bin', 'rb').read()\n"
              "out = zucchini_apply(open(d + '/patch.zucchini', 'rb').read(), open(d + '/old.bin', 'rb').read(),"
              " len(new))\nprint(out == new)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"
