"""Read an Android OTA ``payload.bin`` (update_engine, major version 2).

Layout (``../shared/specs/ota-payload.md``): a 24-byte big-endian header
(magic ``CrAU``, u64 major version, u64 manifest size, u32 metadata
signature size), the protobuf manifest (``DeltaArchiveManifest``), the
metadata signature, then the data blobs; an operation's ``data_offset``
counts from the end of the metadata signature.

:class:`Payload` parses and checks everything up front, before any
conversion starts: the header against the file size, the manifest, every
operation's blob range, extents against the partition sizes, operations
writing a block twice, and the merge operations. What it finds is a
:class:`PayloadFormatError` naming the payload, the place (header, manifest,
``partition 'kernel' operation #3``) and the rule broken. Blob and source
hashes are checked when the bytes are read (:meth:`Payload.read_blob`,
:meth:`Payload.check_source`): :class:`PayloadHashError`.

Unsupported operation types (the obsolete MOVE/BSDIFF) parse fine, so
``dmuserd ota inspect`` shows them; converting them raises
:class:`UnsupportedOperationError`.

:func:`parse_header` and :func:`parse_manifest` work on bytes, so they can
be fuzzed without files.
"""

from __future__ import annotations

import enum
import hashlib
import os
import struct
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from dmuserd.errors import DmuserdError
from dmuserd.snapshot import _payload_proto as proto

MAGIC = b"CrAU"
HEADER = struct.Struct(">4sQQI")
HEADER_SIZE = HEADER.size  # 24
SUPPORTED_MAJOR = 2
SHA256_SIZE = 32
#: bounds checked before anything is read, so a hostile header cannot make us allocate much
MAX_MANIFEST_SIZE = 256 << 20
MAX_METADATA_SIGNATURE_SIZE = 1 << 20


class OpType(enum.IntEnum):
    """``InstallOperation.Type``."""

    REPLACE = 0
    REPLACE_BZ = 1
    MOVE = 2
    BSDIFF = 3
    SOURCE_COPY = 4
    SOURCE_BSDIFF = 5
    ZERO = 6
    DISCARD = 7
    REPLACE_XZ = 8
    PUFFDIFF = 9
    BROTLI_BSDIFF = 10
    ZUCCHINI = 11
    LZ4DIFF_BSDIFF = 12
    LZ4DIFF_PUFFDIFF = 13


class MergeOpType(enum.IntEnum):
    """``CowMergeOperation.Type``."""

    COW_COPY = 0
    COW_XOR = 1
    COW_REPLACE = 2


#: operation types that carry a data blob / that read source extents
DATA_OPS = frozenset({OpType.REPLACE, OpType.REPLACE_BZ, OpType.REPLACE_XZ, OpType.BSDIFF, OpType.SOURCE_BSDIFF,
                      OpType.PUFFDIFF, OpType.BROTLI_BSDIFF, OpType.ZUCCHINI, OpType.LZ4DIFF_BSDIFF,
                      OpType.LZ4DIFF_PUFFDIFF})
SOURCE_OPS = frozenset({OpType.MOVE, OpType.BSDIFF, OpType.SOURCE_COPY, OpType.SOURCE_BSDIFF, OpType.PUFFDIFF,
                        OpType.BROTLI_BSDIFF, OpType.ZUCCHINI, OpType.LZ4DIFF_BSDIFF, OpType.LZ4DIFF_PUFFDIFF})
#: what dmuserd can turn into COW ops
SUPPORTED_OPS = frozenset({OpType.REPLACE, OpType.REPLACE_BZ, OpType.REPLACE_XZ, OpType.ZERO, OpType.DISCARD,
                           OpType.SOURCE_COPY, OpType.SOURCE_BSDIFF, OpType.BROTLI_BSDIFF, OpType.PUFFDIFF,
                           OpType.ZUCCHINI, OpType.LZ4DIFF_BSDIFF, OpType.LZ4DIFF_PUFFDIFF})


# --- errors -------------------------------------------------------------------


class PayloadError(DmuserdError):
    """Anything wrong with an OTA payload or with how it is applied."""


