"""Android sparse images: read in place against libsparse's own tools (img2simg, simg2img) as oracles,
written by us and read back by simg2img, every format rule refused with its offset, hostile bytes
only ever a SparseFormatError."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmuserd.images import RawImage, open_image
from dmuserd.images.sparse import (CRC32, DONT_CARE, FILL, MAGIC, RAW, SparseFormatError, SparseImage,
                                   unsparse, write_sparse)

BS = 4096


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is missing (Debian package android-sdk-libsparse-utils, in scripts/system-packages.txt)")
    return path


def raw_blocks(seed: int, blocks: int, bs: int = BS) -> bytes:
    """Random blocks, zero blocks and blocks of one repeated 4-byte value, mixed."""
    r = random.Random(seed)
    out = bytearray()
    for _ in range(blocks):
        k = r.random()
        if k < 0.25:
            out += bytes(bs)
        elif k < 0.45:
            out += r.randbytes(4) * (bs // 4)
        else:
            out += r.randbytes(bs)
    return bytes(out)


def sparse_bytes(chunks, *, bs: int = BS, total: int | None = None, file_hdr: int = 28, chunk_hdr: int = 12,
                 major: int = 1) -> bytes:
    """A sparse image by hand: ``chunks`` = [(type, blocks, data)]."""
    body = b""
    blocks = 0
    for ctype, count, data in chunks:
        body += struct.pack("<HHII", ctype, 0, count, chunk_hdr + len(data)).ljust(chunk_hdr, b"\0") + data
        blocks += count if ctype != CRC32 else 0
    head = struct.pack("<IHHHHIIII", MAGIC, major, 0, file_hdr, chunk_hdr, bs,
                       blocks if total is None else total, len(chunks), 0).ljust(file_hdr, b"\0")
    return head + body


def test_img2simg_images_read_like_the_raw_image(tmp_path):
    img2simg = _tool("img2simg")
    raw = raw_blocks(1, 700)
    (tmp_path / "raw.img").write_bytes(raw)
    subprocess.run([img2simg, tmp_path / "raw.img", tmp_path / "s.img"], check=True)
    with open_image(tmp_path / "s.img") as image:
        assert isinstance(image, SparseImage)
        assert image.size == len(raw)
        assert image.chunk_counts["FILL"] > 0 and image.chunk_counts["RAW"] > 0
        assert image.pread(image.size, 0) == raw
        r = random.Random(2)
        for _ in range(3000):  # any offset, any length, past the end too
            offset, length = r.randrange(image.size + 100), r.randrange(3 * BS)
            assert image.pread(length, offset) == raw[offset : offset + length].ljust(length, b"\0"), (offset, length)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), blocks=st.integers(1, 200), holes=st.booleans(), crc=st.booleans(),
       block_size=st.sampled_from([1024, 4096]))
def test_our_sparse_images_unsparse_with_simg2img(tmp_path, seed, blocks, holes, crc, block_size):
    simg2img = _tool("simg2img")
    raw = raw_blocks(seed, blocks, block_size)
    (tmp_path / "raw.img").write_bytes(raw)
    with RawImage(tmp_path / "raw.img") as source:
        counts = write_sparse(source, tmp_path / "s.img", block_size=block_size, holes=holes, crc=crc)
    assert counts["CRC32"] == int(crc)
    assert (counts["DONT_CARE"] > 0) == (holes and bytes(block_size) in [raw[i:i + block_size]
                                                                        for i in range(0, len(raw), block_size)])
    subprocess.run([simg2img, tmp_path / "s.img", tmp_path / "oracle.img"], check=True)
    assert (tmp_path / "oracle.img").read_bytes() == raw
    with open_image(tmp_path / "s.img") as image:
        assert image.pread(image.size, 0) == raw
        assert unsparse(image, tmp_path / "back.img") == len(raw)
    assert (tmp_path / "back.img").read_bytes() == raw


def test_longer_headers_are_skipped_and_fill_phase_is_kept():
    fill = struct.pack("<I", 0x11223344)
    blob = sparse_bytes([(FILL, 2, fill), (RAW, 1, b"\x05" * 1024), (DONT_CARE, 1, b""), (CRC32, 0, b"\0" * 4)],
                        bs=1024, file_hdr=40, chunk_hdr=16)
    image = SparseImage(_MemImage(blob))
    want = fill * 512 + b"\x05" * 1024 + bytes(1024)
    assert image.pread(image.size, 0) == want
    for offset in range(0, 64):  # a fill read from any byte keeps the pattern's phase
        assert image.pread(7, offset) == want[offset : offset + 7]


def test_crc32_chunks_are_checked_by_unsparse(tmp_path):
    data = bytes(range(256)) * 16
    good = zlib.crc32(data + bytes(BS))
    blob = sparse_bytes([(RAW, 1, data), (DONT_CARE, 1, b""), (CRC32, 0, struct.pack("<I", good))])
    (tmp_path / "ok.img").write_bytes(blob)
    with open_image(tmp_path / "ok.img") as image:
        unsparse(image, tmp_path / "ok.raw")
    assert (tmp_path / "ok.raw").read_bytes() == data + bytes(BS)
    bad = blob[:-4] + struct.pack("<I", good ^ 1)
    (tmp_path / "bad.img").write_bytes(bad)
    with open_image(tmp_path / "bad.img") as image, pytest.raises(SparseFormatError) as err:
        unsparse(image, tmp_path / "bad.raw")
    assert err.value.rule == "crc32"
    assert err.value.offset == len(bad) - 16  # the CRC32 chunk's header
    assert not (tmp_path / "bad.raw").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


class _MemImage(RawImage):
    """Bytes as an image (through a memfd), for hand-made files."""

    def __init__(self, data: bytes) -> None:
        fd = os.memfd_create("sparse-test")
        os.write(fd, data)
        super().__init__("mem.img", fd=fd)


RULES = [
    # (name, bytes, rule, offset)
    ("short file", struct.pack("<I", MAGIC), "header", 0),
    ("magic", b"\0" * 28, "magic", 0),
    ("major version", sparse_bytes([(RAW, 1, bytes(BS))], major=2), "version", 4),
    ("file header size", sparse_bytes([], file_hdr=28)[:8] + struct.pack("<H", 20) + sparse_bytes([])[10:],
     "header-size", 8),
    ("chunk header size", sparse_bytes([])[:10] + struct.pack("<H", 8) + sparse_bytes([])[12:],
     "chunk-header-size", 10),
    ("block size", sparse_bytes([], bs=4098), "block-size", 12),
    ("raw size", sparse_bytes([(RAW, 2, bytes(BS))]), "chunk-size", 28),
    ("fill size", sparse_bytes([(FILL, 1, b"\0" * 8)]), "chunk-size", 28),
    ("dont care data", sparse_bytes([(DONT_CARE, 1, b"\0" * 4)]), "chunk-size", 28),
    ("chunk type", sparse_bytes([(0xCAC9, 1, b"")]), "chunk-type", 28),
    ("overrun", sparse_bytes([(DONT_CARE, 3, b"")], total=2), "overrun", 28),
    ("short", sparse_bytes([(DONT_CARE, 1, b"")], total=2), "short", 40),
    ("truncated data", sparse_bytes([(RAW, 1, bytes(BS))])[:-1], "truncated", 28),
    ("truncated header", sparse_bytes([(DONT_CARE, 1, b""), (DONT_CARE, 1, b"")])[:-1], "truncated", 40),
    ("total_sz below header", sparse_bytes([])[:20] + struct.pack("<II", 1, 0) + struct.pack("<HHII", DONT_CARE, 0, 0, 4),
     "chunk-size", 28),
]


@pytest.mark.parametrize("name,blob,rule,offset", RULES, ids=[r[0] for r in RULES])
def test_each_rule_is_refused_with_its_offset(tmp_path, name, blob, rule, offset):
    path = tmp_path / "bad.img"
    path.write_bytes(blob)
    with pytest.raises(SparseFormatError) as err:
        SparseImage(RawImage(path))
    assert (err.value.rule, err.value.offset) == (rule, offset)
    message = str(err.value)
    assert str(path) in message and f"offset {offset}" in message and f"rule {rule}" in message
    assert "\n" not in message


def test_dmuserd_image_commands(tmp_path):
    from dmuserd.daemon.cli import main

    raw = raw_blocks(9, 64)
    (tmp_path / "raw.img").write_bytes(raw)
    assert main(["image", "sparse", str(tmp_path / "raw.img"), str(tmp_path / "s.img"), "--crc"]) == 0
    assert main(["image", "unsparse", str(tmp_path / "s.img"), str(tmp_path / "back.img")]) == 0
    assert hashlib.sha256((tmp_path / "back.img").read_bytes()).digest() == hashlib.sha256(raw).digest()
    # unsparse of a raw image is refused in one line, nothing written
    assert main(["image", "unsparse", str(tmp_path / "raw.img"), str(tmp_path / "x.img")]) == 1
    assert not (tmp_path / "x.img").exists()


def test_unsparse_error_is_one_line_naming_file_offset_rule(tmp_path, capsys):
    from dmuserd.daemon.cli import main

    (tmp_path / "bad.img").write_bytes(sparse_bytes([(DONT_CARE, 3, b"")], total=2))
    assert main(["image", "unsparse", str(tmp_path / "bad.img"), str(tmp_path / "out.img")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"{tmp_path / 'bad.img'}, offset 28" in err[0] and "rule overrun" in err[0]
    assert not (tmp_path / "out.img").exists()


def _valid_image(seed: int) -> bytes:
    r = random.Random(seed)
    chunks = []
    for _ in range(r.randrange(1, 6)):
        kind = r.choice([RAW, FILL, DONT_CARE, CRC32])
        count = r.randrange(0, 3) if kind != CRC32 else 0
        data = {RAW: r.randbytes(count * 512), FILL: r.randbytes(4), DONT_CARE: b"", CRC32: r.randbytes(4)}[kind]
        chunks.append((kind, count, data))
    return sparse_bytes(chunks, bs=512)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 1000), edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 5000))
def test_hostile_bytes_only_raise_sparse_format_errors(seed, edits, cut):
    blob = bytearray(_valid_image(seed))
    for at, value in edits:
        if at < len(blob):
            blob[at] = value
    blob = bytes(blob[: max(cut, 0)]) if cut < len(blob) else bytes(blob)
    try:
        image = SparseImage(_MemImage(blob))
    except SparseFormatError as exc:
        assert exc.offset <= max(len(blob), 28) and exc.rule
        return
    with image:
        assert image.size == image.total_blocks * image.block_size
        data = image.pread(image.size, 0)
        assert len(data) == image.size
        for offset in range(0, image.size, 700):
            assert image.pread(900, offset) == data[offset : offset + 900].ljust(900, b"\0")
