"""Fuzz the reader, view and merge order with mutated valid files: byte
flips, truncations, header field overwrites. Only CowFormatError (or
success) may come out: no other exception, no hang."""

import os
import struct
import tempfile

import pytest
from cow_helpers import BS, pattern_block
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmuserd.snapshot._cow_format import HEADER_FIELD_OFFSET
from dmuserd.snapshot.cow import CowFormatError, CowReader, CowWriter, xor_bytes
from dmuserd.snapshot.view import SnapshotView

NBLOCKS = 48
BASE = b"".join(pattern_block(i) for i in range(NBLOCKS))


def _write_sample(path, **options):
    w = CowWriter(path, buffer_size=0, **options)
    w.add_sequence_data([3, 4, 9])
    w.add_copy(3, 20)
    w.add_xor(4, xor_bytes(pattern_block(99), BASE[4 * BS + 7 : 5 * BS + 7]), 4 * BS + 7)
    w.add_copy(9, 9 + 30)
    w.add_label(1)
    w.add_replace(10, b"".join(pattern_block(i + 100) for i in range(6)) + bytes(BS) * 2)
    w.add_zero(30, 4)
    w.add_label(2)
    w.add_replace(40, os.urandom(BS))
    w.finalize()


_SAMPLES = {}


def sample(kind: str) -> bytes:
    if kind not in _SAMPLES:
        options = {
            "v2-lz4-clusters": dict(version=2, compression="lz4", cluster_ops=4),
            "v2-none": dict(version=2, cluster_ops=0),
            "v2-gz": dict(version=2, compression="gz", cluster_ops=3),
            "v3-zstd-factor": dict(version=3, compression="zstd", op_count_max=40, compression_factor=4 * BS),
            "v3-brotli": dict(version=3, compression="brotli", compression_level=1, op_count_max=20),
        }[kind]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "c")
            _write_sample(path, **options)
            _SAMPLES[kind] = open(path, "rb").read()
    return _SAMPLES[kind]


KINDS = ["v2-lz4-clusters", "v2-none", "v2-gz", "v3-zstd-factor", "v3-brotli"]

_FIELD_WIDTH = {"magic": 8, "num_merge_ops": 8, "sequence_data_count": 8, "op_count": 8, "op_count_max": 8,
                "major": 2, "minor": 2, "header_size": 2, "footer_size": 2, "op_size": 2}

mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1,
                                        max_size=6)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 30)),
    st.tuples(st.just("field"), st.sampled_from(sorted(HEADER_FIELD_OFFSET)),
              st.sampled_from([0, 1, 2, 3, 4, 7, 20, 255, 4096, 65535, 1 << 31, (1 << 32) - 1, (1 << 64) - 1])),
    # op records live right after the header when there is no scratch space
    st.tuples(st.just("op"), st.integers(0, 40), st.integers(0, 19), st.integers(0, 255)),
)


def mutate(data: bytes, m) -> bytes:
    raw = bytearray(data)
    if m[0] in ("field", "op") and len(raw) < 78:
        return data
    if m[0] == "flip":
        for pos, value in m[1]:
            raw[pos % len(raw)] = value
    elif m[0] == "truncate":
        del raw[m[1] % len(raw):]
    elif m[0] == "field":
        offset = HEADER_FIELD_OFFSET[m[1]]
        width = _FIELD_WIDTH.get(m[1], 4)
        raw[offset : offset + width] = (m[2] & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    else:
        header_size = struct.unpack_from("<H", raw, 12)[0]
        op_size = 20 if header_size == 38 else 16
        start = header_size + (0 if op_size == 20 else 4 * 3 + 64)
        pos = start + m[1] * op_size + m[2] % op_size
        if pos < len(raw):
            raw[pos] = m[3]
    return bytes(raw)


def exercise(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cow, base = os.path.join(tmp, "c"), os.path.join(tmp, "b")
        with open(cow, "wb") as f:
            f.write(data)
        with open(base, "wb") as f:
            f.write(BASE)
        try:
            with CowReader(cow) as reader:
                reader.merge_order()
                with SnapshotView(reader, base, cache_bytes=8 * BS) as view:
                    image = view.read(0, view.size)
                    assert len(image) == len(BASE)
        except CowFormatError as exc:
            assert exc.rule and exc.offset >= 0 and "\n" not in str(exc)
        for label in (1, 2):
            try:
                CowReader(cow, label=label).close()
            except CowFormatError:
                pass


@pytest.mark.parametrize("kind", KINDS)
def test_unmutated_samples_are_valid(kind):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "c")
        open(path, "wb").write(sample(kind))
        with open(os.path.join(tmp, "b"), "wb") as f:
            f.write(BASE)
        with CowReader(path) as r, SnapshotView(r, os.path.join(tmp, "b")) as v:
            assert v.read_block(4) == pattern_block(99)
            assert v.read_block(3) == BASE[20 * BS : 21 * BS]
            assert r.labels == [1, 2]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=5000, suppress_health_check=list(HealthCheck))
@given(m=mutation)
def test_mutated_files_give_only_format_errors(kind, m):
    exercise(mutate(sample(kind), m))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=1500, deadline=5000, suppress_health_check=list(HealthCheck))
@given(ms=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_files_give_only_format_errors_thorough(kind, ms):
    data = sample(kind)
    for m in ms:
        data = mutate(data, m)
        if not data:
            return
    exercise(data)
