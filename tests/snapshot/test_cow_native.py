"""The reader's C bulk path (``snapshot/_cow_native.c``: ``walk_v2``, the
clusters read and checked one after another) gives what its Python bulk
path gives.

test_merge_fastpaths compares the bulk path with the per-op path; with the
extension built, the bulk path is the C one. Here both bulk paths read the
same clustered files, valid and mutated (the fuzz test's mutations), to the
same op table and positions, or fail with the same error.
"""

from __future__ import annotations

import os
import tempfile
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cow_fuzz import mutate, mutation, sample
from test_merge_fastpaths import _read

from dmuserd.snapshot import _cow_reader
from dmuserd.snapshot._cow_format import HEADER_SIZE_V2
from dmuserd.snapshot._cow_reader import CowReader
from dmuserd.snapshot.cow import CowWriter

pytestmark = pytest.mark.skipif(_cow_reader._NATIVE is None,
                                reason="the optional _cow_native extension is not built (no C compiler at install)")


def _same_both_ways(data: bytes):
    """What the reader makes of ``data`` (test_merge_fastpaths' ``_read``, bulk path on) with the C
    bulk path and with the Python one: the same."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "c")
        with open(path, "wb") as f:
            f.write(data)
        native = _read(path, True)
        with mock.patch.object(_cow_reader, "_NATIVE", None):
            python = _read(path, True)
    assert native == python
    return native


def test_clustered_samples_read_the_same_in_c():
    for kind in ("v2-lz4-clusters", "v2-gz"):
        result = _same_both_ways(sample(kind))
        assert result[0] == "ok" and len(result[1]["type"]) > 8


def test_c_path_is_taken():
    """The C walk reads a clustered file's plain ops (a reader that never called it would pass the
    comparison): it returns the data ops it took."""
    taken = []
    real = _cow_reader._NATIVE

    class Spy:
        def walk_v2(self, *args):
            out = real.walk_v2(*args)
            taken.append(out[3])
            return out

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "c")
        with open(path, "wb") as f:
            f.write(sample("v2-lz4-clusters"))
        with mock.patch.object(_cow_reader, "_NATIVE", Spy()), CowReader(path) as reader:
            data_ops = reader.data_op_count
    assert taken and sum(taken) > 8 and sum(taken) <= data_ops


@settings(max_examples=150, deadline=5000, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["v2-lz4-clusters", "v2-gz"]), m=mutation)
def test_mutated_clustered_files_read_the_same_in_c(kind, m):
    _same_both_ways(mutate(sample(kind), m))


def _big_file(path) -> None:
    """A v2 file of 20k ops in clusters of 200 (more rows than one of the C walk's batches):
    a sequence first, copies, xors, zeros and replaces (some gz-compressed), labels between."""
    with CowWriter(path, compression="gz", cluster_ops=200, buffer_size=0) as w:
        w.add_sequence_data(range(0, 4000, 2))
        for block in range(0, 4000, 2):
            if block % 6:
                w.add_copy(block, 100_000 + block)
            else:
                w.add_xor(block, bytes([block % 251 or 1]) * 16 + bytes(4080), (100_000 + block) * 4096 + 5)
        for block in range(4001, 40_000, 2):
            if block % 3000 == 1:
                w.add_label(block)
            if block % 7 == 0:
                w.add_replace(block, bytes([block % 256]) * 4096)
            else:
                w.add_zero(block)
        w.finalize()


@pytest.fixture(scope="module")
def big_cow():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.cow")
        _big_file(path)
        with open(path, "rb") as f:
            yield f.read()


def test_big_file_reads_the_same_in_c(big_cow):
    result = _same_both_ways(big_cow)
    assert result[0] == "ok" and len(result[1]["type"]) > 16_384
    assert result[2] == list(range(6001, 40_000, 3000))  # the labels


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(record=st.integers(0, 20_300), at=st.integers(0, 19), value=st.integers(0, 255))
def test_big_file_with_a_broken_record_reads_the_same_in_c(big_cow, record, at, value):
    """One byte of one op record changed (type, compression, length, new block, source): the C walk
    stops where the Python rules would fail or change their course, and both paths end alike."""
    raw = bytearray(big_cow)
    raw[HEADER_SIZE_V2 + record * 20 + at] = value  # no scratch space: ops follow the header; records in
    _same_both_ways(bytes(raw))                     # the data between clusters change data (the same both ways)
