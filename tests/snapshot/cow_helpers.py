"""Helpers for the snapshot tests: raw COW builders (to craft files the
writer would refuse), image generators, and a reference in-place merge."""

from __future__ import annotations

import os
import struct

from dmuserd.snapshot._cow_format import (
    FOOTER_OP,
    HEADER_SIZE_V2,
    HEADER_SIZE_V3,
    OP_SIZE_V3,
    CowHeader,
    OpType,
    pack_op_v2,
    pack_op_v3,
)
from dmuserd.snapshot.cow import CowReader, xor_bytes

BS = 4096
AOSP_COW = "/work/shared/testdata/aosp/cow_v2"
AOSP_SHA256 = "afd7288855d0d9afd55e87910cc1886d7e73b97876cc4d15b85303d8027c8e2f"
AOSP_DATA = b"This is some data, believe it".ljust(BS, b"\0")


def pattern_block(i: int, bs: int = BS) -> bytes:
    """A block no other index produces (so Copy sources are identifiable)."""
    return struct.pack("<Q", (i * 2654435761 + 1) & (2**64 - 1)) * (bs // 8)


def build_v2(path, ops, *, block_size=BS, buffer_size=0, footer=True, num_merge_ops=0, footer_num_ops=None):
    """A v2 file without clusters: each op followed by its data.

    ``ops``: tuples (type, new_block, source, data=b"", compression=0).
    Replace/Sequence sources of None are set to their data position.
    Returns the file offsets of the op records.
    """
    header = CowHeader(major=2, header_size=HEADER_SIZE_V2, block_size=block_size, cluster_ops=0,
                       buffer_size=buffer_size, num_merge_ops=num_merge_ops)
    out = bytearray(header.pack() + bytes(buffer_size))
    offsets = []
    for op in ops:
        op_type, new_block, source, data, comp = tuple(op) + (b"", 0)[len(op) - 3 :]
        data = data or b""
        if source is None:
            source = len(out) + 20
        offsets.append(len(out))
        out += pack_op_v2(op_type, comp, len(data), new_block, source) + data
    if footer:
        n = len(ops) if footer_num_ops is None else footer_num_ops
        out += FOOTER_OP.pack(OpType.FOOTER, 0, 64, n * 20, n) + bytes(64)
    with open(path, "wb") as f:
        f.write(out)
    return offsets


def build_v3(path, ops, *, block_size=BS, compression=0, sequence=(), op_count_max=None, op_count=None,
             resume_points=(), buffer_size=0):
    """A v3 file. ``ops``: tuples (type, new_block, source, data=b"", factor=0);
    Replace sources of None are set to their data position. Returns the op
    record offsets."""
    ops = [tuple(op) + (b"", 0)[len(op) - 3 :] for op in ops]
    count_max = len(ops) if op_count_max is None else op_count_max
    header = CowHeader(major=3, header_size=HEADER_SIZE_V3, footer_size=0, op_size=OP_SIZE_V3,
                       block_size=block_size, buffer_size=buffer_size, sequence_data_count=len(sequence),
                       resume_point_count=len(resume_points), resume_point_max=4,
                       op_count=len(ops) if op_count is None else op_count, op_count_max=count_max,
                       compression_algorithm=compression, max_compression_size=block_size)
    seq = b"".join(struct.pack("<I", b) for b in sequence)
    resume = b"".join(struct.pack("<QQ", *p) for p in resume_points).ljust(64, b"\0")
    op_start = HEADER_SIZE_V3 + buffer_size + len(seq) + 64
    data_pos = op_start + 16 * count_max
    records, data_blob, offsets = [], bytearray(), []
    for i, (op_type, new_block, source, data, factor) in enumerate(ops):
        data = data or b""
        if source is None:
            source = data_pos + len(data_blob)
        offsets.append(op_start + 16 * i)
        records.append(pack_op_v3(op_type, len(data), new_block, source, factor))
        data_blob += data
    ops_area = b"".join(records).ljust(16 * count_max, b"\0")
    with open(path, "wb") as f:
        f.write(header.pack() + bytes(buffer_size) + seq + resume + ops_area + data_blob)
    return offsets


def make_images(rng, nblocks: int, changes: int, bs: int = BS) -> tuple[bytes, bytes]:
    """A base image and a target derived from it with every kind of change."""
    base = bytearray(b"".join(pattern_block(rng.randrange(1 << 40), bs) for _ in range(nblocks)))
    for b in rng.sample(range(nblocks), nblocks // 8):
        base[b * bs : (b + 1) * bs] = bytes(bs)
    target = bytearray(base)
    for _ in range(changes):
        b = rng.randrange(nblocks)
        kind = rng.randrange(6)
        if kind == 0:  # moved block
            s = rng.randrange(nblocks)
            target[b * bs : (b + 1) * bs] = base[s * bs : (s + 1) * bs]
        elif kind == 1:
            target[b * bs : (b + 1) * bs] = bytes(bs)
        elif kind == 2:  # a few bytes differ
            i = rng.randrange(bs - 16)
            target[b * bs + i : b * bs + i + 16] = rng.randbytes(16)
        elif kind == 3:
            target[b * bs : (b + 1) * bs] = rng.randbytes(bs)
        elif kind == 4:  # compressible new data
            target[b * bs : (b + 1) * bs] = bytes([rng.randrange(4)]) * bs
        else:  # swap two blocks: a copy cycle
            s = rng.randrange(nblocks)
            target[b * bs : (b + 1) * bs], target[s * bs : (s + 1) * bs] = (
                base[s * bs : (s + 1) * bs], base[b * bs : (b + 1) * bs])
    return bytes(base), bytes(target)


def merge_in_place(base: bytes, cow_path, size: int | None = None) -> bytes:
    """Apply a COW file to ``base`` the way snapuserd's merge does: op by op,
    in merge order, overwriting the base as it goes. Equals the target only
    if the merge order is safe."""
    disk = bytearray(base)
    if size is not None and size > len(disk):
        disk += bytes(size - len(disk))
    with CowReader(cow_path) as reader:
        bs = reader.block_size
        for op in reader.merge_order():
            start = op.new_block * bs
            if op.type == OpType.COPY:
                new = bytes(disk[op.source * bs : (op.source + 1) * bs])
            elif op.type == OpType.ZERO:
                new = bytes(bs)
            elif op.type == OpType.REPLACE:
                new = reader.read_data(op)
            else:
                new = xor_bytes(reader.read_data(op), bytes(disk[op.source : op.source + bs]))
            disk[start : start + len(new)] = new
    return bytes(disk[: len(base) if size is None else size])


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)
