"""LZ4DIFF patches (snapshot/_lz4diff.py): byte-exact against AOSP.

* the AOSP samples in /work/shared/testdata/aosp-patches/lz4diff (their
  headers read as ``patch.txt`` decodes them; our recompression hashes as
  the generator's liblz4 did);
* cases made here with AOSP's ``lz4diff_tool`` (LZ4 and LZ4HC at several
  levels, zero padding, stored blocks, declared-vs-actual compressor
  mismatches that need postfix patches, a ZIP inside that makes the tool
  choose PUFFDIFF), compared with ``lz4diff_tool patch`` on the same input;
* hand-edited headers applied by both (trailing data, stored blocks,
  padding flipped, another level) and refused by both (broken tiling,
  unknown inner type);
* every header field as hostile input, by name, and fuzzed with hypothesis.

The AOSP tools are oracles only: tests that need one skip, saying why, when
it cannot run here.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmuserd.snapshot import _lz4diff
from dmuserd.snapshot._lz4diff import (
    Lz4DiffError,
    Lz4diffHeader,
    lz4_library,
    lz4patch,
    parse_lz4diff,
)
from dmuserd.snapshot._payload_data import DataError

SAMPLES = Path("/work/shared/testdata/aosp-patches/lz4diff")
TOOLS = Path("/work/shared/tools/aosp/bin")
LZ4DIFF_TOOL = TOOLS / "lz4diff_tool"
PUFFIN = TOOLS / "puffin"
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=150)


def _cannot_run(tool: Path) -> str | None:
    """Why ``tool`` cannot run here (None if it can)."""
    if not tool.exists():
        return f"{tool} is not here"
    probe = subprocess.run([str(tool)], capture_output=True, text=True)
    if "error while loading shared libraries" in probe.stderr:
        return f"{tool.name} cannot load its libraries: {probe.stderr.strip()}"
    return None


needs_tool = pytest.mark.skipif(bool(_cannot_run(LZ4DIFF_TOOL)), reason=str(_cannot_run(LZ4DIFF_TOOL)))
needs_puffin = pytest.mark.skipif(bool(_cannot_run(PUFFIN)), reason=str(_cannot_run(PUFFIN)))
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is not here")


def _sample_cases() -> list[dict]:
    if not SAMPLES.is_dir():
        return []
    return json.loads((SAMPLES / "manifest.json").read_text())["cases"]


def _read(case: str, name: str) -> bytes:
    return (SAMPLES / case / name).read_bytes()


# --- helpers: rebuilding a patch around an edited header --------------------------------------


def split(patch: bytes) -> tuple[object, bytes]:
    """(header message, inner patch) of a well-formed patch."""
    (pb_size,) = struct.unpack_from(">I", patch, 11)
    header = Lz4diffHeader()
    header.ParseFromString(patch[16 : 16 + pb_size])
    return header, patch[16 + pb_size :]


def join(header, inner: bytes, version: int = 1) -> bytes:
    pb = header.SerializeToString()
    return b"LZ4DIFF" + struct.pack(">II", version, len(pb)) + b"\0" + pb + inner


def edited(patch: bytes, edit) -> bytes:
    header, inner = split(patch)
    edit(header)
    return join(header, inner)


# --- the AOSP samples --------------------------------------------------------------------------


@needs_samples
@pytest.mark.parametrize("case", [c["name"] for c in _sample_cases()])
def test_aosp_sample_byte_exact(case):
    meta = next(c for c in _sample_cases() if c["name"] == case)
    src, patch, dst = _read(case, "src.bin"), _read(case, "patch.lz4diff"), _read(case, "dst.bin")
    assert hashlib.sha256(patch).hexdigest() == meta["sha256_patch"]
    assert hashlib.sha256(src).hexdigest() == meta["sha256_src"]
    out = lz4patch(patch, src, meta["dst_size"])
    assert hashlib.sha256(out).hexdigest() == meta["sha256_dst"]
    assert out == dst


_BLOCK_TXT = re.compile(r"BlockInfo \{ compressed_length: (\d+), uncompressed_length: (\d+), "
                        r"uncompressed_offset: (\d+)(?:, sha256_hash: ([0-9A-F]+))?(?:, postfix_bspatch: (\d+))?\}")


@needs_samples
@pytest.mark.parametrize("case", [c["name"] for c in _sample_cases()])
def test_aosp_sample_header_reads_as_patch_txt(case):
    """Our parse of each header field agrees with update_engine's own printout of it."""
    text = _read(case, "patch.txt").decode()
    version, pb_size, inner_size = map(int, re.match(
        r"version (\d+) pb_header_size (\d+) inner_patch_size (\d+)", text).groups())
    src_text, dst_text = text.split("dst_info:")
    parsed = parse_lz4diff(_read(case, "patch.lz4diff"))
    assert (parsed.version, len(parsed.inner_patch)) == (version, inner_size)
    assert struct.unpack_from(">I", _read(case, "patch.lz4diff"), 11)[0] == pb_size
    for side, part in ((parsed.src, src_text), (parsed.dst, dst_text)):
        want = [(int(c), int(u), int(o), bytes.fromhex(h or ""), int(p or 0))
                for c, u, o, h, p in _BLOCK_TXT.findall(part)]
        got = [(b.compressed_length, b.uncompressed_length, b.uncompressed_offset, b.sha256_hash,
                len(b.postfix_bspatch)) for b in side.blocks]
        assert got == want and want
        algo = re.search(r"algo: Algo \{type: (\w+)(?:, level: (\d+))?\}", part).groups()
        assert (side.algorithm, side.level) == ({"LZ4": 1, "LZ4HC": 2}[algo[0]], int(algo[1] or 0))
    meta = next(c for c in _sample_cases() if c["name"] == case)
    assert parsed.dst.zero_padding is meta["zero_padding"]
    assert parsed.inner_type_name == meta["op_type"].removeprefix("LZ4DIFF_")
    assert any(b.postfix_bspatch for b in parsed.dst.blocks) is meta["has_postfix_bspatch"]


