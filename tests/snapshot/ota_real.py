"""A realistic incremental OTA for the tests: every operation type real payloads use,
dm-verity on the system partition, signed, in an OTA zip.

The patches are made by AOSP's own tools (``../shared/tools/aosp``: puffin,
lz4diff_tool, zucchini_tool), the hash tree and FEC by Debian's
``veritysetup``: nothing here comes from dmuserd's own code, so a payload
built here checks our apply against AOSP's formats.

The ``system`` partition (4 KiB blocks)::

    gzip text ─ PUFFDIFF          LZ4 blocks ─ LZ4DIFF_BSDIFF    ELF ─ ZUCCHINI
    one changed block ─ SOURCE_BSDIFF / BROTLI_BSDIFF   moved blocks ─ SOURCE_COPY
    new data ─ REPLACE_XZ         zeros ─ ZERO
    hash tree (sha256, salted) ─ computed   FEC (2 roots) ─ computed

``vendor`` has no verity: REPLACE_BZ, SOURCE_COPY, PUFFDIFF with zucchini
as its inner patch.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from ota_vectors import BS, PartitionBuilder, ota_zip, pattern, write_payload

from dmuserd.snapshot import _payload_proto as proto
from dmuserd.snapshot.payload import OpType

SHARED = next((p for p in (Path(__file__).resolve().parents[3] / "shared", Path("/work/shared")) if p.is_dir()),
              Path("/work/shared"))
TOOLS = SHARED / "tools" / "aosp" / "bin"
PATCHES = SHARED / "testdata" / "aosp-patches"
SALT = bytes(range(32))


def need_tools() -> None:
    """Skip unless AOSP's tools run here and veritysetup is installed."""
    for tool in ("puffin", "lz4diff_tool", "zucchini_tool"):
        if not (TOOLS / tool).exists():
            pytest.skip(f"{TOOLS / tool} is missing (../shared/tools/aosp is not beside this checkout)")
    probe = subprocess.run([str(TOOLS / "zucchini_tool")], capture_output=True)
    if b"usage" not in probe.stdout + probe.stderr:
        pytest.skip(f"AOSP's tools do not run here (missing libraries?): {probe.stderr[-200:]!r}")
    if not shutil.which("veritysetup"):
        pytest.skip("veritysetup is missing (Debian's cryptsetup-bin, in scripts/system-packages.txt)")


def _run(*args) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=120)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BS)


def _text(seed: int, lines: int) -> bytes:
    return b"".join(b"line %d of the dmuserd test file, seed %d: %s\n" % (i, seed, b"abcdefgh" * (i % 7))
                    for i in range(lines))


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def _deflate_bytes(gz: bytes) -> str:
    """``off:len`` of the deflate stream inside a gzip member made by :func:`_gzip` (10-byte header, 8-byte tail)."""
    return f"10:{len(gz) - 18}"


def puffdiff(work: Path, old: bytes, new: bytes, old_gz: bytes, new_gz: bytes, *, zucchini: bool = False) -> bytes:
    """A PUFFDIFF blob (puffin) turning extent data ``old`` into ``new``; each starts with a gzip member."""
    (work / "p.src").write_bytes(old)
    (work / "p.dst").write_bytes(new)
    _run(TOOLS / "puffin", "--operation=puffdiff", f"--src_file={work / 'p.src'}", f"--dst_file={work / 'p.dst'}",
         f"--patch_file={work / 'p.patch'}", "--src_file_type=raw", "--dst_file_type=raw",
         f"--src_deflates_byte={_deflate_bytes(old_gz)}", f"--dst_deflates_byte={_deflate_bytes(new_gz)}",
         f"--patch_algorithm={1 if zucchini else 0}")
    return (work / "p.patch").read_bytes()


def zucchini(work: Path, old: bytes, new: bytes) -> bytes:
    (work / "z.old").write_bytes(old)
    (work / "z.new").write_bytes(new)
    _run(TOOLS / "zucchini_tool", "gen", work / "z.old", work / "z.new", work / "z.patch")
    return (work / "z.patch").read_bytes()


