"""Helpers for the OTA payload tests: the AOSP test vectors laid out as
``--source-dir`` expects, and a builder of small synthetic payloads (to
reach what the vectors lack: merge operations, COW_XOR, SOURCE_BSDIFF,
unsupported types).

A uniquely named module (not conftest) so test files import it directly."""

from __future__ import annotations

import bz2
import hashlib
import lzma
import struct
from pathlib import Path

import brotli
import bsdiff4
import bsdiff4.core

from dmuserd.snapshot import _payload_proto as proto
from dmuserd.snapshot.payload import MergeOpType, OpType

VECTORS = Path("/work/shared/testdata/aosp-ota")
DELTA = VECTORS / "delta_payload.bin"
FULL = VECTORS / "full_payload.bin"
OLD = {"kernel": VECTORS / "disk_ext2_4k_empty.img", "root": VECTORS / "disk_sqfs_empty.img"}
NEW = {"kernel": VECTORS / "disk_ext2_4k.img", "root": VECTORS / "disk_sqfs_default.img"}
#: new_partition_info.hash of both payloads (also the SHA-256 of the NEW images)
HASHES = {
    "kernel": "c51d9edeaf1043efe41257caebc1336ac21e411abb6ed4183324be6e841c448c",
    "root": "5610597d03d3e29f01d722bd743296ef68d076f623c1dca2eb135347c6b8efba",
}
BS = 4096


def source_dir(tmp_path: Path) -> Path:
    """``tmp_path/old`` with ``kernel.img`` and ``root.img`` (copies of the old vector images)."""
    d = tmp_path / "old"
    d.mkdir(exist_ok=True)
    for name, path in OLD.items():
        (d / f"{name}.img").write_bytes(path.read_bytes())
    return d


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ext(start: int, num: int):
    return proto.Extent(start_block=start, num_blocks=num)