@needs_samples
@pytest.mark.parametrize("case", [c["name"] for c in _sample_cases()])
def test_our_liblz4_recompresses_as_the_generators(case):
    """Every destination block's recompression hashes to the generator's sha256_hash.

    update_engine records the hash of its own recompression in each block;
    equal hashes mean the liblz4 we call compresses like AOSP's did, block
    for block (the postfix patches then apply to the bytes they were made
    against).
    """
    src, patch, dst = _read(case, "src.bin"), _read(case, "patch.lz4diff"), _read(case, "dst.bin")
    header, inner = split(patch)
    for block in header.dst_info.block_info:  # keep the hashes, drop the fixes: pure recompression
        block.postfix_bspatch = b""
    recompressed = lz4patch(join(header, inner), src, len(dst))
    parsed = parse_lz4diff(patch)
    pos = 0
    for i, b in enumerate(parsed.dst.blocks):
        chunk = recompressed[pos : pos + b.compressed_length]
        assert hashlib.sha256(chunk).digest() == b.sha256_hash, f"block {i}"
        pos += b.compressed_length
    assert (recompressed == dst) is not any(b.postfix_bspatch for b in parsed.dst.blocks)


@needs_samples
def test_postfix_hash_mismatch_names_the_block():
    case = "recompress_mismatch_postfix"
    src, patch, dst = _read(case, "src.bin"), _read(case, "patch.lz4diff"), _read(case, "dst.bin")

    def tamper(h):
        h.dst_info.block_info[3].sha256_hash = bytes(32)

    with pytest.raises(Lz4DiffError, match=r"dst block 3: recompressed with liblz4 .* sha256 .* not the generator"):
        lz4patch(edited(patch, tamper), src, len(dst))

    def no_hash(h):  # without a hash the postfix patch applies unchecked, as in update_engine
        h.dst_info.block_info[3].sha256_hash = b""

    assert lz4patch(edited(patch, no_hash), src, len(dst)) == dst

    def bad_postfix(h):
        h.dst_info.block_info[5].postfix_bspatch = b"BSDIFF40" + bytes(30)

    with pytest.raises(Lz4DiffError, match=r"dst block 5 postfix_bspatch: bsdiff patch makes 0 bytes"):
        lz4patch(edited(patch, bad_postfix), src, len(dst))


def _other_liblz4() -> str | None:
    """A system liblz4 other than the one in use, to check both give the same bytes."""
    import ctypes.util

    path = ctypes.util.find_library("lz4")
    return path if path and path not in lz4_library().origin else None


@needs_samples
@pytest.mark.skipif(_other_liblz4() is None, reason="no second liblz4 (system) to compare with")
@pytest.mark.parametrize("case", [c["name"] for c in _sample_cases()])
def test_system_liblz4_gives_the_same_bytes(case, monkeypatch):
    other = lz4_library(prefer=_other_liblz4())
    assert other is not lz4_library()
    monkeypatch.setattr(_lz4diff, "lz4_library", lambda: other)
    dst = _read(case, "dst.bin")
    assert lz4patch(_read(case, "patch.lz4diff"), _read(case, "src.bin"), len(dst)) == dst


def test_partial_decoder_agrees_with_the_lz4_package():
    """The ctypes call into liblz4 decodes what lz4.block compressed, with and without trailing padding."""
    import lz4.block

    data = b"".join(b"line %d of something compressible\n" % (i % 97) for i in range(3000))
    packed = lz4.block.compress(data, store_size=False)
    cl = len(packed) + 100
    header = Lz4diffHeader()
    header.src_info.algo.type = _lz4diff.LZ4
    header.src_info.block_info.add(uncompressed_offset=0, uncompressed_length=len(data), compressed_length=cl)
    header.inner_type = _lz4diff.BSDIFF
    # an empty destination and a tail: the inner patch copies the decompressed source whole
    inner = _identity_bsdiff(len(data))
    for padded, pad_zeros_first in ((packed + bytes(100), False), (bytes(100) + packed, True)):
        header.src_info.zero_padding_enabled = pad_zeros_first
        assert lz4patch(join(header, inner), padded, len(data)) == data


def _bsdiff(controls: list[tuple[int, int, int]], diff: bytes, extra: bytes, new_size: int) -> bytes:
    """A BSDIFF40 patch (bzip2 streams, as AOSP's bspatch reads too) from its control triples."""
    import bz2

    import bsdiff4.core

    ctrl = bz2.compress(b"".join(bsdiff4.core.encode_int64(v) for triple in controls for v in triple))
    diff_z, extra_z = bz2.compress(diff), bz2.compress(extra)
    header = b"".join(bsdiff4.core.encode_int64(v) for v in (len(ctrl), len(diff_z), new_size))
    return b"BSDIFF40" + header + ctrl + diff_z + extra_z


