"""super images (LP metadata): what our test writer lays out reads back through dmuserd.images.lp,
raw and sparse (made sparse by img2simg), for versions 10.0-10.2, one or two slots; a bad primary
copy falls back to its backup as liblp does; every rule is refused with its offset; hostile bytes
(checksums made right again, so the parser's later rules are reached) only raise typed errors."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lp_writer import GEOMETRY_SIZE, RESERVED, Meta, Part, SuperBuilder, metadata_bytes, metadata_offset

from dmuserd.images import ImageError, ImageFormatError, RawImage, open_image, open_super
from dmuserd.images.lp import LpFormatError, SuperImage, SuperLookupError, with_geometry_checksum, with_metadata_checksums


def make_super(path, *, minor: int = 2, slots: int = 2, seed: int = 1):
    """system_a in two pieces plus a zero extent, vendor_a, empty system_b/vendor_b; returns (builder, data)."""
    r = random.Random(seed)
    b = SuperBuilder(size=12 << 20, minor=minor, slots=slots)
    ga = b.add_group("main_a", 8 << 20)
    gb = b.add_group("main_b", 8 << 20)
    data = {"system_a": r.randbytes(1 << 20), "vendor_a": r.randbytes(300 * 512)}
    b.add_partition("system_a", data["system_a"], group=ga, pieces=2, zero_sectors=8)
    b.add_partition("vendor_a", data["vendor_a"], group=ga)
    b.add_partition("system_b", b"", group=gb)
    b.add_partition("vendor_b", b"", group=gb)
    data["system_a"] += bytes(8 * 512)
    b.write(path)
    return b, data


@pytest.mark.parametrize("minor", [0, 1, 2])
def test_partitions_read_through_their_extents(tmp_path, minor):
    b, data = make_super(tmp_path / "super.img", minor=minor)
    with open_super(tmp_path / "super.img") as sup:
        assert sup.slot_count == 2 and not sup.empty
        meta = sup.metadata("a")
        assert (meta.major_version, meta.minor_version) == (10, minor)
        assert meta.header_size == (256 if minor == 2 else 128)
        assert meta.flags == (1 if minor == 2 else 0)
        assert [p.name for p in meta.partitions] == ["system_a", "vendor_a", "system_b", "vendor_b"]
        assert [g.name for g in meta.groups] == ["default", "main_a", "main_b"]
        assert meta.block_devices[0].partition_name == "super"
        system = meta.partition("system_a")
        assert [e.kind for e in system.extents] == ["linear", "linear", "zero"]
        assert system.size == len(data["system_a"]) and system.group == "main_a"
        assert meta.partition("system_b").size == 0
    for name, want in data.items():
        with open_image(f"{tmp_path / 'super.img'}::{name}") as part:
            assert part.size == len(want)
            assert part.pread(part.size, 0) == want
            r = random.Random(5)
            for _ in range(500):  # reads across extent boundaries, and past the end
                offset, length = r.randrange(part.size + 10), r.randrange(20000)
                assert part.pread(length, offset) == want[offset : offset + length].ljust(length, b"\0")


def test_sparse_super_reads_like_raw(tmp_path):
    img2simg = shutil.which("img2simg")
    if img2simg is None:
        pytest.skip("img2simg is missing (android-sdk-libsparse-utils, in scripts/system-packages.txt)")
    _, data = make_super(tmp_path / "super.img")
    subprocess.run([img2simg, tmp_path / "super.img", tmp_path / "sparse.img"], check=True)
    with open_super(tmp_path / "sparse.img") as sup:
        assert sup.image.kind == "sparse"
        part = sup.partition("vendor_a")
        assert part.pread(part.size, 0) == data["vendor_a"]
    with open_image(f"{tmp_path / 'sparse.img'}::system_a") as part:
        assert hashlib.sha256(part.pread(part.size, 0)).digest() == hashlib.sha256(data["system_a"]).digest()


def test_super_empty_img(tmp_path):
    b, _ = make_super(tmp_path / "super.img")
    b.empty(tmp_path / "super_empty.img")
    with open_super(tmp_path / "super_empty.img") as sup:
        assert sup.empty and sup.slot_count == 1
        assert [p.name for p in sup.metadata().partitions] == ["system_a", "vendor_a", "system_b", "vendor_b"]
        with pytest.raises(SuperLookupError, match="super_empty.img: metadata only"):
            sup.partition("system_a")


def test_slot_suffixed_names_get_the_slot_suffix(tmp_path):
    b = SuperBuilder(size=4 << 20, slots=2)
    b.add_group("main", 0, flags=1)
    part = b.add_partition("system", bytes(4096) + b"x" * 4096, group=1, attributes=1 | 2)
    assert part.attributes == 3
    b.write(tmp_path / "super.img")
    with open_super(tmp_path / "super.img") as sup:
        for slot in "ab":
            meta = sup.metadata(slot)
            assert meta.partitions[0].name == f"system_{slot}"
            assert meta.partitions[0].attribute_names == ["readonly"]
            assert meta.groups[1].name == f"main_{slot}"
        with sup.partition("system_b") as p:  # the suffix picks slot b's metadata
            assert p.metadata.slot == 1 and p.pread(4096, 4096) == b"x" * 4096


def test_bad_primary_copies_fall_back_to_the_backups(tmp_path):
    b, data = make_super(tmp_path / "super.img")
    image = bytearray((tmp_path / "super.img").read_bytes())
    image[RESERVED + 8] ^= 1  # primary geometry checksum
    at = metadata_offset(b, 0)
    image[at + 200] ^= 1  # inside slot a's primary header (10.2: 256 bytes)
    (tmp_path / "super.img").write_bytes(image)
    with open_super(tmp_path / "super.img") as sup:
        assert sup.geometry.copy == "backup"
        meta = sup.metadata("a")
        assert meta.copy == "backup" and meta.offset == metadata_offset(b, 0, backup=True)
        assert "header-checksum" in meta.problems[0]
        assert sup.metadata("b").copy == "primary"
        assert sup.partition("vendor_a").pread(len(data["vendor_a"]), 0) == data["vendor_a"]


def _corrupt(tmp_path, b, at: int, value: bytes, *, both: bool = True):
    image = bytearray((tmp_path / "super.img").read_bytes())
    image[at : at + len(value)] = value
    if both and at >= metadata_offset(b, 0):
        shift = metadata_offset(b, 0, backup=True) - metadata_offset(b, 0)
        image[at + shift : at + shift + len(value)] = value
    elif both and at >= RESERVED:
        image[at + GEOMETRY_SIZE : at + GEOMETRY_SIZE + len(value)] = value
    (tmp_path / "super.img").write_bytes(image)


@pytest.mark.parametrize("what,field,value,rule", [
    ("geometry magic", 0, b"\0\0\0\0", "geometry-magic"),
    ("geometry checksum", 8, b"\xff", "geometry-checksum"),
    ("metadata magic", "meta+0", b"\0\0\0\0", "header-magic"),
    ("metadata version", "meta+4", struct.pack("<H", 11), "version"),
    ("header checksum", "meta+12", b"\xff", "header-checksum"),
    ("tables checksum", "meta+300", b"\xff", "tables-checksum"),
])
def test_corrupt_headers_and_checksums_are_refused(tmp_path, what, field, value, rule):
    b, _ = make_super(tmp_path / "super.img")
    at = RESERVED + field if isinstance(field, int) else metadata_offset(b, 0) + int(field[5:])
    _corrupt(tmp_path, b, at, value)
    with pytest.raises(LpFormatError) as err:
        with open_super(tmp_path / "super.img") as sup:
            sup.metadata("a")
    assert err.value.rule == rule
    assert err.value.offset == (at if rule != "tables-checksum" else metadata_offset(b, 0) + 48)
    assert str(tmp_path / "super.img") in str(err.value) and f"rule {rule}" in str(err.value)


def _with_metadata(tmp_path, meta: Meta, **kwargs) -> SuperBuilder:
    b = SuperBuilder(size=4 << 20, slots=1)
    blob = metadata_bytes(meta, **kwargs)
    b.write(tmp_path / "super.img", slot_metas={0: blob})
    return b


def _device(b: SuperBuilder):
    return (b.first_sector, b.alignment, 0, b.size, "super", 0)


def _rule_of(tmp_path) -> tuple[str, int]:
    with pytest.raises(LpFormatError) as err:
        with open_super(tmp_path / "super.img") as sup:
            sup.metadata(0)
    return err.value.rule, err.value.offset


def test_table_rules(tmp_path):
    b = SuperBuilder(size=4 << 20, slots=1)
    dev = _device(b)
    at = metadata_offset(b, 0)
    ok = Meta([Part("system", [(8, 0, b.first_sector, 0)])], block_devices=[dev])
    cases = [
        (Meta([Part("system", [(8, 0, b.first_sector, 3)])], block_devices=[dev]), {}, "extent-device"),
        (Meta([Part("system", [(8, 7, 0, 0)])], block_devices=[dev]), {}, "extent-type"),
        (Meta([Part("sys/tem", [])], block_devices=[dev]), {}, "partition-name"),
        (Meta([Part("system", []), Part("system", [])], block_devices=[dev]), {}, "partition-name"),
        (Meta([Part("system", [], attributes=16)], block_devices=[dev]), {}, "partition-attributes"),
        (Meta([Part("system", [], attributes=4)], block_devices=[dev], minor=0), {}, "partition-attributes"),
        (Meta([Part("system", [], group=5)], block_devices=[dev]), {}, "partition-group"),
        (Meta([Part("system", [])], block_devices=[]), {}, "block-devices"),
        (Meta([Part("system", [])], block_devices=[(8, 0, 0, b.size, "super", 0)]), {}, "metadata-overlap"),
        (ok, {"entry_sizes": (52, 24, 48, 60)}, "entry-size"),
        (ok, {"header_size": 128}, "header-size"),
    ]
    for meta, kwargs, rule in cases:
        _with_metadata(tmp_path, meta, **kwargs)
        got, offset = _rule_of(tmp_path)
        assert got == rule, (rule, got)
        assert at <= offset < at + b.max_size
    _with_metadata(tmp_path, ok)
    with open_super(tmp_path / "super.img") as sup:
        assert sup.metadata(0).partition("system").size == 4096


def test_partition_extent_outside_the_image(tmp_path):
    b = SuperBuilder(size=4 << 20, slots=1)
    meta = Meta([Part("system", [(64, 0, (4 << 20) // 512 - 8, 0)])], block_devices=[_device(b)])
    _with_metadata(tmp_path, meta)
    with open_super(tmp_path / "super.img") as sup, pytest.raises(LpFormatError) as err:
        sup.partition("system")
    assert err.value.rule == "extent-outside-image"


def test_unknown_slot_and_missing_partition(tmp_path):
    make_super(tmp_path / "super.img")
    with open_super(tmp_path / "super.img") as sup:
        with pytest.raises(SuperLookupError, match="has no slot c: its metadata has 2 slot"):
            sup.metadata("c")
        with pytest.raises(SuperLookupError, match=r"no partition 'odm_a' in the metadata of slot a \(offset 12288; "
                                                   r"it has: system_a, vendor_a, system_b, vendor_b\)"):
            sup.partition("odm_a")
    with pytest.raises(ImageError, match="not a slot name"):
        open_image(f"{tmp_path / 'super.img'}::system_a", slot="zz")


def test_not_a_super_image(tmp_path):
    (tmp_path / "x.img").write_bytes(bytes(64 << 10))
    with pytest.raises(LpFormatError) as err:
        open_super(tmp_path / "x.img")
    assert err.value.rule == "geometry-magic" and err.value.offset == RESERVED
    with pytest.raises(ImageError, match="neither a zip nor a super image"):
        open_image(f"{tmp_path / 'x.img'}::system_a")


def test_super_inspect_and_extract_commands(tmp_path, capsys):
    from dmuserd.daemon.cli import main

    _, data = make_super(tmp_path / "super.img")
    assert main(["super", "inspect", str(tmp_path / "super.img"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["slot"] for s in info["slots"]] == ["a", "b"]
    parts = {p["name"]: p for p in info["slots"][0]["partitions"]}
    assert parts["system_a"]["size"] == len(data["system_a"])
    assert [e["kind"] for e in parts["system_a"]["extents"]] == ["linear", "linear", "zero"]
    assert info["slots"][0]["flags"] == ["virtual_ab_device"]
    assert main(["super", "inspect", str(tmp_path / "super.img")]) == 0
    text = capsys.readouterr().out
    assert "partition vendor_a: 153600 bytes, group main_a, attributes readonly" in text
    assert main(["super", "extract", str(tmp_path / "super.img"), "-o", str(tmp_path / "out")]) == 0
    for name, want in data.items():
        assert (tmp_path / "out" / f"{name}.img").read_bytes() == want
    assert not (tmp_path / "out" / "system_b.img").exists()
    # bad input: one line naming the file, nothing written
    assert main(["super", "extract", str(tmp_path / "super.img"), "--slot", "c", "-o", str(tmp_path / "o2")]) == 1
    assert main(["super", "extract", str(tmp_path / "super.img"), "--partitions", "odm_a",
                 "-o", str(tmp_path / "o3")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no slot c" in err[0] and "no partition odm_a" in err[1]
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    b = SuperBuilder(size=2 << 20, slots=2, max_size=4096, alignment=4096)
    b.add_group("g", 1 << 20)
    b.add_partition("system_a", bytes(range(256)) * 32, group=1, pieces=2, zero_sectors=2)
    b.add_partition("system_b", b"")
    return b, bytes(b.image())


def _fix_checksums(image: bytearray, b: SuperBuilder) -> None:
    """Make the geometry's and slot a's checksums right again, whatever the bytes say."""
    image[RESERVED : RESERVED + 52] = with_geometry_checksum(image[RESERVED : RESERVED + 52])[:52]
    at = metadata_offset(b, 0)
    header_size = struct.unpack_from("<I", image, at + 8)[0]
    tables_size = struct.unpack_from("<I", image, at + 44)[0]
    if 80 <= header_size <= 256 and header_size + tables_size <= b.max_size:
        end = at + header_size + tables_size
        image[at:end] = with_metadata_checksums(image[at:end])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 1200), st.integers(0, 255)), min_size=1, max_size=8),
       where=st.sampled_from(["geometry", "metadata"]), fix=st.booleans())
def test_hostile_metadata_only_raises_typed_errors(fuzz_base, edits, where, fix):
    b, base = fuzz_base
    image = bytearray(base)
    start = RESERVED if where == "geometry" else metadata_offset(b, 0)
    for at, value in edits:
        image[start + at % (52 if where == "geometry" else 600)] = value
    if fix:
        _fix_checksums(image, b)
    # the backups get the damage too, or they would hide it
    image[RESERVED + GEOMETRY_SIZE : RESERVED + 2 * GEOMETRY_SIZE] = image[RESERVED : RESERVED + GEOMETRY_SIZE]
    backup = metadata_offset(b, 0, backup=True)
    image[backup : backup + b.max_size] = image[metadata_offset(b, 0) : metadata_offset(b, 0) + b.max_size]
    raw = _mem(bytes(image))
    try:
        sup = SuperImage(raw, "fuzz.img")
        with sup:
            for slot in range(sup.slot_count):
                meta = sup.metadata(slot)
                for part in meta.partitions:
                    view = sup.partition(part.name, slot)  # not closed: it would close the super image
                    assert len(view.pread(min(view.size, 1 << 16), 0)) == min(view.size, 1 << 16)
    except (ImageFormatError, ImageError) as exc:
        assert "\n" not in str(exc)


def _mem(data: bytes) -> RawImage:
    import os

    fd = os.memfd_create("lp-fuzz")
    os.write(fd, data)
    return RawImage("fuzz.img", fd=fd)
