"""Every validation rule, each with a crafted file: the error is a
CowFormatError naming the rule and the file offset of the fault."""

import struct
import zlib

import lz4.block
import pytest
import zstandard
from cow_helpers import AOSP_COW, BS, build_v2, build_v3, pattern_block

from dmuserd.errors import DmuserdError
from dmuserd.snapshot.cow import CowFormatError, CowReader, CowWriter, OpType

C, R, Z, L, X, S = OpType.COPY, OpType.REPLACE, OpType.ZERO, OpType.LABEL, OpType.XOR, OpType.SEQUENCE
V3_OPS = 78 + 64  # first op record of a build_v3 file without sequence data or scratch


def expect(path, rule, offset, **kwargs):
    with pytest.raises(CowFormatError) as info:
        with CowReader(path, **kwargs) as reader:
            for op in reader.data_ops:
                if op.data_offset is not None:
                    reader.read_data(op)
    err = info.value
    assert isinstance(err, DmuserdError)
    assert (err.rule, err.offset) == (rule, offset), str(err)
    assert str(path) in str(err) and f"offset {offset}" in str(err) and "\n" not in str(err)
    return err


def valid_v2(tmp_path, name="v2"):
    path = tmp_path / name
    build_v2(path, [(C, 0, 3), (R, 1, None, pattern_block(1)), (Z, 2, 0)])
    return path


def patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))
    return path


def u16(v):
    return struct.pack("<H", v)


def u32(v):
    return struct.pack("<I", v)


def u64(v):
    return struct.pack("<Q", v)


# --- header ------------------------------------------------------------------

def test_valid_crafted_files_read(tmp_path):
    with CowReader(valid_v2(tmp_path)) as r:
        assert [op.type for op in r.data_ops] == [C, R, Z]
    build_v3(tmp_path / "v3", [(C, 0, 3), (R, 1, None, pattern_block(1)), (Z, 2, 0)])
    with CowReader(tmp_path / "v3") as r:
        assert [op.type for op in r.data_ops] == [C, R, Z]


def test_bad_magic(tmp_path):
    expect(patch(valid_v2(tmp_path), 0, b"\0"), "magic", 0)


@pytest.mark.parametrize("major", [0, 4, 0xFFFF])
def test_bad_version(tmp_path, major):
    expect(patch(valid_v2(tmp_path), 8, u16(major)), "version", 8)


def test_bad_header_size(tmp_path):
    expect(patch(valid_v2(tmp_path), 12, u16(78)), "header-size", 12)


def test_truncated_header(tmp_path):
    (tmp_path / "a").write_bytes(open(AOSP_COW, "rb").read(10))
    expect(tmp_path / "a", "truncated-header", 0)
    (tmp_path / "b").write_bytes(open(AOSP_COW, "rb").read(30))
    expect(tmp_path / "b", "truncated-header", 30)


@pytest.mark.parametrize("field,offset,value,rule", [
    ("footer_size", 14, u16(0), "footer-size"),
    ("op_size", 16, u16(16), "op-size"),
    ("block_size", 18, u32(4097), "block-size"),
    ("buffer_size", 34, u32(1 << 30), "buffer-size"),
])
def test_bad_v2_header_fields(tmp_path, field, offset, value, rule):
    expect(patch(valid_v2(tmp_path), offset, value), rule, offset)


def v3_file(tmp_path, **kwargs):
    path = tmp_path / "v3"
    build_v3(path, [(C, 0, 3), (R, 1, None, pattern_block(1)), (Z, 2, 0)], **kwargs)
    return path


@pytest.mark.parametrize("offset,value,rule", [
    (22, u32(5), "cluster-ops"),
    (38, u64(1 << 40), "sequence-count"),
    (46, u32(5), "resume-points"),
    (54, u64(10), "op-count"),  # op_count > op_count_max
    (70, u32(9), "compression"),
])
def test_bad_v3_header_fields(tmp_path, offset, value, rule):
    expect(patch(v3_file(tmp_path), offset, value), rule, offset)


