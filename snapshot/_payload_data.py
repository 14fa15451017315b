"""Turn an operation's blob into new bytes: REPLACE_BZ/XZ and every diff format.

Every decompression is bounded by what the operation's destination can
hold, so a hostile blob cannot make us allocate more than that (plus one
byte, to notice "too long"), and must end where the stream ends.

bsdiff patches come in two containers:

* ``BSDIFF40`` (SOURCE_BSDIFF): control, diff and extra streams, all bzip2;
* ``BSDF2`` + three type bytes (BROTLI_BSDIFF): each stream raw (0), bzip2
  (1) or brotli (2).

Both have the same 32-byte header after the magic: control length, diff
length and new size, as bsdiff's sign-magnitude little-endian int64. The
patch itself (control triples applied to the source) is the ``bsdiff4``
library's core, not reimplemented here.

:func:`apply_diff` is the one entry for every diff operation: the bsdiff
containers here, PUFFDIFF (:mod:`~dmuserd.snapshot._puffin`), ZUCCHINI
(:mod:`~dmuserd.snapshot._zucchini`) and LZ4DIFF_* (:mod:`~dmuserd.snapshot._lz4diff`),
each a module of its own imported when a payload first needs it. Each
raises a :class:`DataError` for a patch it cannot apply.
"""

from __future__ import annotations

import bz2
import lzma

import brotli
import bsdiff4.core

from dmuserd.snapshot.payload import OpType

_RAW, _BZ2, _BROTLI = 0, 1, 2
_NAMES = {_RAW: "raw", _BZ2: "bzip2", _BROTLI: "brotli"}


class DataError(ValueError):
    """A blob that does not decode; the caller names the operation."""


def decompress(kind: int, data: bytes, limit: int, what: str) -> bytes:
    """``data`` decoded by ``kind`` (raw/bzip2/brotli/xz), at most ``limit`` bytes, the whole stream."""
    if kind == _RAW:
        out = bytes(data)
    elif kind == _BZ2:
        d = bz2.BZ2Decompressor()
        try:
            out = d.decompress(data, limit + 1)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{what}: bad bzip2 data ({exc})") from None
        if len(out) <= limit and not d.eof:
            raise DataError(f"{what}: the bzip2 stream is cut short")
    elif kind == _BROTLI:
        out = _brotli(data, limit, what)
    elif kind == "xz":
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            out = d.decompress(data, limit + 1)
        except lzma.LZMAError as exc:
            raise DataError(f"{what}: bad xz data ({exc})") from None
        if len(out) <= limit and not d.eof:
            raise DataError(f"{what}: the xz stream is cut short")
    else:
        raise DataError(f"{what}: unknown compression {kind!r} (0 raw, 1 bzip2, 2 brotli)")
    if len(out) > limit:
        raise DataError(f"{what}: decodes to more than the {limit} bytes expected")
    return out


#: brotli input fed per call; where a stream ends inside a piece, that piece goes byte by byte
_BROTLI_PIECE = 1 << 16


def _brotli(data, limit: int, what: str) -> bytes:
    """One brotli stream from the start of ``data``; bytes after its end are ignored.

    AOSP's bsdiff writes a few bytes after a brotli stream's end (seen: 2 to
    3 after the extra stream of puffin's inner patches), and its bspatch
    reads only the stream, as bzip2 and xz readers stop at theirs. Python's
    decoder refuses input past the end instead of saying where the end was:
    so the input goes in by pieces, and the piece the stream ends in goes
    again byte by byte, stopping when the decoder says it has finished.
    """
    view = memoryview(data)
    d, out, fed = brotli.Decompressor(), bytearray(), 0
    try:
        while fed < len(view) and not d.is_finished() and len(out) <= limit:
            piece = view[fed : fed + _BROTLI_PIECE]
            try:
                out += d.process(piece, output_buffer_limit=limit + 1 - len(out))
            except brotli.error:
                # The end (or damage) is in this piece: decode again up to it, then byte by byte.
                d = brotli.Decompressor()
                out = bytearray(d.process(view[:fed], output_buffer_limit=limit + 1)) if fed else bytearray()
                for k in range(len(piece)):
                    if d.is_finished() or len(out) > limit:
                        break
                    out += d.process(piece[k : k + 1], output_buffer_limit=limit + 1 - len(out))
                break
            fed += len(piece)
    except brotli.error as exc:
        raise DataError(f"{what}: bad brotli data ({exc})") from None
    if len(out) <= limit and not d.is_finished():
        raise DataError(f"{what}: the brotli stream is cut short")
    return bytes(out)


