"""Apply LZ4DIFF patches (LZ4DIFF_BSDIFF, LZ4DIFF_PUFFDIFF), as update_engine's ``lz4diff/`` does.

An LZ4DIFF operation patches a file that EROFS stored LZ4-compressed: the
source and destination are runs of fixed-size compressed clusters. The
patch says where each cluster's data belongs once decompressed, so the
device decompresses the old clusters into one buffer, applies an ordinary
bsdiff or puffin patch to that, and compresses the result again the way the
image builder did. Where that recompression does not give the builder's
bytes back (another compressor, another LZ4 version), the patch carries a
small bsdiff patch per cluster that fixes it.

Container (all integers big-endian)::

    0   7 bytes  "LZ4DIFF"
    7   u32      version (1)
    11  u32      size of the protobuf header that follows at 16
    15  1 byte   unused (written as zero; update_engine never reads it)
    16  ...      Lz4diffHeader (protobuf, below), then the inner patch to the end

The header (``lz4diff.proto``, proto3, field numbers as AOSP's)::

    CompressionAlgorithm { Type type = 1 (UNCOMPRESSED 0, LZ4 1, LZ4HC 2); int32 level = 2 }
    CompressedBlockInfo  { uint64 uncompressed_offset = 1; uint64 uncompressed_length = 2;
                           uint64 compressed_length = 3; bytes sha256_hash = 4;
                           bytes postfix_bspatch = 5 }
    CompressionInfo      { CompressionAlgorithm algo = 1; repeated CompressedBlockInfo block_info = 2;
                           bool zero_padding_enabled = 3 }
    Lz4diffHeader        { CompressionInfo src_info = 1; CompressionInfo dst_info = 2;
                           InnerPatchType inner_type = 3 (BSDIFF 0, PUFFDIFF 1) }

Applying it (:func:`lz4patch`), step by step as update_engine does:

1. Decompress the source. Its blocks tile it exactly, in order: a block
   with ``compressed_length < uncompressed_length`` is an LZ4 block (with
   ``zero_padding_enabled``, after skipping the leading zero bytes of its
   first 4 KiB), decoded with LZ4's *partial* decoder, which stops once the
   block's ``uncompressed_length`` bytes are out, so the zeros that pad a
   cluster after its data are not read (unless the header claims more data
   than the block holds); any other block is stored as is.
   The source algorithm is not used: decoding is the same for LZ4 and LZ4HC.
2. Apply the inner patch to the decompressed source: bsdiff
   (:func:`~dmuserd.snapshot._payload_data.bspatch`) or puffin
   (:func:`dmuserd.snapshot._puffin.puffpatch`, or the ``puffpatch`` given).
   Its output is the destination's uncompressed data followed by whatever
   lies after the last block, copied as is.
3. Compress each destination block again, in order, each into exactly
   ``compressed_length`` bytes with LZ4's *destSize* compressors
   (``LZ4_compress_destSize``, or ``LZ4_compress_HC_destSize`` at the
   header's level): they take as much input as fits, like EROFS's mkfs,
   and are handed all the data from the block's start to the end of the
   last block. A shorter result is padded with zeros, after the data, or
   before it with ``zero_padding_enabled``. A block that is not compressed
   is copied from the buffer.
4. If any destination block has a ``postfix_bspatch``, each block's output
   (and the tail) must be that block's ``compressed_length``, and each
   block with a patch is checked against its ``sha256_hash`` (when present:
   the hash of the generator's recompression, so a mismatch means our LZ4
   compresses differently from the generator's) and then bspatched. An
   empty output is passed over, as update_engine's check lets it through
   (:class:`_Postfix`).

The plain ``lz4.block.compress`` of the ``lz4`` package is not enough for
step 3: destSize compression picks its hash table by the size of all the
input it is given and ends its block differently: on the LZ4 AOSP sample,
a plain compression of the same bytes differs in 7 of the 22 clusters. The three liblz4 functions update_engine calls (partial decoding,
the two destSize compressors) are not in that package's Python API, so they
are called through ctypes in the liblz4 that the package's own extension is
built with (the system's ``liblz4.so.1`` if that one does not export them).
Output is byte-exact when that liblz4 compresses like the generator's; when
it does not, the postfix patches (when the generator made them) are where
the difference shows: their hashes no longer match, and
:class:`Lz4DiffError` says so.

Every number in the header is hostile input, checked before anything is
allocated from it. The one thing update_engine itself does not bound is how
much a block may decompress to; here an LZ4 block must declare at most 255
times its compressed length (the most LZ4 can encode), so the buffers stay
within 255 times the source (step 1) and the destination size (steps 2-3).
Everything update_engine refuses (or crashes or misbehaves on) raises
:class:`Lz4DiffError`, naming the side, the block index and the field. A
few patches update_engine would take are refused too, none of which a
generator makes: an LZ4 block declaring more than that bound, a compressed
length past liblz4's int range, an empty block meeting a postfix patch that
does not apply (:class:`_Postfix`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from dmuserd.snapshot._payload_data import DataError, bspatch

MAGIC = b"LZ4DIFF"
VERSION = 1
HEADER_SIZE = 16  # magic, version, protobuf size, one unused byte

#: CompressionAlgorithm.Type
UNCOMPRESSED, LZ4, LZ4HC = 0, 1, 2
#: InnerPatchType
BSDIFF, PUFFDIFF = 0, 1

_ALGORITHMS = {UNCOMPRESSED: "UNCOMPRESSED", LZ4: "LZ4", LZ4HC: "LZ4HC"}
_INNER_TYPES = {BSDIFF: "BSDIFF", PUFFDIFF: "PUFFDIFF"}

#: The most bytes one byte of an LZ4 block can stand for (a match length's 255-steps).
_LZ4_MAX_RATIO = 255
#: update_engine's kBlockSize: how far the zero-padding scan of a cluster looks.
_PADDING_SCAN = 4096
#: liblz4 takes sizes as C ints.
_INT_MAX = 2**31 - 1

PuffPatch = Callable[[bytes, bytes, int], bytes]


class Lz4DiffError(DataError):
    """An LZ4DIFF patch that cannot be applied; the message names the field and block at fault."""


# --- the header ------------------------------------------------------------------------------

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "chromeos_update_engine"
#: message -> [(field, number, type, repeated, message type)]; enums as int32 (wire-identical,
#: and an unknown value stays visible instead of becoming the default)
_SCHEMA: dict[str, list[tuple[str, int, int, bool, str | None]]] = {
    "CompressionAlgorithm": [("type", 1, _F.TYPE_INT32, False, None), ("level", 2, _F.TYPE_INT32, False, None)],
    "CompressedBlockInfo": [
        ("uncompressed_offset", 1, _F.TYPE_UINT64, False, None),
        ("uncompressed_length", 2, _F.TYPE_UINT64, False, None),
        ("compressed_length", 3, _F.TYPE_UINT64, False, None),
        ("sha256_hash", 4, _F.TYPE_BYTES, False, None),
        ("postfix_bspatch", 5, _F.TYPE_BYTES, False, None),
    ],
    "CompressionInfo": [
        ("algo", 1, _F.TYPE_MESSAGE, False, "CompressionAlgorithm"),
        ("block_info", 2, _F.TYPE_MESSAGE, True, "CompressedBlockInfo"),
        ("zero_padding_enabled", 3, _F.TYPE_BOOL, False, None),
    ],
    "Lz4diffHeader": [
        ("src_info", 1, _F.TYPE_MESSAGE, False, "CompressionInfo"),
        ("dst_info", 2, _F.TYPE_MESSAGE, False, "CompressionInfo"),
        ("inner_type", 3, _F.TYPE_INT32, False, None),
    ],
}


def _message_classes() -> dict[str, type]:
    file = descriptor_pb2.FileDescriptorProto(name="dmuserd/lz4diff.proto", package=_PACKAGE, syntax="proto3")
    for name, fields in _SCHEMA.items():
        message = file.message_type.add(name=name)
        for field_name, number, ftype, repeated, type_name in fields:
            label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
            field = message.field.add(name=field_name, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = f".{_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()  # private: no clash with another copy of the schema
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
            for name in _SCHEMA}


_CLASSES = _message_classes()
#: The protobuf message class of the header (for tests and tools that build patches).
Lz4diffHeader = _CLASSES["Lz4diffHeader"]


@dataclass(frozen=True)
class Block:
    """One ``CompressedBlockInfo``: where a cluster's data goes once decompressed."""

    uncompressed_offset: int
    uncompressed_length: int
    compressed_length: int
    sha256_hash: bytes = b""
    postfix_bspatch: bytes = b""

    @property
    def compressed(self) -> bool:
        """update_engine's rule: a block is LZ4 data when it is shorter than what it stands for."""
        return self.compressed_length < self.uncompressed_length


