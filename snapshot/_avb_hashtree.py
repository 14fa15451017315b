"""Check a partition against the dm-verity hash tree its AVB footer describes.

An Android partition verified by dm-verity ends with an AVB footer (the
last 64 bytes, ``AVBf``) pointing at a vbmeta blob (``AVB0``) whose
hashtree descriptor (tag 1) gives the data size, the tree's place, the
algorithm, the salt and the root digest. On a device, dm-verity sits above
the snapshot device and checks every block read; dmuserd's ``update-verify``
reads through the snapshot directly, so it checks the same here: the tree
of the data read through the snapshot must have the descriptor's root
digest and equal the tree stored in the partition (as ``avbtool
verify_image`` does).

Formats (big-endian, from avbtool's ``AvbFooter``, ``AvbVBMetaHeader``,
``AvbHashtreeDescriptor``)::

    footer      4s magic, u32 major, u32 minor, u64 original_image_size, u64 vbmeta_offset, u64 vbmeta_size
    vbmeta      256-byte header: ... u64 auth block size @12, u64 aux block size @20,
                u64 descriptors_offset @96, u64 descriptors_size @104 (in the aux block, after the auth block)
    descriptor  u64 tag, u64 num_bytes_following; tag 1: u32 dm_verity_version, u64 image_size,
                u64 tree_offset, u64 tree_size, u32 data_block_size, u32 hash_block_size, u32 fec_num_roots,
                u64 fec_offset, u64 fec_size, 32s hash_algorithm, u32 name_len, u32 salt_len,
                u32 root_digest_len, u32 flags, 60 reserved; then name, salt, root digest

The tree itself is :func:`dmuserd.snapshot._verity.hash_tree`'s (dm-verity
format 1, digests padded to a power of two, top level first).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Callable

from dmuserd.snapshot._payload_data import DataError

FOOTER = struct.Struct(">4sIIQQQ28s")
VBMETA_HEADER_SIZE = 256
HASHTREE = struct.Struct(">QQIQQQIIIQQ32sIIII60s")
HASHTREE_TAG = 1
#: a vbmeta blob larger than this is taken as damage (avbtool's images are a few KiB)
MAX_VBMETA = 1 << 20


class AvbError(DataError):
    """An AVB footer, vbmeta blob or hashtree descriptor that cannot be used (the message says why)."""


class HashtreeMismatch(AvbError):
    """The data read does not match the hash tree (root digest or stored tree)."""


class HashtreeUnsupported(AvbError):
    """A valid descriptor of a kind dmuserd does not check (the message says which)."""


@dataclass(frozen=True)
class Hashtree:
    image_size: int
    tree_offset: int
    tree_size: int
    data_block_size: int
    hash_block_size: int
    algorithm: str
    partition: str
    salt: bytes
    root_digest: bytes


def find_hashtree(read: Callable[[int, int], bytes], size: int) -> Hashtree | None:
    """The hashtree descriptor of a ``size``-byte partition read by ``read(offset, length)``,
    or None when it has no AVB footer or no hashtree descriptor."""
    if size < FOOTER.size:
        return None
    magic, _major, _minor, _original, vb_offset, vb_size, _ = FOOTER.unpack(read(size - FOOTER.size, FOOTER.size))
    if magic != b"AVBf":
        return None
    if not VBMETA_HEADER_SIZE <= vb_size <= MAX_VBMETA or vb_offset + vb_size > size - FOOTER.size:
        raise AvbError(f"the AVB footer points at a vbmeta blob of {vb_size} bytes at {vb_offset}, "
                       f"outside the {size}-byte partition")
    blob = read(vb_offset, vb_size)
    if blob[:4] != b"AVB0":
        raise AvbError(f"no vbmeta blob (AVB0) at {vb_offset}, where the AVB footer points")
    auth_size, aux_size = struct.unpack_from(">QQ", blob, 12)
    desc_offset, desc_size = struct.unpack_from(">QQ", blob, 96)
    start = VBMETA_HEADER_SIZE + auth_size + desc_offset
    if desc_offset + desc_size > aux_size or start + desc_size > len(blob):
        raise AvbError(f"the vbmeta blob's descriptors ({desc_size} bytes at {desc_offset} of the auxiliary "
                       f"block) lie outside it")
    at, end = start, start + desc_size
    while at + 16 <= end:
        tag, following = struct.unpack_from(">QQ", blob, at)
        if at + 16 + following > end:
            raise AvbError(f"descriptor at {at - start} of the vbmeta blob runs past its descriptors")
        if tag == HASHTREE_TAG:
            return _hashtree(blob[at : at + 16 + following])
        at += 16 + following
    return None


def _hashtree(raw: bytes) -> Hashtree:
    if len(raw) < HASHTREE.size:
        raise AvbError(f"a hashtree descriptor of {len(raw)} bytes is shorter than its {HASHTREE.size}-byte header")
    (_tag, _following, _version, image_size, tree_offset, tree_size, data_bs, hash_bs, _roots, _fec_offset,
     _fec_size, algorithm, name_len, salt_len, digest_len, _flags, _) = HASHTREE.unpack_from(raw)
    tail = raw[HASHTREE.size :]
    if name_len + salt_len + digest_len > len(tail):
        raise AvbError("the hashtree descriptor's name, salt and root digest run past it")
    name = tail[:name_len].decode("utf-8", errors="replace")
    salt = tail[name_len : name_len + salt_len]
    digest = tail[name_len + salt_len : name_len + salt_len + digest_len]
    return Hashtree(image_size, tree_offset, tree_size, data_bs, hash_bs,
                    algorithm.rstrip(b"\0").decode("ascii", errors="replace"), name, bytes(salt), bytes(digest))


def check_hashtree(tree: Hashtree, read: Callable[[int, int], bytes], size: int) -> None:
    """Hash the data as read through ``read`` and compare (see the module doc).

    Raises :class:`HashtreeMismatch` when the data does not match,
    :class:`HashtreeUnsupported` for a descriptor dmuserd does not check,
    :class:`AvbError` for one that is damaged (each says why).
    """
    from dmuserd.snapshot._verity import VerityError, hash_tree

    bs = tree.data_block_size
    if bs != tree.hash_block_size or bs <= 0 or tree.image_size % bs:
        raise HashtreeUnsupported(f"hashtree of {tree.partition!r}: data block size {bs}, hash block size "
                       f"{tree.hash_block_size}, image size {tree.image_size}: not checked (one block size "
                       "dividing the image size is what dmuserd checks)")
    if tree.image_size > size or tree.tree_offset + tree.tree_size > size:
        raise AvbError(f"hashtree of {tree.partition!r} covers {tree.image_size} bytes, its tree "
                       f"{tree.tree_size} bytes at {tree.tree_offset}: past the {size}-byte partition")
    blocks = tree.image_size // bs
    if blocks < 2:
        return  # avbtool makes no tree for a one-block image; nothing to compare with
    try:
        built = hash_tree(lambda start, count: read(start * bs, count * bs), blocks, bs, tree.algorithm,
                          tree.salt)
        digest_size = hashlib.new(tree.algorithm).digest_size if tree.algorithm != "blake2b-256" else 32
    except (VerityError, ValueError) as exc:
        raise AvbError(f"hashtree of {tree.partition!r}: {exc}") from None
    if tree.root_digest and built.root_digest[:digest_size] != tree.root_digest:
        raise HashtreeMismatch(f"the data of {tree.partition!r} ({blocks} blocks) does not match its hashtree: "
                               f"root digest {built.root_digest[:digest_size].hex()}, the descriptor says "
                               f"{tree.root_digest.hex()}")
    stored = read(tree.tree_offset, tree.tree_size) if tree.tree_size else b""
    if stored and not stored.startswith(b"ZeRoHaSH") and stored != built.tree:
        raise HashtreeMismatch(f"the hash tree stored in {tree.partition!r} ({tree.tree_size} bytes at "
                               f"{tree.tree_offset}) is not the tree of its data")
