"""The merge's bulk shortcuts give exactly what the one-at-a-time code gives.

* Xor ops are applied in C (the ``_merge_io`` extension) or, in Python,
  only over the stretch of each block's delta between its first and last
  non-zero byte (``_xor_blocks``): both checked against a
  byte-by-byte XOR for zero, sparse (down to the block's first and last
  byte) and dense deltas.
* The v2 reader decodes the data ops of a cluster in bulk (columns; in C
  the clusters one after another, ``CowReader._walk_v2``) and
  falls back to its per-op path when one of them breaks a rule: a clustered
  file, valid or mutated (the fuzz test's mutations), reads to the same op
  table, or fails with the same error (rule and offset), with the bulk path
  on and off.
"""

from __future__ import annotations

import os
import tempfile
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cow_fuzz import mutate, mutation, sample

from dmuserd.snapshot._cow_reader import CowReader
from dmuserd.snapshot import _merge_engine
from dmuserd.snapshot._merge_engine import _xor_blocks
from dmuserd.snapshot.cow import CowFormatError

_COLUMNS = ("type", "compression", "factor", "new_block", "source", "data_length", "offset", "data_offset")


@st.composite
def _xor_case(draw):
    bs = draw(st.sampled_from([512, 4096]))
    span, delta = bytearray(), bytearray()
    for _ in range(draw(st.integers(1, 4))):
        span += draw(st.binary(min_size=bs, max_size=bs))
        block = bytearray(bs)
        kind = draw(st.sampled_from(["zero", "sparse", "dense"]))
        if kind == "dense":
            block[:] = draw(st.binary(min_size=bs, max_size=bs))
        elif kind == "sparse":
            lo = draw(st.integers(0, bs - 1))
            hi = draw(st.integers(lo + 1, bs))
            block[lo] = draw(st.integers(1, 255))  # the stretch's ends are non-zero
            block[hi - 1] = draw(st.integers(1, 255))
        delta += block
    return bs, span, delta


@settings(max_examples=300, deadline=None)
@given(case=_xor_case())
def test_xor_blocks_equals_bytewise_xor(case):
    """Both ways: the _merge_io extension's xor_into where it is built, and the Python stretches."""
    bs, span, delta = case
    expected = bytes(a ^ b for a, b in zip(span, delta))
    python = bytearray(span)
    _xor_blocks(memoryview(span), delta, bs)
    assert span == expected
    with mock.patch.object(_merge_engine, "_NATIVE", None):
        _xor_blocks(memoryview(python), delta, bs)
    assert python == expected


def _read(path, bulk: bool):
    """What the reader makes of ``path``: its table and positions, or its error; without ``bulk``,
    neither bulk path (the C walk of the clusters, the Python runs of plain ops) is taken."""
    off = (lambda *args: None) if not bulk else None
    with mock.patch.object(CowReader, "_plain_v2", off or CowReader._plain_v2), \
            mock.patch.object(CowReader, "_walk_v2", off or CowReader._walk_v2):
        try:
            with CowReader(path) as r:
                t = r.table
                return ("ok", {c: getattr(t, c).tolist() for c in _COLUMNS}, r.labels, r.footer, r.data_end,
                        r.next_op_pos, r.next_data_pos, int(r.compression), r.sequence)
        except CowFormatError as exc:
            return ("error", exc.rule, exc.offset, str(exc))


def _same_both_ways(data: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "c")
        with open(path, "wb") as f:
            f.write(data)
        bulk, per_op = _read(path, True), _read(path, False)
    assert bulk == per_op
    return bulk


def test_clustered_samples_read_the_same_in_bulk():
    for kind in ("v2-lz4-clusters", "v2-gz"):
        result = _same_both_ways(sample(kind))
        assert result[0] == "ok" and len(result[1]["type"]) > 8  # the bulk path had ops to read


@settings(max_examples=150, deadline=5000, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["v2-lz4-clusters", "v2-gz"]), m=mutation)
def test_mutated_clustered_files_read_the_same_in_bulk(kind, m):
    _same_both_ways(mutate(sample(kind), m))