@dataclass(frozen=True)
class CompressedFile:
    """One ``CompressionInfo``: a file's blocks and how they were compressed."""

    algorithm: int
    level: int
    blocks: tuple[Block, ...]
    zero_padding: bool


@dataclass(frozen=True)
class Lz4DiffPatch:
    """A parsed LZ4DIFF patch: its header and the inner patch (``inner_type`` BSDIFF or PUFFDIFF)."""

    version: int
    src: CompressedFile
    dst: CompressedFile
    inner_type: int
    inner_patch: bytes

    @property
    def inner_type_name(self) -> str:
        return _INNER_TYPES.get(self.inner_type, f"unknown ({self.inner_type})")


def _compressed_file(info) -> CompressedFile:
    blocks = tuple(Block(b.uncompressed_offset, b.uncompressed_length, b.compressed_length,
                         b.sha256_hash, b.postfix_bspatch) for b in info.block_info)
    return CompressedFile(info.algo.type, info.algo.level, blocks, info.zero_padding_enabled)


def parse_lz4diff(patch: bytes) -> Lz4DiffPatch:
    """The container and header of an LZ4DIFF ``patch``; :class:`Lz4DiffError` if they are malformed.

    Only the container is checked here; the blocks are checked against the
    source and the destination size by :func:`lz4patch`.
    """
    patch = bytes(patch)
    if len(patch) < HEADER_SIZE or patch[: len(MAGIC)] != MAGIC:
        raise Lz4DiffError(f"LZ4DIFF patch: {len(patch)} bytes starting {patch[:HEADER_SIZE].hex()}, "
                           f"not the {HEADER_SIZE}-byte header starting {MAGIC!r}")
    version, pb_size = struct.unpack_from(">II", patch, len(MAGIC))
    if version != VERSION:
        raise Lz4DiffError(f"LZ4DIFF patch: version {version} at offset 7, only {VERSION} is known")
    if pb_size > len(patch) - HEADER_SIZE:
        raise Lz4DiffError(f"LZ4DIFF patch: protobuf header size {pb_size} (offset 11) runs past the "
                           f"patch's {len(patch) - HEADER_SIZE} bytes after offset {HEADER_SIZE}")
    header = Lz4diffHeader()
    try:
        header.ParseFromString(patch[HEADER_SIZE : HEADER_SIZE + pb_size])
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise Lz4DiffError(f"LZ4DIFF patch: protobuf header at offset {HEADER_SIZE} ({pb_size} bytes) "
                           f"does not parse ({exc})") from None
    return Lz4DiffPatch(version, _compressed_file(header.src_info), _compressed_file(header.dst_info),
                        header.inner_type, patch[HEADER_SIZE + pb_size :])


