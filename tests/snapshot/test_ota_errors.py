"""Broken payloads and wrong images: each a typed, one-line error naming
what is wrong and where, and no output file left behind."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import pytest
from cow_helpers import merge_in_place
from ota_vectors import (
    DELTA, FULL, HASHES, NEW, PartitionBuilder, source_dir, synthetic_images, synthetic_payload, write_payload,
)

from dmuserd.snapshot import _payload_proto as proto
from dmuserd.snapshot.ota import SourceImageError, apply_payload
from dmuserd.snapshot.payload import (
    MergeOpType,
    OpType,
    Payload,
    PayloadFormatError,
    PayloadHashError,
    UnsupportedOperationError,
)

DMUSERD = [sys.executable, "-m", "dmuserd"]
DELTA_DATA = 24 + 759  # the delta payload's data area starts here


def corrupt(tmp_path, source=DELTA, *, at: int | None = None, data: bytes = b"", truncate: int | None = None):
    raw = bytearray(source.read_bytes())
    if at is not None:
        raw[at : at + len(data)] = data
    if truncate is not None:
        del raw[truncate:]
    path = tmp_path / "bad.bin"
    path.write_bytes(raw)
    return path


def cli_apply(payload, tmp_path, *extra):
    out = tmp_path / "out"
    done = subprocess.run(DMUSERD + ["ota", "apply", payload, "--cow-dir", out, *map(str, extra)],
                          capture_output=True, text=True)
    return done, out


def assert_no_output(out) -> None:
    assert not out.exists() or os.listdir(out) == []


CASES = {
    "bad-magic": (dict(at=0, data=b"CrAX"), PayloadFormatError, ["header", "magic b'CrAX'", "rule magic"]),
    "truncated-manifest": (dict(truncate=24 + 300), PayloadFormatError,
                           ["header", "past the end of the 324-byte file", "rule truncated"]),
    "manifest-cut-short": (dict(at=12, data=struct.pack(">Q", 500)), PayloadFormatError,
                           ["manifest", "not a valid DeltaArchiveManifest", "rule protobuf"]),
    # kernel operation #2 (REPLACE_BZ) has its blob at data offset 641
    "blob-hash-mismatch": (dict(at=DELTA_DATA + 700, data=b"\xff\xff"), PayloadHashError,
                           ["partition 'kernel' operation #2", "data blob (331 bytes at data offset 641)",
                            "has SHA-256"]),
    "blob-past-the-end": (dict(truncate=DELTA_DATA + 2000), PayloadFormatError,
                          ["partition 'root' operation #0", "ends past the 2000-byte data area", "rule blob-range"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_payload_is_a_clear_error_and_leaves_nothing(tmp_path, case):
    change, error, words = CASES[case]
    path = corrupt(tmp_path, **change)
    src = source_dir(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        apply_payload(path, cow_dir=out, source_dir=src)
    message = str(info.value)
    for word in words:
        assert word in message
    assert str(path) in message
    assert_no_output(out)
    # the command line says the same in one line, exit status 1
    done, out = cli_apply(path, tmp_path, "--source-dir", src)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("dmuserd: error:")]
    assert len(errors) == 1 and words[0] in errors[0] and "Traceback" not in done.stderr
    assert_no_output(out)


def test_wrong_source_image_is_refused_before_anything_is_written(tmp_path):
    src = source_dir(tmp_path)
    (src / "kernel.img").write_bytes(NEW["kernel"].read_bytes())  # the new image given as the old one
    out = tmp_path / "out"
    with pytest.raises(PayloadHashError) as info:
        apply_payload(DELTA, cow_dir=out, source_dir=src)
    message = str(info.value)
    assert f"partition 'kernel': the old image {src / 'kernel.img'} has SHA-256 {HASHES['kernel']}" in message
    assert "old_partition_info.hash says 42a879e9" in message and "pass the right --source-dir" in message
    assert_no_output(out)
    done, out = cli_apply(DELTA, tmp_path, "--source-dir", src)
    assert done.returncode == 1 and "not the old 'kernel' image" in done.stderr
    assert_no_output(out)


def test_wrong_source_is_caught_by_an_operation_source_hash(tmp_path):
    # no old_partition_info.hash: the operations' src_sha256_hash find the wrong block
    old, _ = synthetic_payload(tmp_path / "p.bin", old_hash=False)
    (tmp_path / "old").mkdir()
    wrong = bytearray(old)
    wrong[8 * 4096] ^= 1  # block 8: read by operation #4 (the SOURCE_COPY swap)
    (tmp_path / "old" / "system.img").write_bytes(wrong)
    with pytest.raises(PayloadHashError) as info:
        apply_payload(tmp_path / "p.bin", cow_dir=tmp_path / "out", source_dir=tmp_path / "old")
    assert "partition 'system' operation #4: source blocks 10+1, 8+1 of" in str(info.value)
    assert "not the old 'system' image" in str(info.value)
    assert_no_output(tmp_path / "out")


def test_wrong_source_without_any_source_hash_fails_the_final_check(tmp_path):
    # no source hashes at all: the COW is written, but what it renders is checked
    # against new_partition_info.hash before it gets its name
    old, _ = synthetic_payload(tmp_path / "p.bin", src_hashes=False)
    (tmp_path / "old").mkdir()
    wrong = bytearray(old)
    wrong[0] ^= 1  # block 0: copied to new block 1
    (tmp_path / "old" / "system.img").write_bytes(wrong)
    with pytest.raises(PayloadHashError) as info:
        apply_payload(tmp_path / "p.bin", cow_dir=tmp_path / "out", source_dir=tmp_path / "old")
    assert "partition 'system': the converted COW renders to SHA-256" in str(info.value)
    assert "the old image may not be the one the payload was made for" in str(info.value)
    assert_no_output(tmp_path / "out")


def test_missing_or_short_source_image(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SourceImageError, match="needs the old image; pass --source-dir"):
        apply_payload(DELTA, cow_dir=out)
    src = source_dir(tmp_path)
    os.unlink(src / "root.img")
    with pytest.raises(SourceImageError, match=r"partition 'root': no old image .*root\.img and .*/root\)"):
        apply_payload(DELTA, cow_dir=out, source_dir=src)
    (src / "root.img").write_bytes(b"\0" * 100)
    with pytest.raises(SourceImageError, match="is 100 bytes, the payload's old partition is 4096"):
        apply_payload(DELTA, cow_dir=out, source_dir=src, partitions=["root"])
    assert_no_output(out)


@pytest.mark.parametrize("op_type", [OpType.MOVE, OpType.BSDIFF])
def test_unsupported_operations_are_named(tmp_path, op_type):
    """The obsolete in-place MOVE and BSDIFF (minor version 1 payloads) are refused up front."""
    old, new = synthetic_images()
    manifest = proto.DeltaArchiveManifest(block_size=4096)
    blobs: list[bytes] = []
    b = PartitionBuilder(manifest, "vendor", old, new, blobs)
    b.op(OpType.ZERO, [(6, 2)])
    b.op(op_type, [(11, 1)], [(11, 1)], b"opaque diff" if op_type == OpType.BSDIFF else None)
    write_payload(tmp_path / "u.bin", manifest, blobs)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "vendor.img").write_bytes(old)
    with pytest.raises(UnsupportedOperationError) as info:
        apply_payload(tmp_path / "u.bin", cow_dir=tmp_path / "out", source_dir=tmp_path / "old")
    assert f"partition 'vendor' operation #1: unsupported operation {op_type.name}" in str(info.value)
    assert_no_output(tmp_path / "out")
    # the payload itself is fine: inspect shows it, with the operation flagged
    shown = subprocess.run(DMUSERD + ["ota", "inspect", tmp_path / "u.bin"], capture_output=True, text=True)
    assert shown.returncode == 0 and f"unsupported by dmuserd: {op_type.name}" in shown.stdout


@pytest.mark.parametrize("op_type", [OpType.PUFFDIFF, OpType.ZUCCHINI, OpType.LZ4DIFF_BSDIFF,
                                     OpType.LZ4DIFF_PUFFDIFF])
def test_a_diff_blob_that_is_not_its_format_names_the_operation(tmp_path, op_type):
    old, new = synthetic_images()
    manifest = proto.DeltaArchiveManifest(block_size=4096)
    blobs: list[bytes] = []
    b = PartitionBuilder(manifest, "vendor", old, new, blobs)
    b.op(OpType.ZERO, [(6, 2)])
    b.op(op_type, [(11, 1)], [(11, 1)], b"opaque diff")
    write_payload(tmp_path / "u.bin", manifest, blobs)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "vendor.img").write_bytes(old)
    with pytest.raises(PayloadFormatError) as info:
        apply_payload(tmp_path / "u.bin", cow_dir=tmp_path / "out", source_dir=tmp_path / "old")
    assert "partition 'vendor' operation #1" in str(info.value) and info.value.rule == "blob-data"
    assert_no_output(tmp_path / "out")


def test_operations_writing_one_block_twice_are_refused(tmp_path):
    def extra(b):
        b.op(OpType.ZERO, [(11, 1)])  # block 11 is DISCARDed by operation #6

    synthetic_payload(tmp_path / "p.bin", extra=extra)
    with pytest.raises(PayloadFormatError) as info:
        Payload(tmp_path / "p.bin")
    assert "partition 'system' operation #11: writes block 11, which operation #6 writes too" in str(info.value)


def test_inconsistent_merge_operations_are_refused(tmp_path):
    def copy_claim(b):
        b.merge(MergeOpType.COW_COPY, (3, 1), (9, 1))  # block 9 is a REPLACE, not a copy of block 3

    old, _ = synthetic_payload(tmp_path / "p.bin", extra=copy_claim)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "system.img").write_bytes(old)
    with pytest.raises(PayloadFormatError, match=r"merge operation #5: COW_COPY says new block 9 is old block 3"):
        apply_payload(tmp_path / "p.bin", cow_dir=tmp_path / "out", source_dir=tmp_path / "old")
    assert_no_output(tmp_path / "out")


def test_full_payload_with_corrupt_bzip2_data(tmp_path):
    # the blob hash is right (recomputed), its bzip2 stream is not: a blob-data error, not a traceback
    raw = bytearray(FULL.read_bytes())
    msize = struct.unpack(">Q", raw[12:20])[0]
    manifest = proto.DeltaArchiveManifest()
    manifest.ParseFromString(bytes(raw[24 : 24 + msize]))
    data = bytearray(raw[24 + msize :])
    op = manifest.partitions[0].operations[1]
    data[op.data_offset + 20 : op.data_offset + 30] = bytes(10)
    op.data_sha256_hash = hashlib.sha256(data[op.data_offset : op.data_offset + op.data_length]).digest()
    new_raw = manifest.SerializeToString()
    path = tmp_path / "full.bin"
    path.write_bytes(struct.pack(">4sQQI", b"CrAU", 2, len(new_raw), 0) + new_raw + bytes(data))
    with pytest.raises(PayloadFormatError) as info:
        apply_payload(path, cow_dir=tmp_path / "out")
    assert "partition 'kernel' operation #1" in str(info.value) and "rule blob-data" in str(info.value)
    assert_no_output(tmp_path / "out")


def test_unsafe_merge_order_is_refused(tmp_path):
    # new 6 = old 5 and new 7 = old 6, with merge operations in the wrong order:
    # merging 6 first would destroy the old block 6 that new block 7 copies
    old, _ = synthetic_images()
    new = bytearray(old)
    new[6 * 4096 : 8 * 4096] = old[5 * 4096 : 7 * 4096]
    manifest = proto.DeltaArchiveManifest(block_size=4096)
    blobs: list[bytes] = []
    b = PartitionBuilder(manifest, "odm", old, bytes(new), blobs)
    b.op(OpType.SOURCE_COPY, [(6, 2)], [(5, 2)])
    b.merge(MergeOpType.COW_COPY, (5, 1), (6, 1))
    b.merge(MergeOpType.COW_COPY, (6, 1), (7, 1))
    write_payload(tmp_path / "p.bin", manifest, blobs)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "odm.img").write_bytes(old)
    with pytest.raises(PayloadFormatError) as info:
        apply_payload(tmp_path / "p.bin", cow_dir=tmp_path / "out", source_dir=tmp_path / "old")
    message = str(info.value)
    assert "partition 'odm' merge operations" in message and "rule merge-order" in message
    assert "reads base block 6" in message
    assert_no_output(tmp_path / "out")
    # the same copies listed in a safe order convert, and merge in place to the new image
    manifest.partitions[0].merge_operations.reverse()
    write_payload(tmp_path / "p.bin", manifest, blobs)
    (r,) = apply_payload(tmp_path / "p.bin", cow_dir=tmp_path / "out", source_dir=tmp_path / "old")
    assert merge_in_place(old, r.cow) == bytes(new)