def _identity_bsdiff(n: int) -> bytes:
    """A patch copying ``n`` source bytes unchanged."""
    return _bsdiff([(n, 0, 0)], bytes(n), b"", n)


def _writing_bsdiff(data: bytes) -> bytes:
    """A patch that ignores its source and writes ``data``."""
    return _bsdiff([(0, len(data), 0)], b"", data, len(data))


# --- cases made with lz4diff_tool, applied by both ----------------------------------------------


def _text(seed: int, size: int) -> bytes:
    rnd = random.Random(seed)
    words = ["".join(rnd.choice("etaoinshrdlucmfw") for _ in range(rnd.randint(2, 9))) for _ in range(400)]
    lines, total = [], 0
    while total < size:
        lines.append(" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 14))) + "\n")
        total += len(lines[-1])
    return "".join(lines).encode()[:size]


def _edit(data: bytes, seed: int) -> bytes:
    """A few line insertions, deletions and rewrites."""
    rnd = random.Random(seed)
    lines = data.split(b"\n")
    for _ in range(12):
        at = rnd.randrange(len(lines))
        kind = rnd.randrange(3)
        if kind == 0:
            lines.insert(at, b"inserted %d" % rnd.randrange(10**6))
        elif kind == 1:
            del lines[at]
        else:
            lines[at] = lines[at][::-1]
    return b"\n".join(lines)


def _zip(text: bytes) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, kind in (("a.txt", zipfile.ZIP_DEFLATED), ("b.txt", zipfile.ZIP_STORED)):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = kind
            z.writestr(info, text if kind == zipfile.ZIP_DEFLATED else text[:20000], compresslevel=9)
    return buf.getvalue()


def _raw_pair(kind: str) -> tuple[bytes, bytes]:
    base = _text(1, 160_000)
    if kind == "text":
        return base, _edit(base, 2)
    if kind == "stored":  # incompressible stretches become stored blocks among LZ4 ones
        noise = random.Random(3).randbytes
        return noise(13_000) + base[:60_000] + noise(9_000), noise(13_000) + _edit(base[:60_000], 4) + noise(9_000)
    if kind == "small":  # a short file ending in a stored block
        small = _text(21, 40_000)
        return small, _edit(small, 7) + bytes(random.Random(8).randbytes(1500))
    if kind == "zip":  # lz4diff_tool tries puffdiff on ZIP archives and keeps it when smaller
        return _zip(base), _zip(_edit(base, 5))
    raise AssertionError(kind)


#: name -> (data, src compressed with, dst compressed with, src declared, dst declared, zero padding)
TOOL_CASES = {
    "lz4_nopad": ("text", "lz4", "lz4", "lz4", "lz4", False),
    "lz4_zeropad": ("text", "lz4", "lz4", "lz4", "lz4", True),
    "lz4hc9_zeropad": ("text", "lz4hc:9", "lz4hc:9", "lz4hc:9", "lz4hc:9", True),
    "lz4hc12_to_lz4hc3": ("text", "lz4hc:12", "lz4hc:3", "lz4hc:12", "lz4hc:3", False),
    "lz4hc1_to_lz4hc2": ("text", "lz4hc:1", "lz4hc:2", "lz4hc:1", "lz4hc:2", True),
    "declared_hc_actual_fast": ("text", "lz4", "lz4", "lz4", "lz4hc:9", False),
    "declared_fast_actual_hc_zeropad": ("text", "lz4hc:9", "lz4hc:9", "lz4hc:9", "lz4", True),
    "stored_blocks": ("stored", "lz4", "lz4hc:6", "lz4", "lz4hc:6", False),
    "zip_puffdiff": ("zip", "lz4", "lz4", "lz4", "lz4", False),
    "small_postfix_zeropad": ("small", "lz4", "lz4", "lz4", "lz4hc:9", True),
}


def _tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LZ4DIFF_TOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tool_cases(tmp_path_factory):
    """name -> (src.bin, dst.bin, patch, op type the tool printed, folder); made on first use."""
    made: dict[str, tuple[bytes, bytes, bytes, str, Path]] = {}

    def get(name: str):
        if name not in made:
            kind, src_algo, dst_algo, src_decl, dst_decl, pad = TOOL_CASES[name]
            where = tmp_path_factory.mktemp(name)
            src_raw, dst_raw = _raw_pair(kind)
            (where / "src.raw").write_bytes(src_raw)
            (where / "dst.raw").write_bytes(dst_raw)
            padding = "zeropad" if pad else "nopad"
            for side, algo in (("src", src_algo), ("dst", dst_algo)):
                run = _tool("compress", f"{side}.raw", f"{side}.bin", f"{side}.blocks", algo, padding, cwd=where)
                assert run.returncode == 0, run.stderr
            args = ["src.bin", "dst.bin", "src.blocks", "dst.blocks", "patch.lz4diff", src_decl, dst_decl]
            run = _tool("diff", *args, *(["zeropad"] if pad else []), cwd=where)
            assert run.returncode == 0, run.stderr
            made[name] = ((where / "src.bin").read_bytes(), (where / "dst.bin").read_bytes(),
                          (where / "patch.lz4diff").read_bytes(), run.stdout.split()[0], where)
        return made[name]

    return get


def _tool_patch(where: Path, src: bytes, patch: bytes) -> bytes | None:
    """``lz4diff_tool patch``'s output, or None if it refused (or crashed on) the patch."""
    (where / "in.bin").write_bytes(src)
    (where / "in.lz4diff").write_bytes(patch)
    (where / "out.bin").unlink(missing_ok=True)
    run = _tool("patch", "in.bin", "in.lz4diff", "out.bin", cwd=where)
    return (where / "out.bin").read_bytes() if run.returncode == 0 else None


def _puffin_tool(where: Path):
    """A ``puffpatch`` that runs AOSP's puffin (the inner patch's own oracle)."""

    def puffpatch(patch: bytes, source: bytes, size: int) -> bytes:
        (where / "puff.src").write_bytes(source)
        (where / "puff.patch").write_bytes(patch)
        run = subprocess.run([str(PUFFIN), "--operation=puffpatch", "--src_file=puff.src", "--dst_file=puff.out",
                              "--patch_file=puff.patch"], cwd=where, capture_output=True, text=True, timeout=300)
        if run.returncode:
            raise DataError(f"puffin failed: {run.stderr[-300:]}")
        return (where / "puff.out").read_bytes()

    return puffpatch


@needs_tool
@pytest.mark.parametrize("name", [n for n in TOOL_CASES if n != "zip_puffdiff"])
def test_tool_case_byte_exact(name, tool_cases):
    src, dst, patch, op, where = tool_cases(name)
    assert op == "LZ4DIFF_BSDIFF"
    parsed = parse_lz4diff(patch)
    mismatch = TOOL_CASES[name][2] != TOOL_CASES[name][4]  # compressed with one thing, declared another
    assert any(b.postfix_bspatch for b in parsed.dst.blocks) is mismatch
    if name == "stored_blocks":
        assert any(not b.compressed for b in parsed.src.blocks) and any(b.compressed for b in parsed.src.blocks)
    assert parsed.dst.zero_padding is TOOL_CASES[name][5]
    out = lz4patch(patch, src, len(dst))
    assert out == dst
    assert _tool_patch(where, src, patch) == out


@needs_tool
@needs_puffin
def test_tool_case_puffdiff_inner(tool_cases):
    src, dst, patch, op, where = tool_cases("zip_puffdiff")
    assert op == "LZ4DIFF_PUFFDIFF"
    assert parse_lz4diff(patch).inner_type == _lz4diff.PUFFDIFF
    assert lz4patch(patch, src, len(dst), puffpatch=_puffin_tool(where)) == dst
    assert _tool_patch(where, src, patch) == dst


@needs_tool
def test_puffdiff_inner_with_dmuserd_puffin(tool_cases):
    pytest.importorskip("dmuserd.snapshot._puffin", reason="dmuserd.snapshot._puffin is not written yet")
    src, dst, patch, _, _ = tool_cases("zip_puffdiff")
    assert lz4patch(patch, src, len(dst)) == dst


def test_puffdiff_inner_without_puffin_support(monkeypatch):
    header = Lz4diffHeader()
    header.src_info.block_info.add(uncompressed_offset=0, uncompressed_length=4, compressed_length=4)
    header.inner_type = _lz4diff.PUFFDIFF
    monkeypatch.setitem(sys.modules, "dmuserd.snapshot._puffin", None)
    with pytest.raises(Lz4DiffError, match=r"inner PUFFDIFF patch: puffin support .* not available"):
        lz4patch(join(header, b"PUF1"), b"abcd", 4)


def test_puffpatch_given_is_called_and_checked():
    header = Lz4diffHeader()
    header.src_info.block_info.add(uncompressed_offset=0, uncompressed_length=4, compressed_length=4)
    header.inner_type = _lz4diff.PUFFDIFF
    calls = []

    def fake(patch, source, size):
        calls.append((patch, source, size))
        return b"WXYZ"[:size]

    assert lz4patch(join(header, b"inner"), b"abcd", 4, puffpatch=fake) == b"WXYZ"
    assert calls == [(b"inner", b"abcd", 4)]

    def failing(patch, source, size):
        raise DataError("puffin patch: bad header at offset 4")

    with pytest.raises(Lz4DiffError, match=r"inner PUFFDIFF patch: puffin patch: bad header at offset 4"):
        lz4patch(join(header, b"inner"), b"abcd", 4, puffpatch=failing)
    with pytest.raises(Lz4DiffError, match=r"inner PUFFDIFF patch made 3 bytes, the header's blocks need 4"):
        lz4patch(join(header, b"inner"), b"abcd", 4, puffpatch=lambda p, s, n: b"abc")


# --- hand-edited headers, both implementations ----------------------------------------------------


def _drop_last_dst_block(h):
    del h.dst_info.block_info[-1]  # its data becomes trailing data: copied through


def _store_first_dst_block_long(h):
    # a stored block longer in the patch than on disk: without postfix patches update_engine
    # writes uncompressed_length bytes, whatever compressed_length says
    b = h.dst_info.block_info[0]
    b.compressed_length = b.uncompressed_length + 7


def _flip_dst_padding(h):
    h.dst_info.zero_padding_enabled = not h.dst_info.zero_padding_enabled


def _dst_hc_level_5(h):
    h.dst_info.algo.type, h.dst_info.algo.level = _lz4diff.LZ4HC, 5


def _dst_hc_level_0(h):  # liblz4's default level stands in
    h.dst_info.algo.type, h.dst_info.algo.level = _lz4diff.LZ4HC, 0


def _src_algo_nonsense(h):  # the source's algorithm is never used: decoding is the same
    h.src_info.algo.type, h.src_info.algo.level = 7, -3


def _break_src_tiling(h):
    h.src_info.block_info[2].uncompressed_offset += 1


def _unknown_inner(h):
    h.inner_type = 5


def _dst_unknown_algo(h):
    h.dst_info.algo.type = 9


ACCEPTED_EDITS = [_drop_last_dst_block, _store_first_dst_block_long, _flip_dst_padding, _dst_hc_level_5,
                  _dst_hc_level_0, _src_algo_nonsense]
REFUSED_EDITS = [(_break_src_tiling, r"src block 2: uncompressed_offset \d+, the blocks before it end at \d+"),
                 (_unknown_inner, r"inner_type 5 is neither BSDIFF \(0\) nor PUFFDIFF \(1\)"),
                 (_dst_unknown_algo, r"dst_info: algo type 9 \(unknown\) cannot recompress block 0")]


@needs_tool
@pytest.mark.parametrize("edit", ACCEPTED_EDITS, ids=lambda e: e.__name__.strip("_"))
def test_edited_header_applies_as_aosp(edit, tool_cases):
    src, dst, patch, _, where = tool_cases("lz4_zeropad")
    patch = edited(patch, edit)
    expected = _tool_patch(where, src, patch)
    assert expected is not None
    assert lz4patch(patch, src, len(expected)) == expected
    if edit is _drop_last_dst_block:  # the last block's data, now a tail, is copied uncompressed
        last = parse_lz4diff(tool_cases("lz4_zeropad")[2]).dst.blocks[-1]
        kept = len(dst) - last.compressed_length
        assert len(expected) == kept + last.uncompressed_length
        assert expected[kept:] == _raw_pair("text")[1][last.uncompressed_offset :]
        # and the blocks before it recompress differently: destSize sees less input after them
        assert expected[:kept] != dst[:kept]
    if edit is _flip_dst_padding:
        assert expected != dst  # the padding moved: proof the flag is honoured


@needs_tool
def test_stored_destination_ignores_its_algorithm(tool_cases):
    src, dst, patch, _, where = tool_cases("lz4_nopad")
    header, _inner = split(patch)
    # a new inner patch making the same data, so the stored blocks are the raw data itself
    dst_data = _raw_pair("text")[1]
    header.dst_info.algo.type = 0
    header.dst_info.ClearField("block_info")
    header.dst_info.block_info.add(uncompressed_offset=0, uncompressed_length=len(dst_data),
                                   compressed_length=len(dst_data))
    rebuilt = join(header, _writing_bsdiff(dst_data))
    expected = _tool_patch(where, src, rebuilt)
    assert expected == dst_data
    assert lz4patch(rebuilt, src, len(dst_data)) == dst_data


_FIELDS = ("uncompressed_offset", "uncompressed_length", "compressed_length")
_edits = st.lists(st.one_of(
    st.tuples(st.sampled_from(["src_info", "dst_info"]), st.integers(0, 20), st.sampled_from(_FIELDS),
              st.sampled_from([-4097, -4096, -100, -1, 1, 2, 100, 4096])),
    st.tuples(st.sampled_from(["src_info", "dst_info"]), st.just("flip padding")),
    st.tuples(st.sampled_from(["src_info", "dst_info"]), st.integers(0, 20), st.just("drop")),
    st.tuples(st.just("dst_info"), st.sampled_from([1, 2]), st.sampled_from([0, 1, 3, 9, 12, 13, -1])),
    st.tuples(st.just("dst_info"), st.integers(0, 20), st.just("drop postfix")),
), min_size=1, max_size=3)


def _apply_edits(h, edits) -> None:
    for edit in edits:
        info = getattr(h, edit[0])
        blocks = info.block_info
        if edit[1] == "flip padding":
            info.zero_padding_enabled = not info.zero_padding_enabled
        elif len(edit) == 3 and isinstance(edit[1], int) and edit[1] < len(blocks):
            if edit[2] == "drop":
                del blocks[edit[1]]
            else:
                blocks[edit[1]].postfix_bspatch = b""
        elif len(edit) == 4 and edit[1] < len(blocks):
            _, i, field, delta = edit
            setattr(blocks[i], field, max(0, getattr(blocks[i], field) + delta))
        elif len(edit) == 3 and edit[1] in (1, 2):
            info.algo.type, info.algo.level = edit[1], edit[2]


@needs_tool
@settings(FUZZ, max_examples=60)
@given(edits=_edits)
def test_fuzz_edited_headers_against_aosp(edits, tool_cases):
    """Either both apply a patch with a few fields nudged, to the same bytes, or both refuse it."""
    src, dst, patch, _, where = tool_cases("small_postfix_zeropad")
    patch = edited(patch, lambda h: _apply_edits(h, edits))
    expected = _tool_patch(where, src, patch)
    if expected is None:
        with pytest.raises(Lz4DiffError):
            lz4patch(patch, src, len(dst))
    else:
        assert lz4patch(patch, src, len(expected)) == expected


@needs_tool
@pytest.mark.parametrize("edit,message", REFUSED_EDITS, ids=lambda e: getattr(e, "__name__", "").strip("_"))
def test_edited_header_refused_as_aosp(edit, message, tool_cases):
    src, dst, patch, _, where = tool_cases("lz4_zeropad")
    patch = edited(patch, edit)
    assert _tool_patch(where, src, patch) is None
    with pytest.raises(Lz4DiffError, match=message):
        lz4patch(patch, src, len(dst))


# --- hostile headers, field by field -----------------------------------------------------------


def _dest_size_consumed(data: bytes, start: int, cl: int, level: int) -> int:
    """How many bytes from ``start`` liblz4's HC destSize packs into ``cl`` (what a generator declares)."""
    import ctypes

    lib = lz4_library()
    state = ctypes.create_string_buffer(lib.hc_state_size)
    out = ctypes.create_string_buffer(cl)
    consumed = ctypes.c_int(len(data) - start)
    assert lib.compress_hc_dest_size(ctypes.addressof(state), _lz4diff._address(data) + start,
                                     ctypes.addressof(out), ctypes.byref(consumed), cl, level) > 0
    return consumed.value


BASE_DATA = _text(9, 30_000)
BASE_PACKED = __import__("lz4.block").block.compress(BASE_DATA, store_size=False)
BASE_SOURCE = BASE_PACKED + bytes(-len(BASE_PACKED) % 4096)  # a cluster padded after its data
DST0 = _dest_size_consumed(BASE_DATA, 0, 4096, 9)
DST1 = _dest_size_consumed(BASE_DATA, DST0, 4096, 9)
BASE_SIZE = 2 * 4096 + len(BASE_DATA) - DST0 - DST1  # two clusters and the tail


def _base_patch() -> bytes:
    """One LZ4 source block; two LZ4HC-9 destination blocks as a generator declares them, then a tail."""
    header = Lz4diffHeader()
    header.src_info.algo.type = _lz4diff.LZ4
    header.src_info.block_info.add(uncompressed_offset=0, uncompressed_length=len(BASE_DATA),
                                   compressed_length=len(BASE_SOURCE))
    header.dst_info.algo.type = _lz4diff.LZ4HC
    header.dst_info.algo.level = 9
    header.dst_info.block_info.add(uncompressed_offset=0, uncompressed_length=DST0, compressed_length=4096)
    header.dst_info.block_info.add(uncompressed_offset=DST0, uncompressed_length=DST1, compressed_length=4096)
    header.inner_type = _lz4diff.BSDIFF
    return join(header, _identity_bsdiff(len(BASE_DATA)))


BASE_PATCH = _base_patch()
BASE_OUT = lz4patch(BASE_PATCH, BASE_SOURCE, BASE_SIZE)


def test_base_patch_round_trips():
    """The destination decodes back to the data: recompression, padding and tail in the right places."""
    assert BASE_OUT[8192:] == BASE_DATA[DST0 + DST1 :]
    header = Lz4diffHeader()
    header.src_info.block_info.add(uncompressed_offset=0, uncompressed_length=DST0, compressed_length=4096)
    header.src_info.block_info.add(uncompressed_offset=DST0, uncompressed_length=DST1, compressed_length=4096)
    tail = len(BASE_DATA) - DST0 - DST1
    header.src_info.block_info.add(uncompressed_offset=DST0 + DST1, uncompressed_length=tail, compressed_length=tail)
    assert lz4patch(join(header, _identity_bsdiff(len(BASE_DATA))), BASE_OUT, len(BASE_DATA)) == BASE_DATA


def _with(edit) -> bytes:
    return edited(BASE_PATCH, edit)


def _set(path: str, value):
    def edit(h):
        *parents, field = path.split(".")
        node = h
        for p in parents:
            node = node[int(p)] if p.isdigit() else getattr(node, p)
        setattr(node, field, value)

    return edit


def _set_block(side: str, index: int, **fields):
    def edit(h):
        for name, value in fields.items():
            setattr(getattr(h, side).block_info[index], name, value)

    return edit


N, CL = len(BASE_DATA), len(BASE_SOURCE)
HOSTILE = [
    (b"LZ4DIF", r"6 bytes .* not the 16-byte header starting b'LZ4DIFF'"),
    (b"LZ4DIFX" + BASE_PATCH[7:], r"not the 16-byte header starting b'LZ4DIFF'"),
    (BASE_PATCH[:7] + struct.pack(">I", 2) + BASE_PATCH[11:], r"version 2 at offset 7, only 1 is known"),
    (BASE_PATCH[:11] + struct.pack(">I", 2**32 - 1) + BASE_PATCH[15:],
     r"protobuf header size 4294967295 \(offset 11\) runs past"),
    (BASE_PATCH[:11] + struct.pack(">I", 3) + b"\0\x0a\xff\xff" + BASE_PATCH[16:],
     r"protobuf header at offset 16 \(3 bytes\) does not parse"),
    (_with(_set_block("src_info", 0, compressed_length=CL - 1)),
     rf"src_info: the blocks cover {CL - 1} bytes of the {CL}-byte source"),
    (_with(_set_block("src_info", 0, compressed_length=CL + 1, uncompressed_length=N + 2)),
     rf"src block 0: compressed_length {CL + 1} runs past the {CL}-byte source"),
    (_with(_set_block("src_info", 0, uncompressed_length=255 * CL + 1)),
     rf"src block 0: uncompressed_length {255 * CL + 1} is more than LZ4 can encode in compressed_length {CL}"),
    (_with(_set_block("src_info", 0, uncompressed_length=2**64 - 1)),
     r"src block 0: uncompressed_length 18446744073709551615 is more than LZ4"),
    (_with(_set_block("src_info", 0, uncompressed_length=255 * CL)),
     rf"src block 0: the LZ4 data at source offset 0 decodes to \d+ bytes, not its uncompressed_length {255 * CL}"),
    (_with(_set_block("src_info", 0, uncompressed_offset=1)),
     r"src block 0: uncompressed_offset 1, the blocks before it end at 0"),
    (_with(_set("src_info.zero_padding_enabled", True)), None),  # no leading zeros: same result
    (_with(lambda h: h.src_info.ClearField("block_info")), r"src_info: no blocks"),
    (_with(lambda h: h.src_info.block_info.add(uncompressed_offset=N)),
     r"src block 1: stored block with compressed_length 0 and uncompressed_length 0"),
    (_with(lambda h: h.src_info.block_info.add(uncompressed_offset=N, uncompressed_length=5, compressed_length=6)),
     r"src block 1: stored block with compressed_length 6 and uncompressed_length 5"),
    (_with(_set_block("dst_info", 1, uncompressed_offset=DST0 - 1)),
     rf"dst block 1: uncompressed_offset {DST0 - 1}, the blocks before it end at {DST0}"),
    (_with(_set_block("dst_info", 1, uncompressed_length=2**63)),
     r"dst block 1: uncompressed_length 9223372036854775808 is more than LZ4 can encode"),
    (_with(_set_block("dst_info", 1, compressed_length=2**40, uncompressed_length=2**40 + 1)),
     rf"dst block 1: the blocks up to it write {4096 + 2**40} bytes, the destination holds {BASE_SIZE}"),
    (_with(_set_block("dst_info", 1, compressed_length=2**31, uncompressed_length=2**31 + 1)),
     r"dst block 1: the blocks up to it write"),
    (_with(_set_block("dst_info", 1, uncompressed_length=DST1 + 100)),
     rf"inner BSDIFF patch: bsdiff patch makes {N} bytes, its destination extents hold {N + 100}"),
    (_with(_set("dst_info.algo.type", 0)), r"dst_info: algo type 0 \(UNCOMPRESSED\) cannot recompress block 0"),
    (_with(_set_block("dst_info", 0, postfix_bspatch=b"x")), r"dst block 0 postfix_bspatch: bsdiff patch of 1 bytes"),
    (_with(_set("inner_type", -1)), r"inner_type -1 is neither"),
    (edited(BASE_PATCH, lambda h: None)[:-1], r"inner BSDIFF patch: "),
]


@pytest.mark.parametrize("patch,message", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_patch_refused_by_name(patch, message):
    if message is None:
        assert lz4patch(patch, BASE_SOURCE, BASE_SIZE) == BASE_OUT
        return
    with pytest.raises(Lz4DiffError, match=message):
        lz4patch(patch, BASE_SOURCE, BASE_SIZE)


def _postfix_mode(h):
    """Block 0 gets a postfix patch that changes nothing: the destination is then checked piece by piece."""
    h.dst_info.block_info[0].postfix_bspatch = _identity_bsdiff(4096)


def test_postfix_mode_requires_pieces_to_match_blocks():
    def edit(h):
        _postfix_mode(h)
        h.dst_info.block_info.add(uncompressed_offset=DST0 + DST1, uncompressed_length=100, compressed_length=101)

    assert lz4patch(_with(_postfix_mode), BASE_SOURCE, BASE_SIZE) == BASE_OUT
    with pytest.raises(Lz4DiffError, match=r"dst block 2 makes 100 bytes, dst block 2's compressed_length is 101: "
                                           r"with postfix patches they must match"):
        lz4patch(_with(edit), BASE_SOURCE, BASE_SIZE)
    tail = len(BASE_DATA) - DST0 - DST1
    with pytest.raises(Lz4DiffError, match=rf"the data after the last block makes {tail} bytes, dst block 2's "
                                           r"compressed_length is 5"):
        lz4patch(_with(lambda h: (_postfix_mode(h), h.dst_info.block_info.add(
            uncompressed_offset=DST0 + DST1, uncompressed_length=0, compressed_length=5))), BASE_SOURCE, BASE_SIZE)


def _empty_piece_then_tail(h):
    """An empty stored block: update_engine passes its piece over, and the tail meets its info instead."""
    _postfix_mode(h)
    h.dst_info.block_info.add(uncompressed_offset=DST0 + DST1, uncompressed_length=0,
                              compressed_length=len(BASE_DATA) - DST0 - DST1)


def test_empty_piece_is_passed_over(tmp_path):
    patch = _with(_empty_piece_then_tail)
    assert lz4patch(patch, BASE_SOURCE, BASE_SIZE) == BASE_OUT
    if not _cannot_run(LZ4DIFF_TOOL):
        assert _tool_patch(tmp_path, BASE_SOURCE, patch) == BASE_OUT


def test_size_is_the_destination():
    with pytest.raises(Lz4DiffError, match=rf"bsdiff patch makes {N} bytes, its destination extents hold {N - 1}"):
        lz4patch(BASE_PATCH, BASE_SOURCE, BASE_SIZE - 1)
    with pytest.raises(Lz4DiffError, match=r"dst block 1: the blocks up to it write 8192 bytes, "
                                           r"the destination holds 5000"):
        lz4patch(BASE_PATCH, BASE_SOURCE, 5000)


def test_zero_padding_places_the_zeros():
    """A block that compresses short is padded after its data, or before it with zero_padding_enabled."""
    room = DST1 - 1  # still a compressed block, with room to spare: the text packs about 2:1

    def short_last(pad):
        def edit(h):
            h.dst_info.zero_padding_enabled = pad
            h.dst_info.block_info[1].compressed_length = room
        return edit

    size = BASE_SIZE - 4096 + room
    after = lz4patch(_with(short_last(False)), BASE_SOURCE, size)[4096 : 4096 + room]
    before = lz4patch(_with(short_last(True)), BASE_SOURCE, size)[4096 : 4096 + room]
    data = after.rstrip(b"\0")
    assert len(data) < room * 3 // 4 and after == data + bytes(room - len(data))
    assert before == bytes(room - len(data)) + data


def test_recompression_failure_is_named(monkeypatch):
    """liblz4 refusing (it does for sizes past its int range) is an error naming the block."""
    real = lz4_library()

    class Refusing:
        name, hc_state_size = "a refusing liblz4", real.hc_state_size

        @staticmethod
        def compress_hc_dest_size(*args):
            return 0

        decompress_safe_partial = real.decompress_safe_partial

    monkeypatch.setattr(_lz4diff, "lz4_library", lambda: Refusing)
    with pytest.raises(Lz4DiffError, match=rf"dst block 0: LZ4HC recompression of the {DST0 + DST1} bytes "
                                           r"from offset 0 "
                                           r"into 4096 failed \(a refusing liblz4 returned 0\)"):
        lz4patch(BASE_PATCH, BASE_SOURCE, BASE_SIZE)


def test_c_int_conversion_wraps_like_update_engine():
    assert [_lz4diff._as_c_int(v) for v in (0, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5)] == [0, 2**31 - 1, -2**31, -1, 5]


def test_inner_type_name_and_error_type():
    assert parse_lz4diff(BASE_PATCH).inner_type_name == "BSDIFF"
    assert issubclass(Lz4DiffError, DataError)


# --- fuzz ----------------------------------------------------------------------------------------


def _applies_or_refuses(patch: bytes, source: bytes, size: int) -> None:
    try:
        out = lz4patch(patch, source, size)
    except Lz4DiffError:
        return
    assert isinstance(out, bytes) and len(out) == size


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(data):
    _applies_or_refuses(data, BASE_SOURCE, BASE_SIZE)
    _applies_or_refuses(b"LZ4DIFF\0\0\0\1" + struct.pack(">I", len(data)) + b"\0" + data, BASE_SOURCE, 100)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(BASE_PATCH) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_mutated_patch(flips):
    patch = bytearray(BASE_PATCH)
    for at, value in flips:
        patch[at] = value
    _applies_or_refuses(bytes(patch), BASE_SOURCE, BASE_SIZE)


_numbers = st.one_of(st.integers(0, 40_000),
                     st.sampled_from([0, 1, 4095, 4096, 2**31 - 1, 2**31, 2**32, 2**63, 2**64 - 1]))
_blocks = st.lists(st.tuples(_numbers, _numbers, _numbers, st.sampled_from([b"", b"x", bytes(32)]),
                             st.sampled_from([b"", b"BSDIFF40", b"x"])), max_size=4)


@FUZZ
@given(src=_blocks, dst=_blocks, algo=st.integers(-1, 3), level=st.integers(-2**31, 2**31 - 1),
       inner=st.integers(-1, 2), pads=st.tuples(st.booleans(), st.booleans()),
       size=_numbers.filter(lambda n: n < 10**6))
def test_fuzz_header_fields(src, dst, algo, level, inner, pads, size):
    header = Lz4diffHeader()
    for info, blocks in ((header.src_info, src), (header.dst_info, dst)):
        for offset, ulen, clen, digest, postfix in blocks:
            info.block_info.add(uncompressed_offset=offset, uncompressed_length=ulen, compressed_length=clen,
                                sha256_hash=digest, postfix_bspatch=postfix)
    header.src_info.zero_padding_enabled, header.dst_info.zero_padding_enabled = pads
    header.dst_info.algo.type, header.dst_info.algo.level = algo, level
    header.inner_type = inner
    _applies_or_refuses(join(header, _identity_bsdiff(30_000)), BASE_SOURCE, size)


def test_without_a_usable_liblz4(monkeypatch):
    """No candidate loads, or one lacks the functions: a typed error, not an OSError or AttributeError."""
    monkeypatch.setattr(_lz4diff, "_library_candidates",
                        lambda: iter([("/nonexistent/liblz4.so.1", "missing"), ("libc.so.6", "not liblz4")]))
    with pytest.raises(Lz4DiffError, match=r"no liblz4 exporting LZ4_decompress_safe_partial"):
        lz4_library.__wrapped__()