# --- liblz4 ------------------------------------------------------------------------------------


class _Lz4:
    """The liblz4 calls update_engine makes, through ctypes, on addresses of buffers we own."""

    def __init__(self, lib: ctypes.CDLL, origin: str) -> None:
        c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
        p_int = ctypes.POINTER(c_int)
        self.version = _fn(lib, "LZ4_versionNumber", c_int, [])()
        self.origin = origin
        v = self.version
        self.name = f"liblz4 {v // 10000}.{v // 100 % 100}.{v % 100} ({origin})"
        self.decompress_safe_partial = _fn(lib, "LZ4_decompress_safe_partial", c_int,
                                           [c_void_p, c_void_p, c_int, c_int, c_int])
        self.compress_dest_size = _fn(lib, "LZ4_compress_destSize", c_int, [c_void_p, c_void_p, p_int, c_int])
        self.compress_hc_dest_size = _fn(lib, "LZ4_compress_HC_destSize", c_int,
                                         [c_void_p, c_void_p, c_void_p, p_int, c_int, c_int])
        self.hc_state_size = _fn(lib, "LZ4_sizeofStateHC", c_int, [])()


def _fn(lib: ctypes.CDLL, name: str, restype, argtypes):
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


def _library_candidates() -> Iterator[tuple[str, str]]:
    """(path, description) of the liblz4 builds to try, the ``lz4`` package's own first."""
    try:
        import lz4
        import lz4.block._block as block_ext

        yield block_ext.__file__, f"bundled with python-lz4 {lz4.__version__}"
    except (ImportError, AttributeError):
        pass
    system = ctypes.util.find_library("lz4")
    if system:
        yield system, f"system {system}"


