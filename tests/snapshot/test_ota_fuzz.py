"""Fuzz the payload reader: header and manifest parsers on arbitrary and
mutated bytes, manifests built from random fields, bsdiff patches, and whole
mutated payloads applied end to end. Only PayloadFormatError (or success
with every invariant the reader promises) may come out of the parsers; an
apply either renders the right images or raises a DmuserdError and leaves
no file behind."""

from __future__ import annotations

import os
import struct
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ota_vectors import DELTA, FULL, HASHES, OLD, synthetic_payload

from dmuserd.errors import DmuserdError
from dmuserd.snapshot import _payload_proto as proto
from dmuserd.snapshot._payload_data import DataError, bspatch, decompress
from dmuserd.snapshot.ota import apply_payload
from dmuserd.snapshot.payload import (
    DATA_OPS,
    HEADER_SIZE,
    SOURCE_OPS,
    OpType,
    PayloadFormatError,
    parse_header,
    parse_manifest,
)

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=150)


def _manifest_of(path) -> tuple[bytes, int]:
    raw = open(path, "rb").read()
    size = struct.unpack(">Q", raw[12:20])[0]
    return raw[HEADER_SIZE : HEADER_SIZE + size], len(raw) - HEADER_SIZE - size


def _synthetic() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_payload(os.path.join(tmp, "p.bin"))
        return open(os.path.join(tmp, "p.bin"), "rb").read()


_SYNTHETIC = _synthetic()
MANIFESTS = [_manifest_of(DELTA), _manifest_of(FULL)]
with tempfile.NamedTemporaryFile() as _f:
    _f.write(_SYNTHETIC)
    _f.flush()
    MANIFESTS.append(_manifest_of(_f.name))


def check_invariants(manifest, data_size: int) -> None:
    """What a manifest that parsed guarantees to the converter."""
    bs = manifest.block_size
    assert bs >= 512 and bs & (bs - 1) == 0
    names = [p.partition_name for p in manifest.partitions]
    assert len(set(names)) == len(names) and all(n and "/" not in n for n in names)
    for part in manifest.partitions:
        new_blocks = -(-part.new_partition_info.size // bs)
        old_blocks = -(-part.old_partition_info.size // bs)
        assert len(part.new_partition_info.hash) == 32
        written: set[int] = set()
        for op in part.operations:
            op_type = OpType(op.type)
            if op_type in DATA_OPS:
                assert 0 < op.data_length and op.data_offset + op.data_length <= data_size
            for e in op.dst_extents:
                assert 0 < e.num_blocks and e.start_block + e.num_blocks <= new_blocks
                blocks = set(range(e.start_block, e.start_block + e.num_blocks))
                assert not blocks & written
                written |= blocks
            if op_type in SOURCE_OPS:
                assert op.src_extents and part.HasField("old_partition_info")
                assert all(e.start_block + e.num_blocks <= old_blocks for e in op.src_extents)


@FUZZ
@given(st.binary(max_size=64), st.integers(0, 1 << 40))
def test_header_parser(data, file_size):
    try:
        header = parse_header(data, file_size=file_size)
    except PayloadFormatError as exc:
        assert exc.where == "header" and exc.rule
        return
    assert data[:4] == b"CrAU" and header.major == 2
    assert header.data_offset <= file_size


@FUZZ
@given(st.binary(max_size=1500), st.integers(0, 1 << 20))
def test_manifest_parser_on_arbitrary_bytes(raw, data_size):
    try:
        manifest = parse_manifest(raw, data_size=data_size)
    except PayloadFormatError:
        return
    check_invariants(manifest, data_size)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("varint"), st.integers(0, 1 << 16), st.integers(0x80, 0xFF)),
)


def mutate(raw: bytes, mutations) -> bytes:
    out = bytearray(raw)
    for kind, pos, value in mutations:
        if not out:
            break
        pos %= len(out)
        if kind == "flip":
            out[pos] ^= value
        elif kind == "cut":
            del out[pos:]
        elif kind == "insert":
            out.insert(pos, value)
        else:  # a varint byte that never ends: protobuf's favourite trap
            out[pos : pos + 4] = bytes([value]) * 4
    return bytes(out)