def test_v3_op_count_beyond_the_file(tmp_path):
    path = patch(v3_file(tmp_path), 62, u64(1 << 40))
    patch(path, 54, u64(1 << 39))
    expect(path, "op-count", 54)


# --- op stream -----------------------------------------------------------------

def test_truncated_op_stream(tmp_path):
    path = valid_v2(tmp_path)
    cut = 38 + 20 + 20 + BS + 7  # inside the third op record
    path.write_bytes(path.read_bytes()[:cut])
    expect(path, "no-footer", 38 + 20 + 20 + BS)


def test_footer_op_count_mismatch(tmp_path):
    path = tmp_path / "c"
    offsets = build_v2(path, [(C, 0, 3), (Z, 2, 0)], footer_num_ops=5)
    expect(path, "footer", offsets[-1] + 20 + 12)


def test_unknown_op_type(tmp_path):
    path = tmp_path / "c"
    offsets = build_v2(path, [(C, 0, 3), (9, 2, 0)])
    expect(path, "op-type", offsets[1])


def test_v3_metadata_op_in_op_array(tmp_path):
    path = tmp_path / "c"
    build_v3(path, [(C, 0, 3), (L, 0, 1)])
    expect(path, "op-type", V3_OPS + 16 + 8)


def test_data_length_on_an_op_without_data(tmp_path):
    path = tmp_path / "c"
    offsets = build_v2(path, [(Z, 0, 0), (C, 1, 3, b"abcd")])
    expect(path, "data-length", offsets[1])


def test_replace_data_outside_the_file(tmp_path):
    path = tmp_path / "c"
    offsets = build_v2(path, [(C, 0, 3), (R, 1, 1 << 30, pattern_block(1))])
    expect(path, "data-outside-file", offsets[1])
    path = tmp_path / "d"
    offsets = build_v3(path, [(C, 0, 3), (R, 1, None, pattern_block(1))])
    path.write_bytes(path.read_bytes()[:-1])  # the data is one byte short
    expect(path, "data-outside-file", offsets[1])


def test_v3_replace_source_not_at_data_position(tmp_path):
    path = tmp_path / "c"
    offsets = build_v3(path, [(R, 0, 12345, pattern_block(0))])
    expect(path, "data-position", offsets[0] + 8)


def test_v3_compression_factor_on_a_copy(tmp_path):
    path = tmp_path / "c"
    offsets = build_v3(path, [(Z, 0, 0), (C, 1, 3, b"", 2)])
    expect(path, "compression-factor", offsets[1] + 8)


def test_v2_out_of_range_fields(tmp_path):
    path = tmp_path / "c"
    offsets = build_v2(path, [(Z, 1 << 33, 0)])
    expect(path, "new-block-range", offsets[0] + 4)
    offsets = build_v2(path, [(C, 1, 1 << 50)])
    expect(path, "source-range", offsets[0] + 12)


def test_mixed_compression(tmp_path):
    path = tmp_path / "c"
    lz = lz4.block.compress(bytes(BS), store_size=False)
    zs = zstandard.ZstdCompressor().compress(bytes(BS))
    offsets = build_v2(path, [(R, 0, None, lz, 3), (R, 1, None, zs, 4)])
    expect(path, "mixed-compression", offsets[1] + 1)


def test_duplicate_ops_for_one_block(tmp_path):
    path = tmp_path / "c"
    offsets = build_v2(path, [(Z, 5, 0), (C, 1, 3), (R, 5, None, pattern_block(5))])
    err = expect(path, "duplicate-block", offsets[2])
    assert "new block 5" in str(err)
    # v3: a 4-block Replace chunk (factor 2) covers block 2 of a later Zero
    path = tmp_path / "d"
    offsets = build_v3(path, [(R, 0, None, bytes(4 * BS), 2), (Z, 2, 0)])
    expect(path, "duplicate-block", offsets[1])


