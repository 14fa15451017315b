"""PUFFDIFF (snapshot/_puffin.py) against AOSP's puffin.

* The AOSP samples in shared/testdata: puffing gives puffin's puffed bytes and
  puff extents, huffing gives the input back, every PUFFDIFF patch applies
  byte-exact; with the C engine and with the pure-Python one.
* Differential cases made here with ``puffin``: hypothesis-generated deflate
  data (gzip, zlib, raw deflate with every zlib strategy and flush, stored,
  fixed and dynamic blocks, deflates at odd bit offsets sharing bytes with
  their neighbours) puffed by both; PUFFDIFF patches made by ``puffin
  --operation=puffdiff`` with bsdiff and with zucchini applied by both.
* Hand-made streams check the puff format where zlib does not go (stored
  padding bits, literal runs of 127/128/65663/65664 bytes), with zlib as the
  oracle for what huff writes.
* Hostile input: every header field, puffs in the wrong place, truncations,
  fuzzing; only PuffinError may come out, and a mutated patch we apply must
  give what puffin gives. The C engine raises exactly where the Python one
  does and otherwise returns the same bytes.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import textwrap
import zlib
from pathlib import Path

import bsdiff4
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmuserd.snapshot import _puffin
from dmuserd.snapshot._payload_data import DataError, bspatch
from dmuserd.snapshot._puffin import (
    BitExtent,
    ByteExtent,
    PatchHeader,
    PatchType,
    PuffinError,
    StreamInfo,
    huff,
    locate_deflates,
    make_patch,
    parse_patch,
    puff,
    puff_extents,
    puffpatch,
)

TOOL = Path("/work/shared/tools/aosp/bin/puffin")
SAMPLES = Path("/work/shared/testdata/aosp-patches")
PUFF_CASES = json.loads((SAMPLES / "puff/manifest.json").read_text())["cases"] if SAMPLES.exists() else []
DIFF_CASES = json.loads((SAMPLES / "puffdiff/manifest.json").read_text())["cases"] if SAMPLES.exists() else []
needs_samples = pytest.mark.skipif(not SAMPLES.exists(), reason=f"{SAMPLES} is not here")

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                max_examples=150)
TOOLED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                  max_examples=25)


@functools.cache
def tool_problem() -> str | None:
    """Why the AOSP tool cannot run here, or None."""
    if not TOOL.exists():
        return f"{TOOL} is not here"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "in.bin")  # puffin wants a dot in file names
        src.write_bytes(zlib.compress(b"puffin", 9)[2:-4])
        try:
            proc = subprocess.run([str(TOOL), "--operation=puff", f"--src_file={src}", f"--dst_file={tmp}/out",
                                   "--src_file_type=deflate"], capture_output=True, timeout=30)
        except OSError as exc:
            return f"{TOOL} does not run: {exc}"
        if proc.returncode != 0:
            return f"{TOOL} fails: {proc.stderr.decode(errors='replace')[-300:]}"
    return None


def needs_tool():
    problem = tool_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(params=["python", "native"])
def engine(request, monkeypatch):
    """Run the test with each engine (the C one when built)."""
    chosen = _puffin.PYTHON_ENGINE if request.param == "python" else _puffin.NATIVE_ENGINE
    if chosen is None:
        pytest.skip("the C extension dmuserd.snapshot._puffin_native is not built")
    monkeypatch.setattr(_puffin, "engine", chosen)
    return chosen


def bit_extents(pairs) -> list[BitExtent]:
    return [BitExtent(o, n) for o, n in pairs]


def byte_extents(pairs) -> list[ByteExtent]:
    return [ByteExtent(o, n) for o, n in pairs]


# ---------------------------------------------------------------- the tool

def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TOOL), *args], capture_output=True, timeout=120)


def tool_puff(data: bytes, deflates: list[BitExtent]) -> bytes | None:
    """puffin's puffed stream for ``data`` with these bit extents (None if puffin fails)."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "in.bin").write_bytes(data)  # puffin wants a dot in the name, whatever the type
        args = ["--operation=puff", f"--src_file={tmp}/in.bin", f"--dst_file={tmp}/out", "--src_file_type=raw"]
        if deflates:
            args.append("--src_deflates_bit=" + ",".join(f"{d.offset}:{d.length}" for d in deflates))
        proc = run_tool(*args)
        return Path(tmp, "out").read_bytes() if proc.returncode == 0 else None