@FUZZ
@given(st.sampled_from(range(len(MANIFESTS))), st.lists(mutation, min_size=1, max_size=4))
def test_manifest_parser_on_mutated_manifests(which, mutations):
    raw, data_size = MANIFESTS[which]
    try:
        manifest = parse_manifest(mutate(raw, mutations), data_size=data_size)
    except PayloadFormatError:
        return
    check_invariants(manifest, data_size)


extent = st.tuples(st.integers(0, 40), st.integers(0, 12))


@st.composite
def manifests(draw):
    m = proto.DeltaArchiveManifest(block_size=draw(st.sampled_from([4096, 512, 4095, 0, 65536])))
    for _ in range(draw(st.integers(0, 3))):
        part = m.partitions.add(partition_name=draw(st.sampled_from(["system", "vendor", "a/b", "", ".x"])))
        if draw(st.booleans()):
            part.new_partition_info.size = draw(st.integers(0, 48 * 4096))
            part.new_partition_info.hash = bytes(draw(st.sampled_from([32, 32, 31])))
        if draw(st.booleans()):
            part.old_partition_info.size = draw(st.integers(0, 48 * 4096))
        for _ in range(draw(st.integers(0, 6))):
            op = part.operations.add()
            if draw(st.integers(0, 9)):
                op.type = draw(st.integers(0, 15))
            if draw(st.booleans()):
                op.data_offset = draw(st.integers(0, 5000))
                op.data_length = draw(st.integers(0, 5000))
            for s, n in draw(st.lists(extent, max_size=3)):
                op.dst_extents.add(start_block=s, num_blocks=n)
            for s, n in draw(st.lists(extent, max_size=3)):
                op.src_extents.add(start_block=s, num_blocks=n)
        for _ in range(draw(st.integers(0, 3))):
            merge = part.merge_operations.add(type=draw(st.integers(0, 4)))
            merge.src_extent.start_block, merge.src_extent.num_blocks = draw(extent)
            merge.dst_extent.start_block, merge.dst_extent.num_blocks = draw(extent)
            merge.src_offset = draw(st.sampled_from([0, 0, 100, 5000]))
    return m


@FUZZ
@given(manifests(), st.integers(0, 10000))
def test_manifest_parser_on_random_manifests(manifest, data_size):
    try:
        parsed = parse_manifest(manifest.SerializeToString(), data_size=data_size)
    except PayloadFormatError as exc:
        assert exc.where and exc.rule and exc.detail
        return
    check_invariants(parsed, data_size)


@FUZZ
@given(st.sampled_from([b"BSDIFF40", b"BSDF2\x00\x00\x00", b"BSDF2\x01\x02\x00", b"BSDF2\x02\x02\x02",
                        b"BSDF2\x03\x00\x00", b"XXXXXXXX"]),
       st.binary(max_size=200), st.binary(max_size=64), st.integers(0, 8192))
def test_bspatch_on_garbage(magic, rest, source, size):
    try:
        out = bspatch(magic + rest, source, size)
    except DataError:
        return
    assert len(out) == size


@FUZZ
@given(st.sampled_from([1, 2, "xz"]), st.binary(max_size=300), st.integers(0, 4096))
def test_bounded_decompression(kind, data, limit):
    try:
        out = decompress(kind, data, limit, "fuzz")
    except DataError:
        return
    assert len(out) <= limit


_RAW = {"full": FULL.read_bytes(), "delta": DELTA.read_bytes()}


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=40)
@given(st.sampled_from(["full", "delta"]), st.lists(mutation, min_size=1, max_size=3))
def test_mutated_payloads_apply_right_or_fail_cleanly(kind, mutations):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.bin")
        with open(path, "wb") as f:
            f.write(mutate(_RAW[kind], mutations))
        src = os.path.join(tmp, "old")
        os.mkdir(src)
        for name, image in OLD.items():
            os.symlink(image, os.path.join(src, f"{name}.img"))
        out = os.path.join(tmp, "out")
        try:
            results = apply_payload(path, cow_dir=out, source_dir=src)
        except DmuserdError:
            # partitions finished before the failure stay; nothing half-written does
            assert all(not name.startswith(".") for name in (os.listdir(out) if os.path.exists(out) else []))
            return
        # a harmless mutation (unused bytes, a field we do not read): the right images
        for r in results:
            assert r.sha256 == HASHES.get(r.name, r.sha256)