@functools.cache
def lz4_library(prefer: str | None = None) -> _Lz4:
    """The liblz4 in use: the first of :func:`_library_candidates` exporting every function needed.

    ``prefer`` (a path) picks one candidate; tests use it to compare builds.
    """
    for path, origin in _library_candidates():
        if prefer is not None and path != prefer:
            continue
        try:
            return _Lz4(ctypes.CDLL(path), origin)
        except (OSError, AttributeError):
            continue
    raise Lz4DiffError("LZ4DIFF: no liblz4 exporting LZ4_decompress_safe_partial, LZ4_compress_destSize and "
                       "LZ4_compress_HC_destSize (neither the lz4 package's extension nor a system liblz4)")


def _address(data: bytes) -> int:
    """The address of an immutable bytes object's contents (valid while ``data`` lives)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


def _as_c_int(value: int) -> int:
    """``value`` converted to a C int the way update_engine's ``int x = size_t`` does (modulo 2**32)."""
    value &= 0xFFFFFFFF
    return value - 2**32 if value > _INT_MAX else value


# --- applying ----------------------------------------------------------------------------------


def _check_source_blocks(src: CompressedFile, source_size: int) -> int:
    """The source's decompressed size, after checking its blocks tile ``source_size`` bytes."""
    if not src.blocks:
        raise Lz4DiffError("LZ4DIFF src_info: no blocks (update_engine has nothing to decompress and fails)")
    uncompressed = compressed = 0
    for i, b in enumerate(src.blocks):
        if b.uncompressed_offset != uncompressed:
            raise Lz4DiffError(f"LZ4DIFF src block {i}: uncompressed_offset {b.uncompressed_offset}, "
                               f"the blocks before it end at {uncompressed}")
        if b.compressed:
            if b.uncompressed_length > _LZ4_MAX_RATIO * b.compressed_length:
                raise Lz4DiffError(f"LZ4DIFF src block {i}: uncompressed_length {b.uncompressed_length} is more "
                                   f"than LZ4 can encode in compressed_length {b.compressed_length}")
        elif b.compressed_length != b.uncompressed_length or b.compressed_length == 0:
            raise Lz4DiffError(f"LZ4DIFF src block {i}: stored block with compressed_length {b.compressed_length} "
                               f"and uncompressed_length {b.uncompressed_length} (must be equal and nonzero)")
        uncompressed += b.uncompressed_length
        compressed += b.compressed_length
        if compressed > source_size:
            raise Lz4DiffError(f"LZ4DIFF src block {i}: compressed_length {b.compressed_length} runs past the "
                               f"{source_size}-byte source (blocks end at {compressed})")
    if compressed != source_size:
        raise Lz4DiffError(f"LZ4DIFF src_info: the blocks cover {compressed} bytes of the {source_size}-byte "
                           "source (update_engine requires all of it)")
    return uncompressed


def _decompress_source(lib: _Lz4, src: CompressedFile, source: bytes) -> bytes:
    """The source's blocks decompressed into one buffer (blocks already checked)."""
    out = bytearray()
    scratch = bytearray()
    base = _address(source)
    offset = 0
    for i, b in enumerate(src.blocks):
        cluster = source[offset : offset + b.compressed_length]
        if not b.compressed:
            out += cluster
            offset += b.compressed_length
            continue
        margin = 0
        if src.zero_padding:  # the leading zeros of the cluster's first 4 KiB
            head = cluster[:_PADDING_SCAN]
            margin = len(head) - len(head.lstrip(b"\0"))
        want = b.uncompressed_length
        if want > _INT_MAX or b.compressed_length > _INT_MAX:
            raise Lz4DiffError(f"LZ4DIFF src block {i}: lengths {b.compressed_length}/{want} exceed liblz4's int")
        if len(scratch) < want:
            scratch = bytearray(want)
        target = (ctypes.c_char * len(scratch)).from_buffer(scratch)
        got = lib.decompress_safe_partial(base + offset + margin, ctypes.addressof(target),
                                          b.compressed_length - margin, want, want)
        del target
        if got != want:
            raise Lz4DiffError(f"LZ4DIFF src block {i}: the LZ4 data at source offset {offset + margin} "
                               f"decodes to {'an error' if got < 0 else f'{got} bytes'}, "
                               f"not its uncompressed_length {want}")
        out += memoryview(scratch)[:want]
        offset += b.compressed_length
    return bytes(out)