def test_copy_and_xor_sources_outside_the_base(tmp_path):
    path = tmp_path / "c"
    offsets = build_v2(path, [(C, 0, 10)])
    expect(path, "source-outside-base", offsets[0], base_size=10 * BS)
    with CowReader(path, base_size=11 * BS):
        pass
    offsets = build_v2(path, [(X, 0, 9 * BS + 1, pattern_block(0))])
    expect(path, "source-outside-base", offsets[0], base_size=10 * BS)


def test_block_outside_the_target(tmp_path):
    path = tmp_path / "c"
    offsets = build_v2(path, [(Z, 0, 0), (Z, 8, 0)])
    expect(path, "block-outside-target", offsets[1], target_size=8 * BS)


# --- merge order ---------------------------------------------------------------

def test_ordered_op_after_a_non_ordered_one(tmp_path):
    # sequence names only copy 2; copy 3 falls into the rest, after replace 1
    path = tmp_path / "c"
    offsets = build_v2(path, [(S, 0, None, u32(2)), (C, 2, 10), (C, 3, 11), (R, 1, None, pattern_block(1))])
    expect(path, "ordered-after-unordered", offsets[2])


def test_ordered_op_reading_an_overwritten_block(tmp_path):
    path = tmp_path / "c"
    offsets = build_v2(path, [(C, 1, 2), (C, 2, 1)])  # a swap without a cycle break
    err = expect(path, "source-overwritten", offsets[1])
    assert "base block 1" in str(err)
    # an unaligned Xor reads two blocks: the second counts too
    offsets = build_v2(path, [(C, 4, 9), (X, 0, 3 * BS + 8, pattern_block(0))])
    expect(path, "source-overwritten", offsets[1])


def test_sequence_naming_a_missing_op(tmp_path):
    path = tmp_path / "c"
    offsets = build_v2(path, [(S, 0, None, u32(1) + u32(7)), (C, 1, 5)])
    expect(path, "sequence", offsets[0] + 20 + 4)  # the second entry of the data
    path = tmp_path / "d"
    build_v3(path, [(C, 1, 5)], sequence=[1, 1])
    expect(path, "sequence", 78 + 4)


def test_sequence_after_data_ops(tmp_path):
    path = tmp_path / "c"
    offsets = build_v2(path, [(C, 1, 5), (S, 0, None, u32(1))])
    expect(path, "sequence", offsets[1])


def test_sequence_of_partial_entries(tmp_path):
    path = tmp_path / "c"
    offsets = build_v2(path, [(S, 0, None, b"abc"), (C, 1, 5)])
    expect(path, "sequence", offsets[0])


# --- data ------------------------------------------------------------------------

def test_decompressed_size_mismatch(tmp_path):
    path = tmp_path / "c"
    short = lz4.block.compress(bytes(BS // 2), store_size=False)
    build_v2(path, [(R, 0, None, short, 3)])
    expect(path, "decompressed-size", 38 + 20)
    # a zstd frame declaring far more than a chunk is refused before decoding
    big = zstandard.ZstdCompressor().compress(bytes(1 << 24))
    build_v2(path, [(R, 0, None, big, 4)])
    expect(path, "decompressed-size", 38 + 20)
    # gz expanding past the chunk is cut at chunk + 1 bytes
    build_v2(path, [(R, 0, None, zlib.compress(bytes(1 << 20)), 1)])
    expect(path, "decompressed-size", 38 + 20)
    # uncompressed data must be exactly a block
    build_v2(path, [(R, 0, None, b"x" * 100)])
    expect(path, "decompressed-size", 38 + 20)


def test_corrupt_compressed_data(tmp_path):
    path = tmp_path / "c"
    build_v2(path, [(R, 0, None, b"\x78\x9c garbage", 1)])
    expect(path, "corrupt-data", 38 + 20)


def test_label_not_found(tmp_path):
    path = tmp_path / "c"
    w = CowWriter(path, version=2, buffer_size=0)
    w.add_label(1)
    w.finalize()
    expect(path, "label-not-found", path.stat().st_size - 84, label=2)
