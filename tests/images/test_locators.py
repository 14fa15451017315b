"""Locators (``PATH::NAME``): zip entries stored in place or decompressed once, super partitions inside
zips, sparse images at every level; hostile zips only ever raise ImageError."""

from __future__ import annotations

import io
import os
import random
import zipfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lp_writer import SuperBuilder

from dmuserd.images import ImageError, ImageFormatError, RawImage, not_raw_reason, open_image, split_locator
from dmuserd.images._zip import SliceImage, _extracted
from dmuserd.images.sparse import SparseImage, write_sparse


def _sparse_of(tmp_path, data: bytes, name: str) -> bytes:
    (tmp_path / f"{name}.raw").write_bytes(data)
    with RawImage(tmp_path / f"{name}.raw") as raw:
        write_sparse(raw, tmp_path / f"{name}.simg")
    return (tmp_path / f"{name}.simg").read_bytes()


def test_stored_entries_are_read_in_place_and_deflated_ones_once(tmp_path):
    r = random.Random(1)
    data = r.randbytes(64 << 10) + bytes(64 << 10)
    simg = _sparse_of(tmp_path, data, "sys")
    with zipfile.ZipFile(tmp_path / "f.zip", "w") as z:
        z.writestr("stored.img", simg, compress_type=zipfile.ZIP_STORED)
        z.writestr("deflated.img", simg, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("plain.bin", data, compress_type=zipfile.ZIP_STORED)
    with open_image(f"{tmp_path / 'f.zip'}::stored.img") as image:
        assert isinstance(image, SparseImage) and isinstance(image.source, SliceImage)
        assert image.source.raw_file() is not None  # a range of the zip file itself
        assert image.pread(image.size, 0) == data
    before = len(_extracted)
    for _ in range(2):
        with open_image(f"{tmp_path / 'f.zip'}::deflated.img") as image:
            assert isinstance(image, SparseImage) and image.pread(image.size, 0) == data
    assert len(_extracted) == before + 1  # decompressed once for both opens
    with open_image(f"{tmp_path / 'f.zip'}::plain.bin") as image:
        assert image.kind == "zip entry" and image.pread(len(data), 0) == data


def test_super_inside_a_zip_and_sparse(tmp_path):
    b = SuperBuilder(size=8 << 20)
    payload = random.Random(2).randbytes(128 << 10)
    b.add_partition("system_a", payload)
    raw = bytes(b.image())
    simg = _sparse_of(tmp_path, raw, "super")
    with zipfile.ZipFile(tmp_path / "f.zip", "w") as z:
        z.writestr("super.img", simg, compress_type=zipfile.ZIP_STORED)
    with open_image(f"{tmp_path / 'f.zip'}::super.img::system_a") as part:
        assert part.kind == "partition" and part.pread(part.size, 0) == payload
    assert "inside another image" in not_raw_reason(f"{tmp_path / 'f.zip'}::super.img")
    assert "sparse image" in not_raw_reason(tmp_path / "super.simg")
    assert not_raw_reason(tmp_path / "super.raw") is None


def test_not_raw_reason_reads_only_the_magic(tmp_path):
    """What cannot be read says nothing here (opening it as the base says what is wrong); a FIFO does not block."""
    import os
    import subprocess
    import sys

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "short").write_bytes(b"\x3a\xff")
    for path in (tmp_path / "missing", tmp_path, tmp_path / "fifo", tmp_path / "short"):
        assert not_raw_reason(path) is None, path
    (tmp_path / "magic").write_bytes((0xED26FF3A).to_bytes(4, "little"))
    assert "sparse image" in not_raw_reason(tmp_path / "magic")
    # asking loads no image class, no format module (the start-up of `dmuserd cow merge`)
    probe = (f"import sys; from dmuserd.images import not_raw_reason; not_raw_reason({str(tmp_path / 'magic')!r}); "
             "print(sorted(m for m in sys.modules if m.startswith('dmuserd.images')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['dmuserd.images']"


def test_existing_paths_with_the_separator_stay_whole(tmp_path):
    odd = tmp_path / "a::b.img"
    odd.write_bytes(b"x" * 4096)
    assert split_locator(odd) == (str(odd), [])
    with open_image(odd) as image:
        assert image.kind == "raw" and image.size == 4096
    assert split_locator(f"{tmp_path}/z.zip::in.img::system_a") == (f"{tmp_path}/z.zip", ["in.img", "system_a"])


def test_missing_entries_and_wrong_containers(tmp_path):
    with zipfile.ZipFile(tmp_path / "f.zip", "w") as z:
        z.writestr("boot.img", b"b" * 4096)
    with pytest.raises(ImageError, match=r"has no entry 'system.img' \(it has: boot.img\)"):
        open_image(f"{tmp_path / 'f.zip'}::system.img")
    with pytest.raises(ImageError, match="cannot open"):
        open_image(tmp_path / "nope.img")
    (tmp_path / "raw.img").write_bytes(bytes(16384))
    with pytest.raises(ImageError, match="neither a zip nor a super image"):
        open_image(f"{tmp_path / 'raw.img'}::x")


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.img", b"A" * 3000, compress_type=zipfile.ZIP_STORED)
        z.writestr("b.img", bytes(range(256)) * 20, compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 10**6)), entry=st.sampled_from(["a.img", "b.img"]))
def test_hostile_zips_only_raise_image_errors(tmp_path_factory, edits, cut, entry):
    blob = bytearray(_zip_bytes())
    for at, value in edits:
        blob[at % len(blob)] = value
    if cut is not None:
        blob = blob[: cut % (len(blob) + 1)]
    fd = os.memfd_create("zip-fuzz")
    os.write(fd, bytes(blob))
    path = f"/proc/self/fd/{fd}"
    try:
        with open_image(f"{path}::{entry}") as image:
            data = image.pread(image.size, 0)
            assert len(data) == image.size
    except ImageFormatError as exc:
        assert exc.rule.startswith("zip") or exc.kind == "sparse image", exc
    except ImageError as exc:
        assert "\n" not in str(exc)
    finally:
        os.close(fd)