def _check_destination_blocks(dst: CompressedFile, size: int) -> tuple[int, int]:
    """(bytes of uncompressed data the blocks stand for, bytes they write), checked against ``size``.

    A compressed block writes ``compressed_length`` bytes, a stored one
    ``uncompressed_length`` (update_engine copies that much, whatever
    ``compressed_length`` says); postfix patches never change a length.
    """
    uncompressed = written = 0
    for i, b in enumerate(dst.blocks):
        if b.uncompressed_offset != uncompressed:
            raise Lz4DiffError(f"LZ4DIFF dst block {i}: uncompressed_offset {b.uncompressed_offset}, "
                               f"the blocks before it end at {uncompressed}")
        if b.compressed:
            if b.uncompressed_length > _LZ4_MAX_RATIO * b.compressed_length:
                raise Lz4DiffError(f"LZ4DIFF dst block {i}: uncompressed_length {b.uncompressed_length} is more "
                                   f"than LZ4 can encode in compressed_length {b.compressed_length}")
            if dst.algorithm not in (LZ4, LZ4HC):
                raise Lz4DiffError(f"LZ4DIFF dst_info: algo type {dst.algorithm} "
                                   f"({_ALGORITHMS.get(dst.algorithm, 'unknown')}) cannot recompress "
                                   f"block {i}: only LZ4 and LZ4HC can")
        uncompressed += b.uncompressed_length
        written += b.compressed_length if b.compressed else b.uncompressed_length
        if written > size:
            raise Lz4DiffError(f"LZ4DIFF dst block {i}: the blocks up to it write {written} bytes, "
                               f"the destination holds {size}")
        if b.compressed and b.compressed_length > _INT_MAX:
            raise Lz4DiffError(f"LZ4DIFF dst block {i}: compressed_length {b.compressed_length} exceeds liblz4's int")
    return uncompressed, written


def _apply_inner(header: Lz4DiffPatch, source: bytes, size: int, puffpatch: PuffPatch | None) -> bytes:
    """The inner patch applied to the decompressed source; exactly ``size`` bytes."""
    if header.inner_type == BSDIFF:
        apply = bspatch
    elif header.inner_type == PUFFDIFF:
        apply = puffpatch or _default_puffpatch()
    else:
        raise Lz4DiffError(f"LZ4DIFF header: inner_type {header.inner_type} is neither BSDIFF (0) nor PUFFDIFF (1)")
    try:
        out = apply(header.inner_patch, source, size)
    except Lz4DiffError:
        raise
    except DataError as exc:
        raise Lz4DiffError(f"LZ4DIFF inner {header.inner_type_name} patch: {exc}") from exc
    if len(out) != size:
        raise Lz4DiffError(f"LZ4DIFF inner {header.inner_type_name} patch made {len(out)} bytes, "
                           f"the header's blocks need {size}")
    return bytes(out)


def _default_puffpatch() -> PuffPatch:
    try:
        from dmuserd.snapshot._puffin import puffpatch
    except ImportError as exc:
        raise Lz4DiffError(f"LZ4DIFF inner PUFFDIFF patch: puffin support (dmuserd.snapshot._puffin) "
                           f"is not available ({exc})") from None
    return puffpatch