def tree_blocks(data_blocks: int) -> int:
    """Blocks of a sha256 dm-verity hash tree over ``data_blocks`` 4 KiB blocks (128 digests a block)."""
    total, level = 0, data_blocks
    while level > 1:
        level = -(-level // 128)
        total += level
    return total


def with_verity(data: bytes, work: Path) -> tuple[bytes, int, int]:
    """``data`` + its hash tree + FEC as veritysetup (update_engine's layout) makes them; (image, tree, fec blocks)."""
    blocks = len(data) // BS
    tree = tree_blocks(blocks)
    image = work / "verity.img"
    image.write_bytes(data + bytes(tree * BS))
    _run("veritysetup", "format", image, image, "--format=1", "--no-superblock", f"--hash-offset={len(data)}",
         f"--data-blocks={blocks}", "--data-block-size=4096", "--hash-block-size=4096", f"--salt={SALT.hex()}",
         f"--fec-device={image}", f"--fec-offset={len(data) + tree * BS}", "--fec-roots=2")
    out = image.read_bytes()
    assert len(out) % BS == 0
    return out, tree, len(out) // BS - blocks - tree


def build(directory) -> dict:
    """Write ``old/``, ``new/``, ``payload.bin``, ``ota.zip`` and ``cert.pem`` in ``directory``.

    Returns the paths and, per partition, the operation types it uses.
    """
    from ota_vectors import signing_key

    need_tools()
    directory = Path(directory)
    work = Path(tempfile.mkdtemp(dir=directory))
    key, cert = signing_key(directory)

    # --- system: one region per operation kind -------------------------------------
    gz_old, gz_new = _gzip(_text(1, 3000)), _gzip(_text(1, 3000).replace(b"line 1500 ", b"LINE 1500 ") + b"tail\n")
    lz4 = PATCHES / "lz4diff" / "lz4_fast_small_edit"
    lz_old, lz_new = (lz4 / "src.bin").read_bytes(), (lz4 / "dst.bin").read_bytes()
    elf = PATCHES / "zucchini" / "elf_x86_64_small_change"
    elf_old, elf_new = _pad((elf / "old.bin").read_bytes()), _pad((elf / "new.bin").read_bytes())
    regions_old = [_pad(gz_old), lz_old, elf_old]
    regions_new = [_pad(gz_new), lz_new, elf_new]
    width = [max(len(a), len(b)) // BS for a, b in zip(regions_old, regions_new)]
    regions_old = [r + bytes(w * BS - len(r)) for r, w in zip(regions_old, width)]
    regions_new = [r + bytes(w * BS - len(r)) for r, w in zip(regions_new, width)]
    misc_old = [pattern(i) for i in range(8)]
    changed = bytearray(misc_old[0])
    changed[100:120] = b"twenty changed bytes"
    misc_new = [bytes(changed), misc_old[1], misc_old[5], misc_old[6], pattern(77), bytes(BS), bytes(BS),
                bytes(changed[::-1])]
    sys_old = b"".join(regions_old) + b"".join(misc_old)
    data_new = b"".join(regions_new) + b"".join(misc_new)
    sys_new, tree, fec = with_verity(data_new, work)
    data_blocks = len(data_new) // BS
    sys_old += bytes(len(sys_new) - len(sys_old))  # the old partition is as large (its old tree: zeros here)

    manifest = proto.DeltaArchiveManifest(block_size=BS, minor_version=8)
    blobs: list[bytes] = []
    b = PartitionBuilder(manifest, "system", sys_old, sys_new, blobs)
    start = 0
    g, l, e = width
    b.op(OpType.PUFFDIFF, [(start, g)], [(start, g)],
         puffdiff(work, regions_old[0], regions_new[0], gz_old, gz_new))
    start += g
    b.op(OpType.LZ4DIFF_BSDIFF, [(start, l)], [(start, l)], (lz4 / "patch.lz4diff").read_bytes())
    start += l
    b.op(OpType.ZUCCHINI, [(start, e)], [(start, e)], zucchini(work, regions_old[2], regions_new[2]))
    start += e
    m = start  # misc blocks
    b.bsdiff([(m, 1)], [(m, 1)])
    b.op(OpType.SOURCE_COPY, [(m + 1, 1), (m + 2, 2)], [(m + 1, 1), (m + 5, 2)])
    b.replace([(m + 4, 1)], OpType.REPLACE_XZ)
    b.op(OpType.ZERO, [(m + 5, 2)])
    b.bsdiff([(m + 7, 1)], [(m, 1)], OpType.BROTLI_BSDIFF)
    part = b.part
    part.hash_tree_data_extent.CopyFrom(proto.Extent(start_block=0, num_blocks=data_blocks))
    part.hash_tree_extent.CopyFrom(proto.Extent(start_block=data_blocks, num_blocks=tree))
    part.hash_tree_algorithm = "sha256"
    part.hash_tree_salt = SALT
    part.fec_data_extent.CopyFrom(proto.Extent(start_block=0, num_blocks=data_blocks + tree))
    part.fec_extent.CopyFrom(proto.Extent(start_block=data_blocks + tree, num_blocks=fec))
    part.fec_roots = 2

    # --- vendor: no verity; PUFFDIFF with a zucchini inner patch --------------------
    v_gz_old, v_gz_new = _gzip(_text(2, 800)), _gzip(_text(2, 800).replace(b"seed 2: abc", b"seed 2: ABC"))
    v_new_gz = _pad(v_gz_new)
    width_v = max(len(_pad(v_gz_old)), len(v_new_gz)) // BS
    v_old = _pad(v_gz_old) + bytes(width_v * BS - len(_pad(v_gz_old))) + b"".join(pattern(200 + i) for i in range(3))
    v_new = v_new_gz + bytes(width_v * BS - len(v_new_gz)) + pattern(202) + pattern(300) + pattern(201)
    v = PartitionBuilder(manifest, "vendor", v_old, v_new, blobs)
    v.op(OpType.PUFFDIFF, [(0, width_v)], [(0, width_v)],
         puffdiff(work, v_old[: width_v * BS], v_new[: width_v * BS], v_gz_old, v_gz_new, zucchini=True))
    v.op(OpType.SOURCE_COPY, [(width_v, 1), (width_v + 2, 1)], [(width_v + 2, 1), (width_v + 1, 1)])
    v.replace([(width_v + 1, 1)], OpType.REPLACE_BZ)

    write_payload(directory / "payload.bin", manifest, blobs, key=key)
    package = ota_zip(directory / "ota.zip", directory / "payload.bin")
    for side, images in (("old", {"system": sys_old, "vendor": v_old}), ("new", {"system": sys_new, "vendor": v_new})):
        (directory / side).mkdir(exist_ok=True)
        for name, data in images.items():
            (directory / side / f"{name}.img").write_bytes(data)
    shutil.rmtree(work)
    info = {
        "payload": directory / "payload.bin", "zip": package, "cert": cert,
        "old": directory / "old", "new": directory / "new",
        "sha256": {"system": hashlib.sha256(sys_new).hexdigest(), "vendor": hashlib.sha256(v_new).hexdigest()},
        "ops": {p.partition_name: sorted({OpType(o.type).name for o in p.operations}) for p in manifest.partitions},
        "verity": {"data_blocks": data_blocks, "tree_blocks": tree, "fec_blocks": fec},
    }
    (directory / "ota_real.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                          for k, v in info.items()}, indent=1))
    return info