def tool_puffpatch(patch: bytes, source: bytes) -> bytes | None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "src").write_bytes(source)
        Path(tmp, "patch").write_bytes(patch)
        proc = run_tool("--operation=puffpatch", f"--src_file={tmp}/src", f"--dst_file={tmp}/out",
                        f"--patch_file={tmp}/patch")
        return Path(tmp, "out").read_bytes() if proc.returncode == 0 else None


def tool_puffdiff(src: bytes, dst: bytes, file_type: str, algorithm: int) -> bytes:
    """A PUFFDIFF patch made by puffin (which writes /tmp/patch.tmp: serialised, and checked)."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "src.bin").write_bytes(src)
        Path(tmp, "dst.bin").write_bytes(dst)
        for _ in range(3):
            with open("/tmp/patch.tmp.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                proc = run_tool("--operation=puffdiff", f"--src_file={tmp}/src.bin", f"--dst_file={tmp}/dst.bin",
                                f"--patch_file={tmp}/patch", f"--src_file_type={file_type}",
                                f"--dst_file_type={file_type}", f"--patch_algorithm={algorithm}")
            assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
            patch = Path(tmp, "patch").read_bytes()
            if tool_puffpatch(patch, src) == dst:  # someone else's puffdiff can clobber /tmp/patch.tmp
                return patch
    raise AssertionError("puffin's own patch does not rebuild dst three times in a row")


# ---------------------------------------------------------------- data

def payload(seed: int, size: int, kind: str) -> bytes:
    """Test content: text with repeats, random bytes, long runs, or a mix."""
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "runs":
        out = bytearray()
        while len(out) < size:
            out += bytes([rng.randrange(4)]) * rng.randrange(1, 400)
        return bytes(out[:size])
    words = [bytes(rng.choice(b"etaoinshrdlu ") for _ in range(rng.randrange(1, 9))) for _ in range(60)]
    out = bytearray()
    while len(out) < size:
        if kind == "mixed" and rng.random() < 0.1:
            out += rng.randbytes(rng.randrange(1, 300))
        out += rng.choice(words) + b" "
    return bytes(out[:size])


STRATEGIES = [zlib.Z_DEFAULT_STRATEGY, zlib.Z_FILTERED, zlib.Z_HUFFMAN_ONLY, zlib.Z_RLE, zlib.Z_FIXED]
FLUSHES = [zlib.Z_NO_FLUSH, zlib.Z_SYNC_FLUSH, zlib.Z_FULL_FLUSH, zlib.Z_BLOCK, zlib.Z_PARTIAL_FLUSH]


@st.composite
def deflate_streams(draw, max_size: int = 12000) -> bytes:
    """A raw deflate stream from zlib: any level and strategy, flushed at random points."""
    data = payload(draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, max_size)),
                   draw(st.sampled_from(["text", "random", "runs", "mixed"])))
    c = zlib.compressobj(draw(st.integers(0, 9)), zlib.DEFLATED, -15, draw(st.integers(1, 9)),
                         draw(st.sampled_from(STRATEGIES)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    out, at = [], 0
    for cut in cuts:
        out.append(c.compress(data[at:cut]) + c.flush(draw(st.sampled_from(FLUSHES))))
        at = cut
    out.append(c.compress(data[at:]) + c.flush())
    return b"".join(out)


def stream_bits(stream: bytes) -> int:
    """Where a raw deflate stream's final block ends (bits), by the reference engine."""
    return _puffin.PYTHON_ENGINE.locate(stream, 0)[1]