def write_payload(path, manifest, blobs: list[bytes], *, key=None) -> None:
    """A payload.bin: header, ``manifest``, the metadata signature, ``blobs`` in order, the payload signature.

    Signed (as AOSP's payload signer does, PKCS#1 v1.5 over SHA-256) when a
    ``key`` (a ``cryptography`` private key) is given, else unsigned.
    """
    data = b"".join(blobs)
    if key is None:
        raw = manifest.SerializeToString()
        with open(path, "wb") as f:
            f.write(struct.pack(">4sQQI", b"CrAU", 2, len(raw), 0) + raw + data)
        return
    # The signature blobs' size is known before signing: a signature is as long as the key.
    size = len(_signatures(bytes(key.key_size // 8)))
    manifest.signatures_offset, manifest.signatures_size = len(data), size
    raw = manifest.SerializeToString()
    metadata = struct.pack(">4sQQI", b"CrAU", 2, len(raw), size) + raw
    metadata_signature = _signatures(_sign(key, metadata))
    payload_signature = _signatures(_sign(key, metadata + data))
    assert len(metadata_signature) == len(payload_signature) == size
    with open(path, "wb") as f:
        f.write(metadata + metadata_signature + data + payload_signature)


def _signatures(signature: bytes) -> bytes:
    message = proto.Signatures()
    message.signatures.add(data=signature, unpadded_signature_size=len(signature))
    return message.SerializeToString()


def _sign(key, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    return key.sign(hashlib.sha256(data).digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


def signing_key(directory: Path):
    """A fresh RSA-2048 key and ``directory/cert.pem``, its self-signed certificate (as AOSP's testkey)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dmuserd test key")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    path = Path(directory) / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, path


def ota_zip(zip_path, payload_path, *, metadata: dict | None = None, properties: dict | None = None) -> Path:
    """An OTA package as ota_from_target_files lays it out: payload.bin stored, its properties, the metadata.

    ``properties`` overrides what payload_properties.txt says (to make a bad one).
    """
    import base64
    import zipfile

    payload = Path(payload_path).read_bytes()
    manifest_size = struct.unpack_from(">Q", payload, 12)[0]
    metadata_size = 24 + manifest_size
    props = {
        "FILE_HASH": base64.b64encode(hashlib.sha256(payload).digest()).decode(),
        "FILE_SIZE": str(len(payload)),
        "METADATA_HASH": base64.b64encode(hashlib.sha256(payload[:metadata_size]).digest()).decode(),
        "METADATA_SIZE": str(metadata_size),
        **(properties or {}),
    }
    meta = {"ota-type": "AB", "pre-build": "dmuserd/test/old:14/OLD/1:user/release-keys",
            "post-build": "dmuserd/test/new:14/NEW/2:user/release-keys", "pre-device": "test",
            **(metadata or {})}
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("META-INF/com/android/metadata", "".join(f"{k}={v}\n" for k, v in meta.items()),
                   compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("care_map.pb", b"\x00" * 10, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("payload_properties.txt", "".join(f"{k}={v}\n" for k, v in props.items()),
                   compress_type=zipfile.ZIP_STORED)
        z.writestr("payload.bin", payload, compress_type=zipfile.ZIP_STORED)
    return Path(zip_path)


class PartitionBuilder:
    """Operations of one partition, with their blobs laid out in order."""

    def __init__(self, manifest, name: str, old: bytes | None, new: bytes, blobs: list[bytes], *,
                 source_hashes: bool = True) -> None:
        self.part = manifest.partitions.add(partition_name=name)
        self.source_hashes = source_hashes
        self.old, self.new, self.blobs = old, new, blobs
        self.part.new_partition_info.size = len(new)
        self.part.new_partition_info.hash = hashlib.sha256(new).digest()
        if old is not None:
            self.part.old_partition_info.size = len(old)
            if source_hashes:
                self.part.old_partition_info.hash = hashlib.sha256(old).digest()

    def _dst(self, extents) -> bytes:
        return b"".join(self.new[s * BS : (s + n) * BS] for s, n in extents)

    def _src(self, extents) -> bytes:
        return b"".join(self.old[s * BS : (s + n) * BS] for s, n in extents)

    def op(self, op_type: OpType, dst, src=(), blob: bytes | None = None):
        op = self.part.operations.add(type=int(op_type))
        op.dst_extents.extend(ext(s, n) for s, n in dst)
        if src:
            op.src_extents.extend(ext(s, n) for s, n in src)
            if self.source_hashes:
                op.src_sha256_hash = hashlib.sha256(self._src(src)).digest()
        if blob is not None:
            op.data_offset = sum(len(b) for b in self.blobs)
            op.data_length = len(blob)
            op.data_sha256_hash = hashlib.sha256(blob).digest()
            self.blobs.append(blob)
        return op

    def replace(self, dst, kind: OpType = OpType.REPLACE):
        data = self._dst(dst)
        blob = {OpType.REPLACE: lambda d: d, OpType.REPLACE_BZ: bz2.compress,
                OpType.REPLACE_XZ: lambda d: lzma.compress(d, format=lzma.FORMAT_XZ)}[kind](data)
        return self.op(kind, dst, blob=blob)

    def bsdiff(self, dst, src, kind: OpType = OpType.SOURCE_BSDIFF):
        source, target = self._src(src), self._dst(dst)
        if kind == OpType.SOURCE_BSDIFF:
            blob = bsdiff4.diff(source, target)
        else:  # BSDF2, brotli streams
            control, diff, extra = bsdiff4.core.diff(source, target)
            c, d, e = (brotli.compress(x) for x in (control, diff, extra))
            blob = (b"BSDF2\x02\x02\x02" + bsdiff4.core.encode_int64(len(c)) + bsdiff4.core.encode_int64(len(d))
                    + bsdiff4.core.encode_int64(len(target)) + c + d + e)
        return self.op(kind, dst, src, blob)

    def merge(self, merge_type: MergeOpType, src: tuple[int, int], dst: tuple[int, int], src_offset: int = 0):
        m = self.part.merge_operations.add(type=int(merge_type), src_extent=ext(*src), dst_extent=ext(*dst))
        if src_offset:
            m.src_offset = src_offset
        return m


def pattern(i: int) -> bytes:
    return struct.pack("<Q", (i * 2654435761 + 12345) & (2**64 - 1)) * (BS // 8)


def synthetic_images() -> tuple[bytes, bytes]:
    """A 16-block old image and the new one the synthetic payload makes of it."""
    old = [pattern(i) for i in range(16)]
    new = list(old)
    new[0] = bytes(range(256)) * 16                       # REPLACE_XZ
    new[1:5] = old[0:4]                                   # SOURCE_COPY shifted up by one (overlapping)
    new[5] = b"bz" * (BS // 2)                            # REPLACE_BZ
    new[6] = new[7] = bytes(BS)                           # ZERO
    new[8], new[10] = old[10], old[8]                     # SOURCE_COPY swap (a cycle)
    new[9] = pattern(1000)                                # REPLACE
    new[11] = bytes(BS)                                   # DISCARD
    b12 = bytearray(old[12]); b12[7:15] = b"changed!"; new[12] = bytes(b12)          # SOURCE_BSDIFF, xor
    src13 = b"".join(old[5:7])[100 : 100 + BS]
    b13 = bytearray(src13); b13[300:310] = b"0123456789"; new[13] = bytes(b13)       # BROTLI_BSDIFF, xor +100
    b15 = bytearray(old[15]); b15[0:4] = b"tail"; new[15] = bytes(b15)               # diff; xor runs off the end
    return b"".join(old), b"".join(new)


def synthetic_payload(path, *, merge_ops: bool = True, extra=None, old_hash: bool = True,
                      src_hashes: bool = True, vabc: dict | None = None, key=None) -> tuple[bytes, bytes]:
    """Write a delta payload with one partition, ``system``, covering every
    supported operation type; with ``merge_ops`` the merge operations a
    VABC generator would add (COW_COPY for the shift, COW_XOR for the
    diffs, one with a src_offset, one running off the partition's end).
    ``extra(builder)`` may add operations; ``old_hash``/``src_hashes`` False
    leave out ``old_partition_info.hash`` / the operations' ``src_sha256_hash``.
    ``vabc`` sets fields of ``dynamic_partition_metadata``.
    Returns (old image, new image)."""
    old, new = synthetic_images()
    manifest = proto.DeltaArchiveManifest(block_size=BS, minor_version=8)
    if vabc:
        manifest.dynamic_partition_metadata.CopyFrom(proto.DynamicPartitionMetadata(**vabc))
    blobs: list[bytes] = []
    b = PartitionBuilder(manifest, "system", old, new, blobs, source_hashes=src_hashes)
    if not old_hash:
        b.part.old_partition_info.ClearField("hash")
    b.replace([(0, 1)], OpType.REPLACE_XZ)
    b.op(OpType.SOURCE_COPY, [(1, 4)], [(0, 4)])
    b.replace([(5, 1)], OpType.REPLACE_BZ)
    b.op(OpType.ZERO, [(6, 2)])
    b.op(OpType.SOURCE_COPY, [(8, 1), (10, 1)], [(10, 1), (8, 1)])
    b.replace([(9, 1)])
    b.op(OpType.DISCARD, [(11, 1)])
    b.bsdiff([(12, 1)], [(12, 1)])
    # the BSDF2 diff makes block 13 from old blocks 5..6 (the xor source starts 100 bytes in)
    b.bsdiff([(13, 1)], [(5, 2)], OpType.BROTLI_BSDIFF)
    b.op(OpType.SOURCE_COPY, [(14, 1)], [(14, 1)])        # onto itself
    b.bsdiff([(15, 1)], [(15, 1)], OpType.BROTLI_BSDIFF)
    if merge_ops:
        b.merge(MergeOpType.COW_COPY, (0, 4), (1, 4))
        b.merge(MergeOpType.COW_COPY, (14, 1), (14, 1))
        b.merge(MergeOpType.COW_XOR, (12, 1), (12, 1))
        b.merge(MergeOpType.COW_XOR, (5, 1), (13, 1), 100)
        b.merge(MergeOpType.COW_XOR, (15, 1), (15, 1), 200)
    if extra is not None:
        extra(b)
    write_payload(path, manifest, blobs, key=key)
    return old, new


def delta_payload(path, parts: dict, *, partial: bool = False, key=None) -> None:
    """A delta payload turning each ``parts[name] = (old, new)`` image into its new one, block by block:
    SOURCE_COPY where a block is unchanged, ZERO where it became zeros, SOURCE_BSDIFF from the same
    old block otherwise (REPLACE past the old image's end). ``partial`` marks it a partial update."""
    manifest = proto.DeltaArchiveManifest(block_size=BS, minor_version=8, partial_update=partial or None)
    blobs: list[bytes] = []
    for name, (old, new) in parts.items():
        b = PartitionBuilder(manifest, name, old, new, blobs)
        for i in range(len(new) // BS):
            block, before = new[i * BS : (i + 1) * BS], old[i * BS : (i + 1) * BS]
            if block == before:
                b.op(OpType.SOURCE_COPY, [(i, 1)], [(i, 1)])
            elif block == bytes(BS):
                b.op(OpType.ZERO, [(i, 1)])
            elif len(before) == BS:
                b.bsdiff([(i, 1)], [(i, 1)])
            else:
                b.replace([(i, 1)])
    write_payload(path, manifest, blobs, key=key)