class PayloadFormatError(PayloadError):
    """The payload's header, manifest or blob offsets are inconsistent.

    ``where`` names the place (``header``, ``manifest``, ``partition 'kernel'
    operation #3``), ``rule`` is a short stable name of the broken rule
    (``magic``, ``blob-range``, ...), ``detail`` the specifics.
    """

    def __init__(self, where: str, rule: str, detail: str, *, path=None) -> None:
        self.where = where
        self.rule = rule
        self.detail = detail
        self.path = None if path is None else str(path)
        super().__init__(self._message())

    def _message(self) -> str:
        name = f"payload {self.path}" if self.path else "payload"
        return (f"{name}, {self.where}: {self.detail} (rule {self.rule}); the payload is corrupt, truncated "
                "or not an Android OTA payload.bin: fetch it again")

    def with_path(self, path) -> "PayloadFormatError":
        if self.path is None:
            self.path = str(path)
            self.args = (self._message(),)
        return self


class PayloadHashError(PayloadError):
    """A blob, a source range or a result does not have the SHA-256 the manifest says."""


class UnsupportedOperationError(PayloadError):
    """An install operation type dmuserd cannot apply."""


# --- parsing --------------------------------------------------------------------


@dataclass(frozen=True)
class PayloadHeader:
    major: int
    manifest_size: int
    metadata_signature_size: int

    @property
    def data_offset(self) -> int:
        """File offset of the first data blob (``data_offset`` 0)."""
        return HEADER_SIZE + self.manifest_size + self.metadata_signature_size


def parse_header(data: bytes, *, file_size: int | None = None) -> PayloadHeader:
    """The 24-byte header, checked (against ``file_size`` when given)."""
    if len(data) < HEADER_SIZE:
        raise PayloadFormatError("header", "truncated", f"{len(data)} bytes, the header alone is {HEADER_SIZE}")
    magic, major, manifest_size, sig_size = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PayloadFormatError("header", "magic", f"magic {magic!r}, expected {MAGIC!r}")
    if major != SUPPORTED_MAJOR:
        raise PayloadFormatError(
            "header", "major-version", f"major version {major}; dmuserd reads version {SUPPORTED_MAJOR} payloads"
        )
    if not 0 < manifest_size <= MAX_MANIFEST_SIZE:
        raise PayloadFormatError("header", "manifest-size",
                                 f"manifest size {manifest_size} is not between 1 and {MAX_MANIFEST_SIZE}")
    if sig_size > MAX_METADATA_SIGNATURE_SIZE:
        raise PayloadFormatError("header", "signature-size",
                                 f"metadata signature size {sig_size} is over {MAX_METADATA_SIGNATURE_SIZE}")
    header = PayloadHeader(major, manifest_size, sig_size)
    if file_size is not None and header.data_offset > file_size:
        raise PayloadFormatError(
            "header", "truncated",
            f"manifest ({manifest_size} bytes) and metadata signature ({sig_size} bytes) end at "
            f"{header.data_offset}, past the end of the {file_size}-byte file",
        )
    return header


def op_where(partition: str, index: int) -> str:
    return f"partition {partition!r} operation #{index}"


def _extent_blocks(extents) -> int:
    return sum(e.num_blocks for e in extents)


def _check_extents(extents, limit: int, where: str, what: str, limit_name: str) -> None:
    for k, e in enumerate(extents):
        if not e.HasField("start_block") or not e.HasField("num_blocks") or e.num_blocks == 0:
            raise PayloadFormatError(where, "extent", f"{what} #{k} needs a start_block and a num_blocks above 0")
        if e.start_block + e.num_blocks > limit:
            raise PayloadFormatError(
                where, "extent-range",
                f"{what} #{k} (blocks {e.start_block}..{e.start_block + e.num_blocks - 1}) is outside the "
                f"{limit}-block {limit_name}",
            )