def _recompress(lib: _Lz4, dst: CompressedFile, data: bytes, uncompressed: int, size: int) -> bytes:
    """The destination: ``data``'s blocks compressed again (and postfix-patched), then its tail."""
    out = bytearray(size)
    view = memoryview(out)
    target = (ctypes.c_char * size).from_buffer(out) if size else None
    out_base = ctypes.addressof(target) if target is not None else 0
    data_base = _address(data)
    hc_state = ctypes.create_string_buffer(lib.hc_state_size) if dst.algorithm == LZ4HC else None
    postfix = _Postfix(lib, dst.blocks) if any(b.postfix_bspatch for b in dst.blocks) else None
    consumed = ctypes.c_int()
    pos = 0
    for i, b in enumerate(dst.blocks):
        start = b.uncompressed_offset
        if not b.compressed:
            length = b.uncompressed_length
            view[pos : pos + length] = data[start : start + length]
        else:
            length = b.compressed_length
            consumed.value = _as_c_int(uncompressed - start)
            if dst.algorithm == LZ4HC:
                written = lib.compress_hc_dest_size(ctypes.addressof(hc_state), data_base + start, out_base + pos,
                                                    ctypes.byref(consumed), length, dst.level)
            else:
                written = lib.compress_dest_size(data_base + start, out_base + pos, ctypes.byref(consumed), length)
            if not 0 < written <= length:
                raise Lz4DiffError(f"LZ4DIFF dst block {i}: {_ALGORITHMS[dst.algorithm]} recompression of the "
                                   f"{uncompressed - start} bytes from offset {start} into {length} failed "
                                   f"({lib.name} returned {written})")
            if written < length:
                if dst.zero_padding:
                    view[pos + length - written : pos + length] = bytes(view[pos : pos + written])
                    view[pos : pos + length - written] = bytes(length - written)
                else:
                    view[pos + written : pos + length] = bytes(length - written)
        if postfix:
            postfix(view[pos : pos + length], f"dst block {i}")
        pos += length
    del target
    view[pos:] = data[uncompressed : uncompressed + size - pos]
    if postfix:
        postfix(view[pos:], "the data after the last block")
    view.release()
    return bytes(out)


class _Postfix:
    """update_engine's postfix step: a filter over the pieces recompression writes, patching in place.

    It pairs pieces (each block's output, then the tail) with the blocks'
    info in order, as update_engine's does: a piece must be its block's
    ``compressed_length``; a block with a ``postfix_bspatch`` is checked
    against its ``sha256_hash`` (when present) and patched. One quirk is
    kept because it changes the output: update_engine's length check fails
    by returning 0, which for an empty piece reads as "all 0 bytes written",
    so an empty piece is passed over and the next piece meets the same
    block. The one case handled differently: an empty piece meeting an
    empty block whose postfix patch does not apply is refused here, where
    update_engine would pass over it.
    """

    def __init__(self, lib: _Lz4, blocks: tuple[Block, ...]) -> None:
        self.lib, self.blocks, self.next = lib, blocks, 0

    def __call__(self, piece: memoryview, what: str) -> None:
        if self.next >= len(self.blocks):
            return
        i, b = self.next, self.blocks[self.next]
        if len(piece) != b.compressed_length:
            if not piece:
                return
            raise Lz4DiffError(f"LZ4DIFF {what} makes {len(piece)} bytes, dst block {i}'s compressed_length is "
                               f"{b.compressed_length}: with postfix patches they must match")
        self.next += 1
        if not b.postfix_bspatch:
            return
        recompressed = bytes(piece)
        digest = hashlib.sha256(recompressed).digest()
        if b.sha256_hash and digest != b.sha256_hash:
            if not piece:
                return
            raise Lz4DiffError(f"LZ4DIFF dst block {i}: recompressed with {self.lib.name}, sha256 {digest.hex()} "
                               f"is not the generator's {b.sha256_hash.hex()} (another LZ4 version or compressor "
                               "made the patch)")
        try:
            piece[:] = bspatch(b.postfix_bspatch, recompressed, len(recompressed))
        except DataError as exc:
            raise Lz4DiffError(f"LZ4DIFF dst block {i} postfix_bspatch: {exc}") from exc


def lz4patch(patch: bytes, source: bytes, size: int, *, puffpatch: PuffPatch | None = None) -> bytes:
    """Apply an LZ4DIFF ``patch`` to ``source`` (the operation's source extents); exactly ``size`` bytes.

    ``puffpatch(patch, source, size) -> bytes`` applies a PUFFDIFF inner
    patch; by default :func:`dmuserd.snapshot._puffin.puffpatch`, imported
    when first needed. Raises :class:`Lz4DiffError` (a
    :class:`~dmuserd.snapshot._payload_data.DataError`) for any patch that
    does not apply; the operation type (LZ4DIFF_BSDIFF or _PUFFDIFF) is not
    needed: like update_engine, the header's ``inner_type`` decides.
    """
    header = parse_lz4diff(patch)
    source = bytes(source)
    _check_source_blocks(header.src, len(source))
    uncompressed, written = _check_destination_blocks(header.dst, size)
    lib = lz4_library()
    decompressed = _decompress_source(lib, header.src, source)
    # the inner patch makes the blocks' data and then the tail that fills the destination
    new = _apply_inner(header, decompressed, uncompressed + size - written, puffpatch)
    del decompressed
    return _recompress(lib, header.dst, new, uncompressed, size)