def replace_data(op_type: OpType, blob: bytes, size: int) -> bytes:
    """The new bytes of a REPLACE/REPLACE_BZ/REPLACE_XZ operation (exactly ``size`` bytes)."""
    kind = {OpType.REPLACE: _RAW, OpType.REPLACE_BZ: _BZ2, OpType.REPLACE_XZ: "xz"}[op_type]
    out = decompress(kind, blob, size, f"{op_type.name} data")
    if len(out) != size:
        raise DataError(f"{op_type.name} data decodes to {len(out)} bytes, its destination extents hold {size}")
    return out


def _int64(raw: bytes, what: str) -> int:
    value = bsdiff4.core.decode_int64(raw)
    if value < 0:
        raise DataError(f"bsdiff patch: negative {what} {value}")
    return value


def bspatch(patch: bytes, source: bytes, size: int) -> bytes:
    """Apply a BSDIFF40 or BSDF2 ``patch`` to ``source``; the result must be ``size`` bytes."""
    if len(patch) < 32:
        raise DataError(f"bsdiff patch of {len(patch)} bytes is shorter than its 32-byte header")
    magic = patch[:8]
    if magic == b"BSDIFF40":
        kinds = (_BZ2, _BZ2, _BZ2)
    elif magic[:5] == b"BSDF2" and all(k in _NAMES for k in magic[5:8]):
        kinds = tuple(magic[5:8])
    else:
        raise DataError(f"bsdiff patch magic {magic!r} is neither BSDIFF40 nor BSDF2 with known stream types")
    ctrl_len = _int64(patch[8:16], "control length")
    diff_len = _int64(patch[16:24], "diff length")
    new_size = _int64(patch[24:32], "new size")
    if new_size != size:
        raise DataError(f"bsdiff patch makes {new_size} bytes, its destination extents hold {size}")
    if 32 + ctrl_len + diff_len > len(patch):
        raise DataError(f"bsdiff patch streams ({ctrl_len} + {diff_len} bytes) run past its {len(patch)} bytes")
    ctrl_raw = patch[32 : 32 + ctrl_len]
    diff_raw = patch[32 + ctrl_len : 32 + ctrl_len + diff_len]
    extra_raw = patch[32 + ctrl_len + diff_len :]
    # a control triple moves at least nothing; bound the control stream generously
    control = decompress(kinds[0], ctrl_raw, 24 * (size + 2), "bsdiff control stream")
    if len(control) % 24:
        raise DataError(f"bsdiff control stream of {len(control)} bytes is not whole 24-byte triples")
    diff = decompress(kinds[1], diff_raw, size, "bsdiff diff stream")
    extra = decompress(kinds[2], extra_raw, size, "bsdiff extra stream")
    try:
        out = bsdiff4.core.patch(bytes(source), new_size, control, diff, extra)
    except ValueError as exc:
        raise DataError(f"bsdiff patch does not apply ({exc})") from None
    if len(out) != size:
        raise DataError(f"bsdiff patch produced {len(out)} bytes, expected {size}")
    return out


def apply_diff(op_type: OpType, patch: bytes, source: bytes, size: int) -> bytes:
    """The new bytes of a diff operation: ``patch`` applied to the concatenated ``source`` extents.

    The result must fill the destination extents exactly (``size`` bytes).
    """
    if op_type in (OpType.SOURCE_BSDIFF, OpType.BROTLI_BSDIFF):
        return bspatch(patch, source, size)
    if op_type == OpType.PUFFDIFF:
        from dmuserd.snapshot._puffin import puffpatch

        return puffpatch(patch, source, size)
    if op_type == OpType.ZUCCHINI:
        from dmuserd.snapshot._zucchini import zucchini_apply

        return zucchini_apply(patch, source, size)
    if op_type in (OpType.LZ4DIFF_BSDIFF, OpType.LZ4DIFF_PUFFDIFF):
        from dmuserd.snapshot._lz4diff import lz4patch

        return lz4patch(patch, source, size)
    raise DataError(f"{op_type.name} is not a diff operation")