def _blocks(size: int, bs: int) -> int:
    return -(-size // bs)


def parse_manifest(raw: bytes, *, data_size: int):
    """The manifest (a ``DeltaArchiveManifest`` message), checked.

    ``data_size`` is the size of the blob area (file size minus the data
    offset): every blob, and the payload signature, must lie inside it.
    """
    manifest = proto.DeltaArchiveManifest()
    try:
        manifest.ParseFromString(raw)
    except (DecodeError, RecursionError) as exc:
        raise PayloadFormatError("manifest", "protobuf", f"not a valid DeltaArchiveManifest ({exc})") from None
    bs = manifest.block_size
    if bs < 512 or bs > 32768 or bs & (bs - 1):
        raise PayloadFormatError("manifest", "block-size", f"block size {bs} is not a power of two from 512 to 32768")
    if manifest.HasField("signatures_offset") or manifest.HasField("signatures_size"):
        end = manifest.signatures_offset + manifest.signatures_size
        if end > data_size:
            raise PayloadFormatError(
                "manifest", "blob-range",
                f"the payload signature ({manifest.signatures_size} bytes at data offset "
                f"{manifest.signatures_offset}) ends past the {data_size}-byte data area",
            )
    if manifest.HasField("dynamic_partition_metadata"):
        # proto2 string fields with invalid UTF-8 come back as bytes
        if not isinstance(manifest.dynamic_partition_metadata.vabc_compression_param, str):
            raise PayloadFormatError("manifest", "utf-8", "vabc_compression_param is not valid UTF-8")
    names: set[str] = set()
    for p, part in enumerate(manifest.partitions):
        name = part.partition_name
        if not isinstance(name, str):
            raise PayloadFormatError(f"partition #{p}", "partition-name", f"partition name {name!r} is not UTF-8")
        if not name or "/" in name or "," in name or name.startswith(".") or not name.isprintable():
            raise PayloadFormatError(f"partition #{p}", "partition-name",
                                     f"partition name {name!r} is empty or not a plain file name")
        if name in names:
            raise PayloadFormatError(f"partition {name!r}", "partition-name", "two partitions have this name")
        names.add(name)
        _check_partition(part, bs, data_size)
    return manifest


def _check_info(info, where: str, what: str, *, need: bool) -> None:
    if not info.HasField("size") and need:
        raise PayloadFormatError(where, "partition-info", f"{what} has no size")
    if info.HasField("hash") and len(info.hash) != SHA256_SIZE:
        raise PayloadFormatError(where, "partition-info", f"{what}.hash is {len(info.hash)} bytes, not a SHA-256")


def _check_partition(part, bs: int, data_size: int) -> None:
    name = part.partition_name
    where = f"partition {name!r}"
    if not part.HasField("new_partition_info"):
        raise PayloadFormatError(where, "partition-info", "no new_partition_info (the new size and hash)")
    _check_info(part.new_partition_info, where, "new_partition_info", need=True)
    if not part.new_partition_info.HasField("hash"):
        raise PayloadFormatError(where, "partition-info", "new_partition_info has no hash")
    has_old = part.HasField("old_partition_info")
    if has_old:
        _check_info(part.old_partition_info, where, "old_partition_info", need=True)
    new_blocks = _blocks(part.new_partition_info.size, bs)
    old_blocks = _blocks(part.old_partition_info.size, bs) if has_old else 0
    written = []  # (start, end, op index): no block written twice
    for i, op in enumerate(part.operations):
        ow = op_where(name, i)
        if not op.HasField("type"):
            raise PayloadFormatError(ow, "op-type", "the operation has no type")
        try:
            op_type = OpType(op.type)
        except ValueError:
            raise PayloadFormatError(ow, "op-type", f"unknown operation type {op.type}") from None
        if op_type in DATA_OPS:
            if not op.HasField("data_offset") or not op.data_length:
                raise PayloadFormatError(ow, "blob-range", f"{op_type.name} needs a data_offset and a data_length")
            if op.data_offset + op.data_length > data_size:
                raise PayloadFormatError(
                    ow, "blob-range",
                    f"its blob ({op.data_length} bytes at data offset {op.data_offset}) ends past the "
                    f"{data_size}-byte data area",
                )
        elif op.data_length or op.HasField("data_offset"):
            raise PayloadFormatError(ow, "blob-range", f"{op_type.name} carries no data, yet has a data blob")
        if op.HasField("data_sha256_hash") and len(op.data_sha256_hash) != SHA256_SIZE:
            raise PayloadFormatError(ow, "hash", "data_sha256_hash is not a SHA-256 (32 bytes)")
        if op.HasField("src_sha256_hash") and len(op.src_sha256_hash) != SHA256_SIZE:
            raise PayloadFormatError(ow, "hash", "src_sha256_hash is not a SHA-256 (32 bytes)")
        if not op.dst_extents:
            raise PayloadFormatError(ow, "extent", "the operation has no dst_extents")
        _check_extents(op.dst_extents, new_blocks, ow, "dst extent", "new partition")
        dst_bytes = _extent_blocks(op.dst_extents) * bs
        if op.HasField("dst_length") and op.dst_length > dst_bytes:
            raise PayloadFormatError(ow, "length", f"dst_length {op.dst_length} exceeds its {dst_bytes}-byte extents")
        if op_type in SOURCE_OPS:
            if not has_old:
                raise PayloadFormatError(ow, "extent",
                                         f"{op_type.name} reads the old partition, which has no old_partition_info")
            if not op.src_extents:
                raise PayloadFormatError(ow, "extent", f"{op_type.name} has no src_extents")
            _check_extents(op.src_extents, old_blocks, ow, "src extent", "old partition")
            src_bytes = _extent_blocks(op.src_extents) * bs
            if op.HasField("src_length") and op.src_length > src_bytes:
                raise PayloadFormatError(ow, "length",
                                         f"src_length {op.src_length} exceeds its {src_bytes}-byte extents")
            if op_type == OpType.SOURCE_COPY and src_bytes != dst_bytes:
                raise PayloadFormatError(ow, "extent",
                                         f"SOURCE_COPY of {src_bytes // bs} source blocks to {dst_bytes // bs} blocks")
        elif op.src_extents:
            raise PayloadFormatError(ow, "extent", f"{op_type.name} reads no source, yet has src_extents")
        written.extend((e.start_block, e.start_block + e.num_blocks, i) for e in op.dst_extents)
    written.sort()
    for (_s1, e1, i1), (s2, _e2, i2) in zip(written, written[1:]):
        if s2 < e1:
            first, second = sorted((i1, i2))
            raise PayloadFormatError(op_where(name, second), "block-written-twice",
                                     f"writes block {s2}, which operation #{first} writes too")
    for m, merge in enumerate(part.merge_operations):
        mw = f"partition {name!r} merge operation #{m}"
        try:
            mtype = MergeOpType(merge.type)
        except ValueError:
            raise PayloadFormatError(mw, "merge-op", f"unknown merge operation type {merge.type}") from None
        if not merge.HasField("src_extent") or not merge.HasField("dst_extent"):
            raise PayloadFormatError(mw, "merge-op", "needs a src_extent and a dst_extent")
        _check_extents([merge.dst_extent], new_blocks, mw, "dst extent", "new partition")
        if mtype != MergeOpType.COW_REPLACE:
            if not has_old:
                raise PayloadFormatError(mw, "merge-op", f"{mtype.name} reads an old partition the payload lacks")
            _check_extents([merge.src_extent], old_blocks, mw, "src extent", "old partition")
        if merge.src_offset >= bs or (merge.src_offset and mtype != MergeOpType.COW_XOR):
            raise PayloadFormatError(mw, "merge-op",
                                     f"src_offset {merge.src_offset}: only COW_XOR has one, below the block size")
        if mtype != MergeOpType.COW_REPLACE and merge.src_extent.num_blocks != merge.dst_extent.num_blocks:
            raise PayloadFormatError(mw, "merge-op", f"{merge.src_extent.num_blocks} source blocks for "
                                     f"{merge.dst_extent.num_blocks} destination blocks")


# --- the payload file -------------------------------------------------------------


class Payload:
    """An open, checked ``payload.bin``. Use as a context manager.

    Attributes: ``path``, ``header`` (:class:`PayloadHeader`), ``manifest``
    (the protobuf message), ``manifest_raw`` (its bytes, which identify the
    payload), ``block_size``, ``data_size`` (bytes of the blob area),
    ``partitions`` (name → ``PartitionUpdate``, in manifest order).
    """

    def __init__(self, path) -> None:
        from dmuserd.snapshot._ota_zip import locate_payload

        self.path = os.fspath(path)
        #: where the payload's bytes are: the whole file, or the payload.bin entry of an OTA zip
        self.location = locate_payload(self.path)
        try:
            size = self.location.size
            self.header = parse_header(self.read(0, HEADER_SIZE), file_size=size)
            self.manifest_raw = self.read(HEADER_SIZE, self.header.manifest_size)
            self.data_size = size - self.header.data_offset
            self.manifest = parse_manifest(self.manifest_raw, data_size=self.data_size)
        except PayloadFormatError as exc:
            self.location.close()
            raise exc.with_path(self.path) from None
        except BaseException:
            self.location.close()
            raise
        self.block_size = self.manifest.block_size
        self.partitions = {p.partition_name: p for p in self.manifest.partitions}

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the payload (fewer at its end)."""
        return self.location.read(offset, length)

    @property
    def metadata_size(self) -> int:
        """Header and manifest: what the metadata signature and METADATA_HASH cover."""
        return HEADER_SIZE + self.header.manifest_size

    @property
    def is_full(self) -> bool:
        """True when no partition reads an old image (a full OTA)."""
        return not any(p.HasField("old_partition_info") for p in self.manifest.partitions)

    def partition(self, name: str):
        try:
            return self.partitions[name]
        except KeyError:
            raise PayloadError(
                f"payload {self.path} has no partition {name!r} (it has {', '.join(self.partitions) or 'none'})"
            ) from None

    def read_blob(self, partition: str, index: int, op) -> bytes:
        """The data blob of operation ``index``, its SHA-256 checked when the manifest has one."""
        data = self.read(self.header.data_offset + op.data_offset, op.data_length)
        if len(data) != op.data_length:
            raise PayloadFormatError(op_where(partition, index), "blob-range", "the blob is cut short by the file end",
                                     path=self.path)
        if op.HasField("data_sha256_hash"):
            got = hashlib.sha256(data).digest()
            if got != op.data_sha256_hash:
                raise PayloadHashError(
                    f"payload {self.path}, {op_where(partition, index)}: the data blob ({op.data_length} bytes at "
                    f"data offset {op.data_offset}) has SHA-256 {got.hex()}, the manifest says "
                    f"{op.data_sha256_hash.hex()}; the payload is corrupt: fetch it again"
                )
        return data

    def check_source(self, partition: str, index: int, op, data: bytes, source_path) -> None:
        """Check the concatenated source extents ``data`` of an operation against ``src_sha256_hash``."""
        if not op.HasField("src_sha256_hash"):
            return
        got = hashlib.sha256(data).digest()
        if got != op.src_sha256_hash:
            extents = ", ".join(f"{e.start_block}+{e.num_blocks}" for e in op.src_extents)
            raise PayloadHashError(
                f"payload {self.path}, {op_where(partition, index)}: source blocks {extents} of {source_path} have "
                f"SHA-256 {got.hex()}, the manifest says {op.src_sha256_hash.hex()}; this is not the old "
                f"{partition!r} image the payload was made for: pass the right --source-dir"
            )

    def close(self) -> None:
        if getattr(self, "location", None) is not None:
            self.location.close()
            self.location = None

    def __enter__(self) -> "Payload":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def describe(payload: Payload) -> dict:
    """What ``dmuserd ota inspect`` shows: header, settings, per-partition sizes and counts."""
    m = payload.manifest
    dpm = m.dynamic_partition_metadata if m.HasField("dynamic_partition_metadata") else None
    info = {
        "path": payload.path,
        "major_version": payload.header.major,
        "minor_version": m.minor_version,
        "kind": "full" if payload.is_full else "delta",
        "block_size": m.block_size,
        "manifest_size": payload.header.manifest_size,
        "metadata_signature_size": payload.header.metadata_signature_size,
        "data_size": payload.data_size,
        "signatures": {"offset": m.signatures_offset, "size": m.signatures_size}
        if m.HasField("signatures_size") else None,
        "partial_update": m.partial_update,
        "vabc": None if dpm is None else {
            "enabled": dpm.vabc_enabled,
            "compression": dpm.vabc_compression_param or None,
            "cow_version": dpm.cow_version or None,
            "compression_factor": dpm.compression_factor or None,
        },
        "package": None if payload.location.package is None else {
            "path": payload.location.package.path,
            "payload_offset": payload.location.offset,
            "payload_size": payload.location.size,
            "properties": dict(payload.location.package.properties),
            "metadata": dict(payload.location.package.metadata),
        },
        "partitions": [],
    }
    for part in m.partitions:
        ops: dict[str, int] = {}
        for op in part.operations:
            key = OpType(op.type).name
            ops[key] = ops.get(key, 0) + 1
        merges: dict[str, int] = {}
        for merge in part.merge_operations:
            key = MergeOpType(merge.type).name
            merges[key] = merges.get(key, 0) + 1
        old = part.old_partition_info if part.HasField("old_partition_info") else None
        info["partitions"].append({
            "name": part.partition_name,
            "old_size": None if old is None else old.size,
            "old_sha256": None if old is None or not old.hash else old.hash.hex(),
            "new_size": part.new_partition_info.size,
            "new_sha256": part.new_partition_info.hash.hex(),
            "operations": len(part.operations),
            "operation_types": ops,
            "merge_operations": merges,
            "verity": None if not part.HasField("hash_tree_extent") and not part.HasField("fec_extent") else {
                "hash_tree_algorithm": part.hash_tree_algorithm or None,
                "hash_tree_blocks": part.hash_tree_extent.num_blocks if part.HasField("hash_tree_extent") else 0,
                "fec_roots": part.fec_roots if part.HasField("fec_extent") else None,
                "fec_blocks": part.fec_extent.num_blocks if part.HasField("fec_extent") else 0,
            },
            "data_bytes": sum(op.data_length for op in part.operations),
            "unsupported": sorted({OpType(op.type).name for op in part.operations
                                   if OpType(op.type) not in SUPPORTED_OPS}),
        })
    return info
