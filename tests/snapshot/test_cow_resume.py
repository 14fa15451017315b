"""An interrupted writer resumes at its last label and the result is the
same file as an uninterrupted write."""

import os
import random

import pytest
from cow_helpers import BS, pattern_block

from dmuserd.snapshot.cow import CowFormatError, CowReader, CowWriter, CowWriterError

VARIANTS = [
    pytest.param(dict(version=2, cluster_ops=0), id="v2-noclusters"),
    pytest.param(dict(version=2, cluster_ops=5), id="v2-clusters5"),
    pytest.param(dict(version=2, cluster_ops=200, compression="lz4"), id="v2-lz4"),
    pytest.param(dict(version=3, op_count_max=64, compression="zstd"), id="v3-zstd"),
    pytest.param(dict(version=3, op_count_max=64, compression_factor=4 * BS), id="v3-factor"),
]


def part_one(w):
    w.add_sequence_data([1, 2])
    w.add_copy(1, 7)
    w.add_xor(2, pattern_block(2), 3 * BS + 100)
    w.add_replace(10, pattern_block(10) + bytes(BS) + pattern_block(12) + pattern_block(13))
    w.add_label(1)


def part_two(w):
    w.add_zero(20, 5)
    w.add_replace(30, b"".join(pattern_block(i) for i in range(30, 36)))
    w.add_label(2)
    w.add_zero(40, 3)


def test_label_makes_the_write_readable_and_resumable(tmp_path):
    path = tmp_path / "c"
    w = CowWriter(path, version=2, buffer_size=0)
    part_one(w)
    w.add_zero(50)  # after the label: not durable, dropped on resume
    w.close()  # interrupted: no footer
    with pytest.raises(CowFormatError) as info:
        CowReader(path)
    assert info.value.rule == "no-footer"
    with CowReader(path, label=1) as r:
        assert [op.new_block for op in r.data_ops] == [1, 2, 10, 11, 12, 13]


@pytest.mark.parametrize("options", VARIANTS)
@pytest.mark.parametrize("crash", ["clean", "mid-part-two", "after-part-two"])
def test_resume_equals_uninterrupted(tmp_path, options, crash):
    whole = tmp_path / "whole"
    w = CowWriter(whole, buffer_size=4096, **options)
    part_one(w)
    part_two(w)
    w.finalize()

    path = tmp_path / "resumed"
    w = CowWriter(path, buffer_size=4096, **options)
    part_one(w)
    if crash == "mid-part-two":
        w.add_zero(20, 2)
        w.add_replace(60, pattern_block(99))  # not in the final file
    elif crash == "after-part-two":
        part_two(w)
        w.add_zero(61)
    w.close()
    w = CowWriter.resume(path, 1)
    part_two(w)
    w.finalize()
    assert path.read_bytes() == whole.read_bytes()
    with CowReader(path) as r:  # a complete, valid file
        assert r.labels == [1, 2]
        assert r.sequence == [1, 2]


def test_resume_from_a_truncated_file(tmp_path):
    # v2 without clusters writes forward only: a crash can cut it anywhere
    # after the label and it still resumes.
    whole = tmp_path / "whole"
    w = CowWriter(whole, version=2, cluster_ops=0, buffer_size=0)
    part_one(w)
    part_two(w)
    w.finalize()
    with CowReader(whole, label=1) as r:
        label_end = r.ops[-1].offset + 20
    rng = random.Random(3)
    for cut in [label_end] + rng.sample(range(label_end, os.path.getsize(whole)), 8):
        path = tmp_path / f"cut{cut}"
        data = whole.read_bytes()[:cut]
        path.write_bytes(data)
        w = CowWriter.resume(path, 1)
        part_two(w)
        w.finalize()
        assert path.read_bytes() == whole.read_bytes(), cut


def test_v3_resume_at_an_older_label(tmp_path):
    path = tmp_path / "c"
    w = CowWriter(path, version=3, op_count_max=64, buffer_size=0)
    part_one(w)
    part_two(w)
    w.add_label(3)
    w.close()
    with CowReader(path) as r:
        assert r.labels == [1, 2, 3]
    w = CowWriter.resume(path, 1)  # drops what labels 2 and 3 covered, on disk at once
    w.close()
    with CowReader(path) as r:
        assert r.labels == [1]
        assert [op.new_block for op in r.data_ops] == [1, 2, 10, 11, 12, 13]


def test_resume_checks_compression_and_label(tmp_path):
    path = tmp_path / "c"
    w = CowWriter(path, version=3, op_count_max=8, compression="lz4", buffer_size=0)
    w.add_label(5)
    w.close()
    with pytest.raises(CowWriterError):
        CowWriter.resume(path, 5, compression="zstd")
    with pytest.raises(CowFormatError) as info:
        CowWriter.resume(path, 6)
    assert info.value.rule == "label-not-found"


def test_writer_refuses_what_the_reader_would(tmp_path):
    w = CowWriter(tmp_path / "c", version=2, buffer_size=0)
    w.add_copy(3, 4)
    with pytest.raises(CowWriterError, match="already has an op"):
        w.add_zero(3)
    with pytest.raises(CowWriterError, match="sequence data must come before"):
        w.add_sequence_data([3])
    with pytest.raises(CowWriterError, match="whole number"):
        w.add_replace(9, b"x" * 100)
    w.close()
    with pytest.raises(CowWriterError, match="op_count_max"):
        CowWriter(tmp_path / "d", version=3)
    w = CowWriter(tmp_path / "e", version=3, op_count_max=2, buffer_size=0)
    w.add_zero(0, 2)
    with pytest.raises(CowWriterError, match="op_count_max"):
        w.add_zero(5)
    w.close()