class Bits:
    """Builds a bit string LSB first, like a deflate stream."""

    def __init__(self):
        self.value = 0
        self.n = 0

    def put(self, nbits: int, value: int) -> None:
        self.value |= (value & ((1 << nbits) - 1)) << self.n
        self.n += nbits

    def put_stream(self, stream: bytes, nbits: int) -> BitExtent:
        at = self.n
        self.put(nbits, int.from_bytes(stream, "little"))
        return BitExtent(at, nbits)

    def bytes(self) -> bytes:
        return self.value.to_bytes((self.n + 7) // 8, "little")


@st.composite
def spliced(draw, max_streams: int = 3):
    """Random bits with deflate streams at random bit offsets (touching, sharing bytes, or apart)."""
    b = Bits()
    deflates = []
    for _ in range(draw(st.integers(0, max_streams))):
        gap = draw(st.sampled_from([0, 0, 1, 3, 5, 7, 8, 13, 64]))
        b.put(gap, draw(st.integers(0, 2**gap - 1)))
        stream = draw(deflate_streams(max_size=3000))
        blocks, end = _puffin.PYTHON_ENGINE.locate(stream, 0)
        if sum(n for _, n in blocks) != end:  # stored blocks: only valid on the byte alignment they were made for
            b.put(-b.n % 8, 0)
        deflates.append(b.put_stream(stream, end))
    tail = draw(st.sampled_from([0, 1, 4, 7, 8, 20]))
    b.put(tail, draw(st.integers(0, 2**tail - 1)))
    return b.bytes(), deflates


# ---------------------------------------------------------------- AOSP samples

@needs_samples
@pytest.mark.parametrize("case", PUFF_CASES, ids=lambda c: c["name"])
def test_puff_and_huff_match_puffin_on_its_samples(case, engine):
    folder = SAMPLES / "puff" / case["name"]
    data, puffed = (folder / "input.bin").read_bytes(), (folder / "puffed.bin").read_bytes()
    assert hashlib.sha256(puffed).hexdigest() == case["sha256_puffed"]
    deflates = bit_extents(case["deflates_bit"])
    assert puff(data, deflates) == puffed
    assert puff_extents(data, deflates) == byte_extents(case["puffs_byte"])
    assert huff(puffed, byte_extents(case["puffs_byte"]), deflates) == data


@needs_samples
@pytest.mark.parametrize("case", DIFF_CASES, ids=lambda c: c["name"])
def test_puffpatch_applies_puffins_samples_byte_exact(case, engine):
    folder = SAMPLES / "puffdiff" / case["name"]
    src, dst = (folder / "src.bin").read_bytes(), (folder / "dst.bin").read_bytes()
    patch = (folder / "patch.puffdiff").read_bytes()
    header, inner = parse_patch(patch)
    assert header.version == 1 and header.type == PatchType.BSDIFF
    assert list(header.src.deflates) == bit_extents(case["src_deflates_bit"])
    assert list(header.dst.deflates) == bit_extents(case["dst_deflates_bit"])
    assert bytes(inner[:5]) in (b"BSDF2", b"BSDIF")
    out = puffpatch(patch, src, len(dst))
    assert out == dst and hashlib.sha256(out).hexdigest() == case["sha256_dst"]
    # the header we would write for it is puffin's
    assert make_patch(header, inner) == patch


@needs_samples
def test_locate_deflates_finds_puffins_blocks(engine):
    mixed = {c["name"]: c for c in PUFF_CASES}["deflate_mixed_blocks"]
    data = (SAMPLES / "puff/deflate_mixed_blocks/input.bin").read_bytes()
    assert locate_deflates(data) == bit_extents(mixed["deflates_bit"])  # stored blocks left out
    gz = {c["name"]: c for c in PUFF_CASES}["gzip_l6_text"]
    data = (SAMPLES / "puff/gzip_l6_text/input.bin").read_bytes()
    assert data[3] == 0  # no optional gzip fields: the deflate starts at byte 10
    assert locate_deflates(data, 80) == bit_extents(gz["deflates_bit"])


@needs_samples
def test_the_module_works_without_the_c_extension():
    case = {c["name"]: c for c in DIFF_CASES}["zip_multi_small_edit"]
    folder = SAMPLES / "puffdiff" / case["name"]
    script = textwrap.dedent(f"""
        import hashlib, sys
        sys.modules["dmuserd.snapshot._puffin_native"] = None  # as if it had never been built
        from dmuserd.snapshot import _puffin
        assert _puffin.engine is _puffin.PYTHON_ENGINE and _puffin.NATIVE_ENGINE is None
        folder = {str(folder)!r}
        out = _puffin.puffpatch(open(folder + "/patch.puffdiff", "rb").read(),
                                open(folder + "/src.bin", "rb").read(), {case["dst_size"]})
        print(hashlib.sha256(out).hexdigest())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [case["sha256_dst"]]


# ---------------------------------------------------------------- differential: puffin

@given(stream=deflate_streams())
@TOOLED
def test_puff_of_raw_deflate_streams_is_puffins(stream):
    needs_tool()
    deflates = locate_deflates(stream)
    assert deflates == bit_extents(_puffin.PYTHON_ENGINE.locate(stream, 0)[0])
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "in.bin").write_bytes(stream)
        proc = run_tool("--operation=puff", f"--src_file={tmp}/in.bin", f"--dst_file={tmp}/out",
                        "--src_file_type=deflate")
        assert proc.returncode == 0
        assert puff(stream, deflates) == Path(tmp, "out").read_bytes()


@given(case=spliced())
@TOOLED
def test_puff_at_any_bit_offsets_is_puffins(case):
    needs_tool()
    data, deflates = case
    assert puff(data, deflates) == tool_puff(data, deflates)


@st.composite
def edited_pairs(draw):
    """(src, dst, file type): gzip, zlib or raw deflate files whose content differs by a few edits."""
    base = payload(draw(st.integers(0, 2**32 - 1)), draw(st.integers(64, 20000)),  # puffin wants a 10-byte zlib
                   draw(st.sampled_from(["text", "mixed", "runs"])))
    new = bytearray(base)
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(0, 4))):
        at = rng.randrange(len(new) + 1)
        new[at : at + rng.randrange(0, 40)] = rng.randbytes(rng.randrange(0, 40))
    kind = draw(st.sampled_from(["gzip", "zlib", "deflate"]))
    level = draw(st.integers(1, 9))
    if kind == "gzip":
        import gzip
        return gzip.compress(base, level, mtime=0), gzip.compress(bytes(new), level, mtime=0), kind
    if kind == "zlib":
        return zlib.compress(base, level), zlib.compress(bytes(new), level), kind
    strategy = draw(st.sampled_from(STRATEGIES))

    def raw(data: bytes) -> bytes:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, 8, strategy)
        half = len(data) // 2
        return c.compress(data[:half]) + c.flush(zlib.Z_FULL_FLUSH) + c.compress(data[half:]) + c.flush()

    return raw(base), raw(bytes(new)), kind


@given(pair=edited_pairs(), algorithm=st.sampled_from([0, 1]))
@TOOLED
def test_puffpatch_applies_patches_made_by_puffdiff(pair, algorithm):
    needs_tool()
    src, dst, kind = pair
    patch = tool_puffdiff(src, dst, kind, algorithm)
    header, _ = parse_patch(patch)
    assert header.type == PatchType(algorithm)
    assert puffpatch(patch, src, len(dst)) == dst


@needs_samples
def test_puffpatch_with_a_zucchini_inner_patch_on_a_zip():
    needs_tool()
    folder = SAMPLES / "puffdiff/zip_multi_small_edit"
    src, dst = (folder / "src.bin").read_bytes(), (folder / "dst.bin").read_bytes()
    patch = tool_puffdiff(src, dst, "zip", 1)
    assert parse_patch(patch)[0].type == PatchType.ZUCCHINI
    assert puffpatch(patch, src, len(dst)) == dst


@needs_samples
@given(data=st.data())
@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_patches_apply_only_as_puffin_applies_them(data):
    """A patch we accept gives puffin's bytes; puffin may accept more (fields it ignores)."""
    needs_tool()
    case = data.draw(st.sampled_from(DIFF_CASES), label="case")
    folder = SAMPLES / "puffdiff" / case["name"]
    src, dst = (folder / "src.bin").read_bytes(), (folder / "dst.bin").read_bytes()
    patch = bytearray((folder / "patch.puffdiff").read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(patch) - 1))
        patch[at] = data.draw(st.integers(0, 255))
    try:
        ours = puffpatch(bytes(patch), src, len(dst))
    except PuffinError:
        return
    assert ours == tool_puffpatch(bytes(patch), src)


@needs_samples
@given(data=st.data())
@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_puffs_huff_only_as_puffin_huffs_them(data):
    """The puffed destination itself mutated (re-diffed with bsdiff): what we huff, puffin huffs the same.

    puffin also huffs some puffs we refuse: a deflate that runs past its
    extent into the bits after it, a symbol with no code (it writes nothing).
    """
    needs_tool()
    case = data.draw(st.sampled_from([c for c in DIFF_CASES if c["num_dst_deflates"]]), label="case")
    patch, src, dst = sample(case["name"])
    header, inner = parse_patch(patch)
    puffed_src, _ = _puffin._puff_stream(src, header.src.deflates, header.src, "")
    puffed_dst = bytearray(bspatch(bytes(inner), puffed_src, header.dst.puff_length))
    target = header.dst.puffs[data.draw(st.integers(0, len(header.dst.puffs) - 1), label="puff")]
    for _ in range(data.draw(st.integers(1, 2))):
        at = target.offset + data.draw(st.integers(0, min(target.length, 400) - 1))
        puffed_dst[at] = data.draw(st.integers(0, 255))
    mutated = make_patch(header, bsdiff4.diff(puffed_src, bytes(puffed_dst)))
    try:
        ours = puffpatch(mutated, src, len(dst))
    except PuffinError:
        return
    assert ours == tool_puffpatch(mutated, src)


# ---------------------------------------------------------------- round trips and the engines

@given(case=spliced())
@FUZZ
def test_huff_of_puff_is_the_data(case, engine):
    data, deflates = case
    puffed = puff(data, deflates)
    puffs = puff_extents(data, deflates)
    assert huff(puffed, puffs, deflates) == data


@given(stream=deflate_streams())
@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
def test_the_engines_agree_on_deflate_streams(stream):
    if _puffin.NATIVE_ENGINE is None:
        pytest.skip("the C extension is not built")
    py, c = _puffin.PYTHON_ENGINE, _puffin.NATIVE_ENGINE
    blocks = c.locate(stream, 0)
    assert blocks == py.locate(stream, 0)
    end = stream_bits(stream)
    puffed = c.puff_deflate(stream, 0, end, 1 << 40)
    assert puffed == py.puff_deflate(stream, 0, end, 1 << 40)
    for engine in (py, c):
        out = bytearray(len(stream))
        engine.huff_deflate(puffed, out, 0, end)
        assert bytes(out) == stream
    # a whole-stream byte extent: blocks are read while a byte is left, the padding huffs to zeros
    whole = c.puff_deflate(stream, 0, 8 * len(stream), 1 << 40)
    assert whole == puffed


def both(call):
    """(True, result) or (False, None) if it raised ValueError."""
    try:
        return True, call()
    except ValueError as exc:
        assert str(exc)
        return False, None


@given(data=st.binary(max_size=300), where=st.data(), limit=st.sampled_from([0, 10, 100, 1 << 30]))
@FUZZ
def test_the_engines_agree_on_arbitrary_bits(data, where, limit):
    if _puffin.NATIVE_ENGINE is None:
        pytest.skip("the C extension is not built")
    start = where.draw(st.integers(0, 8 * len(data)), label="start")
    length = where.draw(st.integers(0, 8 * len(data) - start), label="length")
    py, c = _puffin.PYTHON_ENGINE, _puffin.NATIVE_ENGINE
    assert both(lambda: py.puff_deflate(data, start, start + length, limit)) == \
        both(lambda: c.puff_deflate(data, start, start + length, limit))
    assert both(lambda: py.locate(data, start)) == both(lambda: c.locate(data, start))


@needs_samples
@given(data=st.data())
@FUZZ
def test_the_engines_agree_on_arbitrary_puffs(data):
    if _puffin.NATIVE_ENGINE is None:
        pytest.skip("the C extension is not built")
    case = data.draw(st.sampled_from(PUFF_CASES), label="case")
    folder = SAMPLES / "puff" / case["name"]
    puffed = (folder / "puffed.bin").read_bytes()
    i = data.draw(st.integers(0, len(case["puffs_byte"]) - 1), label="deflate")
    (po, pl), (do, dl) = case["puffs_byte"][i], case["deflates_bit"][i]
    one = bytearray(puffed[po : po + pl])
    if data.draw(st.booleans(), label="random bytes"):
        one = bytearray(data.draw(st.binary(max_size=400)))
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            one[data.draw(st.integers(0, len(one) - 1))] = data.draw(st.integers(0, 255))
        one = one[: data.draw(st.integers(0, len(one)))] if data.draw(st.booleans()) else one
    length = data.draw(st.sampled_from([dl, dl - 3, dl + 9, 2 * dl]))
    size = (do + max(length, 0) + 7) // 8 + 2
    results = []
    for engine in (_puffin.PYTHON_ENGINE, _puffin.NATIVE_ENGINE):
        out = bytearray(size)
        ok, _ = both(lambda: engine.huff_deflate(bytes(one), out, do, max(length, 0)))
        results.append((ok, bytes(out) if ok else None))
    assert results[0] == results[1]


# ---------------------------------------------------------------- the puff format, by hand

FIXED_BLOCK = 0xA0  # final, type 1


def fixed_literal_bits(data: bytes) -> int:
    return sum(8 if b < 144 else 9 for b in data)


def literal_runs(data: bytes) -> bytes:
    """Literals as puffin writes them: runs of at most 65663 bytes."""
    out = bytearray()
    for at in range(0, len(data), 65663):
        run = data[at : at + 65663]
        out += bytes([len(run) - 1]) if len(run) <= 127 else bytes([127]) + (len(run) - 128).to_bytes(2, "big")
        out += run
    return bytes(out)


@pytest.mark.parametrize("n", [1, 127, 128, 65663, 65664, 131326, 131327])
def test_literal_runs_and_huff_checked_by_zlib(n, engine):
    if engine is _puffin.PYTHON_ENGINE and n > 70000:
        pytest.skip("the long runs once are enough for the slow engine")
    lits = random.Random(n).randbytes(n)
    one = b"\x00\x00" + bytes([FIXED_BLOCK]) + literal_runs(lits) + b"\xff\x81"
    bits = 3 + fixed_literal_bits(lits) + 7
    puffed = one + b"\x00"  # the byte after the deflate (its last byte's unused bits)
    deflates, puffs = [BitExtent(0, bits)], [ByteExtent(0, len(one))]
    data = huff(puffed, puffs, deflates)
    assert zlib.decompress(data, -15) == lits  # zlib says huff wrote the right deflate
    assert puff(data, deflates) == puffed
    assert puff_extents(data, deflates) == puffs


def test_stored_block_padding_bits_ride_in_the_header_byte(engine):
    # final stored block at bit 0: bits 1, 00, then five padding bits 10101
    stored = bytes([1 | 0b10101 << 3]) + (3).to_bytes(2, "little") + (0xFFFC).to_bytes(2, "little") + b"abc"
    deflates = [BitExtent(0, 8 * len(stored))]
    puffed = puff(stored, deflates)
    assert puffed == b"\x00\x00" + bytes([0x80 | 0b10101]) + b"\x02abc" + b"\xff\x81"
    assert huff(puffed, puff_extents(stored, deflates), deflates) == stored
    if tool_problem() is None:
        assert tool_puff(stored, deflates) == puffed


def test_an_empty_stored_block_has_no_literals(engine):
    stored = b"\x01\x00\x00\xff\xff"
    assert puff(stored, [BitExtent(0, 40)]) == b"\x00\x00\x80\xff\x81"
    assert huff(b"\x00\x00\x80\xff\x81", [ByteExtent(0, 5)], [BitExtent(0, 40)]) == stored


def test_match_encodings(engine):
    # "abc" then matches of length 258 at distance 3
    text = b"abc" * 175
    stream = zlib.compress(text, 9)[2:-4]
    deflates = locate_deflates(stream)
    puffed = puff(stream, deflates)
    assert b"\xff\x80\x00\x02" in puffed  # length 258, distance 3: 0xff, 258 - 130, 0x0002
    assert huff(puffed, puff_extents(stream, deflates), deflates) == stream


def test_touching_deflates_leave_no_gap_byte(engine):
    one = zlib.compress(b"hello hello hello", 9)[2:-4]
    n = stream_bits(one)
    assert n % 8
    b = Bits()
    first = b.put_stream(one, n)
    second = b.put_stream(one, n)
    b.put(8 - b.n % 8, 0b1011011 & ((1 << (8 - b.n % 8)) - 1))
    data = b.bytes()
    p1 = puff(one, [BitExtent(0, n)])
    body = p1[: -1]  # one's own puff has the trailing partial byte after it
    both_puffed = puff(data, [first, second])
    assert both_puffed[: len(body)] == body and both_puffed[len(body) : 2 * len(body)] == body
    assert len(both_puffed) == 2 * len(body) + 1
    assert huff(both_puffed, puff_extents(data, [first, second]), [first, second]) == data


# ---------------------------------------------------------------- hostile input

def sample(name: str = "gzip_l6_small_edit") -> tuple[bytes, bytes, bytes]:
    folder = SAMPLES / "puffdiff" / name
    return ((folder / "patch.puffdiff").read_bytes(), (folder / "src.bin").read_bytes(),
            (folder / "dst.bin").read_bytes())


def with_header(patch: bytes, **changes) -> bytes:
    header, inner = parse_patch(patch)
    fields = {"version": header.version, "src": header.src, "dst": header.dst, "type": header.type}
    fields.update(changes)
    return make_patch(PatchHeader(**fields), inner)


def test_puffin_error_is_a_data_error():
    assert issubclass(PuffinError, DataError)


@pytest.mark.parametrize("patch, message", [
    (b"", "shorter than its 8-byte preamble"),
    (b"PUF2\x00\x00\x00\x00", "magic"),
    (b"PUF1\x00\x00\x00\x09\x08\x01", "runs past"),
    (b"PUF1\x00\x00\x00\x02\x08\xff", "does not parse"),
    (b"PUF1\x00\x00\x00\x00", "version 0"),
    (b"PUF1\x00\x00\x00\x04\x08\x01\x20\x02", "patch type 2"),
])
def test_bad_preamble_and_header(patch, message):
    with pytest.raises(PuffinError, match=message):
        parse_patch(patch)


@needs_samples
def test_bad_header_fields_are_named(engine):
    patch, src, dst = sample()
    header, _ = parse_patch(patch)
    s, d = header.src, header.dst
    d0, p0 = s.deflates[0], s.puffs[0]
    cases = {
        "version 2": dict(version=2),
        "2 deflates but 1 puffs": dict(src=StreamInfo(s.deflates, s.puffs[:1], s.puff_length)),
        "puff 0 is at byte": dict(src=StreamInfo(s.deflates, (ByteExtent(p0.offset + 1, p0.length),) + s.puffs[1:],
                                                 s.puff_length)),
        "puffs to": dict(src=StreamInfo(s.deflates, (ByteExtent(p0.offset, p0.length - 1),)
                                        + tuple(ByteExtent(p.offset - 1, p.length) for p in s.puffs[1:]),
                                        s.puff_length - 1)),
        "starts before deflate 0 ends": dict(src=StreamInfo((d0, d0), s.puffs, s.puff_length)),
        "more than a": dict(dst=StreamInfo(d.deflates, (ByteExtent(d.puffs[0].offset, 10**12),) + d.puffs[1:],
                                           d.puff_length)),
        "makes": dict(dst=StreamInfo(d.deflates, d.puffs, d.puff_length + 1)),
        "source is": dict(src=StreamInfo(s.deflates, s.puffs, s.puff_length + 10**9)),
    }
    for message, change in cases.items():
        with pytest.raises(PuffinError, match=message):
            puffpatch(with_header(patch, **change), src, len(dst))
    with pytest.raises(PuffinError, match="destination holds"):
        puffpatch(patch, src, len(dst) + 1)
    with pytest.raises(PuffinError, match="source is"):
        puffpatch(patch, src[:-1], len(dst))
    with pytest.raises(PuffinError, match="whole bytes"):
        raw = _puffin._PatchHeaderProto()
        raw.ParseFromString(patch[8 : 8 + int.from_bytes(patch[4:8], "big")])
        raw.src.puffs[0].offset += 4
        body = raw.SerializeToString()
        parse_patch(b"PUF1" + len(body).to_bytes(4, "big") + body)


@needs_samples
def test_a_corrupt_source_deflate_is_named(engine):
    patch, src, dst = sample()
    header, _ = parse_patch(patch)
    bad = bytearray(src)
    for bit in (1, 2):  # BTYPE 3
        at = header.src.deflates[1].offset + bit
        bad[at // 8] |= 1 << (at % 8)
    with pytest.raises(PuffinError, match="PUFFDIFF source deflate 1 .*reserved type 3"):
        puffpatch(patch, bytes(bad), len(dst))


@needs_samples
def test_inner_patch_errors_are_puffin_errors(engine):
    patch, src, dst = sample()
    header, inner = parse_patch(patch)
    with pytest.raises(PuffinError, match="inner patch"):
        puffpatch(make_patch(header, bytes(inner)[:-5]), src, len(dst))
    zucchini = PatchHeader(header.version, header.src, header.dst, PatchType.ZUCCHINI)
    with pytest.raises(PuffinError, match="zucchini patch"):
        puffpatch(make_patch(zucchini, b"not brotli at all"), src, len(dst))


@needs_samples
def test_a_missing_zucchini_module_is_a_puffin_error(monkeypatch):
    patch, src, dst = sample()
    header, inner = parse_patch(patch)
    monkeypatch.setitem(sys.modules, "dmuserd.snapshot._zucchini", None)
    zucchini = PatchHeader(header.version, header.src, header.dst, PatchType.ZUCCHINI)
    with pytest.raises(PuffinError, match="zucchini is not supported yet"):
        puffpatch(make_patch(zucchini, inner), src, len(dst))


def test_huff_refuses_a_puff_longer_than_its_extent(engine):
    stream = zlib.compress(b"some text, some more text", 9)[2:-4]
    n = stream_bits(stream)
    assert n % 8  # so the puffed stream keeps a byte after the deflate
    deflates = [BitExtent(0, n)]
    puffed = puff(stream, deflates)
    puffs = puff_extents(stream, deflates)
    with pytest.raises(PuffinError, match="more than the"):
        huff(puffed, puffs, [BitExtent(0, n - 9)])
    with pytest.raises(PuffinError, match="puff 0 is at byte"):
        huff(puffed, [ByteExtent(1, puffs[0].length)], deflates)
    with pytest.raises(PuffinError, match="ends before its last deflate"):
        huff(puffed[: puffs[0].end], puffs, deflates)


@pytest.mark.parametrize("one, message", [
    (b"\x00\x00\xe0\xff\x81", "reserved type 3"),
    (b"\x00\x00\xa0\x80\x00", "ends inside a distance"),
    (b"\x00\x00\xa0\x00\x41", "ends inside a block"),
    (b"\x00\x00\xa0", "ends inside a block"),
    (b"\x00\x00\xa0\xff\x81", "huffs to 10 bits, its extent has 4096"),
    (b"\x00\x00\x80\x81\x00\x00\xff\x81", "did not end properly|without its end of block"),
    (b"\x00\x00\xa0\xff\x82", "more than 258"),
    (b"\x00\x00\xa0\x80\x80\x00\xff\x81", "distance 32769"),
    (b"\x00\x03\xc0\x00\x00\x00\xff\x81", "shorter than its header|ends inside"),
    (b"\x00\x00\xa0\x7f\xff\xff", "ends inside a literals|run past"),
])
def test_huff_names_malformed_puffs(one, message, engine):
    with pytest.raises(PuffinError, match=message):
        huff(one, [ByteExtent(0, len(one))], [BitExtent(0, 4096)])


@given(raw=st.binary(max_size=200))
@FUZZ
def test_parse_patch_takes_anything(raw):
    for patch in (raw, b"PUF1" + raw, b"PUF1" + len(raw).to_bytes(4, "big") + raw):
        try:
            header, inner = parse_patch(patch)
        except PuffinError:
            continue
        assert header.version == 1 and len(header.src.puffs) == len(header.src.deflates)


@needs_samples
@given(data=st.data())
@FUZZ
def test_mutated_patches_raise_only_puffin_errors(data, engine):
    case = data.draw(st.sampled_from(DIFF_CASES), label="case")
    patch, src, dst = sample(case["name"])
    patch = bytearray(patch)
    for _ in range(data.draw(st.integers(1, 4))):
        if data.draw(st.booleans()):
            patch[data.draw(st.integers(0, len(patch) - 1))] = data.draw(st.integers(0, 255))
        else:
            del patch[data.draw(st.integers(0, len(patch) - 1)) :]
            patch += data.draw(st.binary(min_size=1, max_size=8))
    try:
        out = puffpatch(bytes(patch), src, len(dst))
    except PuffinError:
        return
    assert len(out) == len(dst)


@given(case=spliced(max_streams=2), data=st.data())
@FUZZ
def test_mangled_deflates_raise_only_puffin_errors_the_same_in_both_engines(case, data, monkeypatch):
    raw, deflates = case
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    raw = bytes(raw)
    outcomes = []
    for engine in filter(None, (_puffin.PYTHON_ENGINE, _puffin.NATIVE_ENGINE)):
        monkeypatch.setattr(_puffin, "engine", engine)
        try:
            puffed = puff(raw, deflates)
        except PuffinError:
            outcomes.append("puff refused")
            continue
        try:
            back = huff(puffed, puff_extents(raw, deflates), deflates)
        except PuffinError:
            outcomes.append(("huff refused", puffed))
            continue
        outcomes.append((puffed, back))
    assert len(set(outcomes)) == 1
