"""Android sparse images (libsparse's format), read in place and written.

A sparse image (``system.img`` in a factory image, what ``img2simg`` makes)
is a 28-byte header and a list of chunks, each a 12-byte header followed by
its data (all little-endian):

* header: magic ``0xed26ff3a``, major version 1 (a higher minor version is
  fine), the header and chunk-header sizes (at least 28 and 12; longer ones
  are skipped, as libsparse does), the block size (a non-zero multiple of
  4), the image's size in blocks, the number of chunks and a checksum
  (written as 0 by libsparse and not checked by it either);
* ``RAW`` (0xCAC1): ``chunk_sz`` blocks of data follow;
* ``FILL`` (0xCAC2): a 4-byte value repeated over ``chunk_sz`` blocks;
* ``DONT_CARE`` (0xCAC3): ``chunk_sz`` blocks of no data (read as zeros);
* ``CRC32`` (0xCAC4): the CRC-32 (zlib's) of every block before it, 0 blocks.

:class:`SparseImage` reads every chunk header once when opened, checks
each against the rules above (``total_sz`` agreeing with the chunk's type
and size, data inside the file, the blocks adding up to the header's
total, never more), and keeps an index of output block → chunk (three
flat arrays). A read then bisects the index and copies RAW data straight
from the file: random access, no unpacking. CRC32 chunks cover everything before them,
so only a sequential read can check them: :func:`unsparse` (``dmuserd image
unsparse``) does; random reads do not.

Errors are :class:`SparseFormatError`, naming the file, the byte offset of
the offending header and the rule.
"""

from __future__ import annotations

import os
import struct
import zlib
from array import array
from bisect import bisect_right

from dmuserd.images import SPARSE_MAGIC as MAGIC
from dmuserd.images._image import (Image, ImageError, ImageFormatError, fill_pattern, fill_zeros,
                                   write_atomically)

MAGIC_BYTES = struct.pack("<I", MAGIC)
MAJOR_VERSION = 1
HEADER = struct.Struct("<IHHHHIIII")  # 28 bytes
CHUNK = struct.Struct("<HHII")  # 12 bytes
RAW, FILL, DONT_CARE, CRC32 = 0xCAC1, 0xCAC2, 0xCAC3, 0xCAC4
CHUNK_NAMES = {RAW: "RAW", FILL: "FILL", DONT_CARE: "DONT_CARE", CRC32: "CRC32"}
#: chunk headers read per pread while indexing (they are scattered: one each, but batched when adjacent)
_INDEX_READ = 64 << 10
#: the largest RAW chunk :func:`write_sparse` makes
MAX_WRITE_CHUNK = 64 << 20
_ZERO_STEP = bytes(1 << 20)


class SparseFormatError(ImageFormatError):
    """A sparse image breaks a rule of the format (see the module docstring)."""

    def __init__(self, path, offset: int, rule: str, detail: str) -> None:
        super().__init__("sparse image", path, offset, rule, detail)


def is_sparse(image: Image) -> bool:
    """Whether ``image`` starts with the sparse magic."""
    return image.size >= 4 and image.pread(4, 0) == MAGIC_BYTES


class SparseImage(Image):
    """The raw image a sparse image stands for, read from ``source`` in place.

    ``source`` is an :class:`~dmuserd.images.Image` holding the sparse file
    (closed with this one). Raises :class:`SparseFormatError` when a chunk
    breaks a rule.
    """

    kind = "sparse"

    def __init__(self, source: Image, path: str | None = None) -> None:
        self.source = source
        self.path = path or source.path
        try:
            self._index()
        except BaseException:
            source.close()
            raise

    def _fail(self, offset: int, rule: str, detail: str) -> SparseFormatError:
        return SparseFormatError(self.path, offset, rule, detail)

    def _index(self) -> None:
        src = self.source
        head = src.pread(HEADER.size, 0) if src.size >= HEADER.size else b""
        if len(head) < HEADER.size or src.size < HEADER.size:
            raise self._fail(0, "header", f"the file is {src.size} bytes, shorter than the {HEADER.size}-byte header")
        magic, major, minor, file_hdr, chunk_hdr, blk_sz, total_blks, total_chunks, checksum = HEADER.unpack(head)
        if magic != MAGIC:
            raise self._fail(0, "magic", f"magic {magic:#010x}, not {MAGIC:#010x}")
        if major != MAJOR_VERSION:
            raise self._fail(4, "version", f"major version {major}; only {MAJOR_VERSION} exists")
        if file_hdr < HEADER.size:
            raise self._fail(8, "header-size", f"file_hdr_sz {file_hdr} is less than {HEADER.size}")
        if file_hdr > src.size:
            raise self._fail(8, "header-size", f"file_hdr_sz {file_hdr} runs past the end of the {src.size}-byte file")
        if chunk_hdr < CHUNK.size:
            raise self._fail(10, "chunk-header-size", f"chunk_hdr_sz {chunk_hdr} is less than {CHUNK.size}")
        if not blk_sz or blk_sz % 4:
            raise self._fail(12, "block-size", f"blk_sz {blk_sz} is not a non-zero multiple of 4")
        self.block_size = blk_sz
        self.total_blocks = total_blks
        self.size = total_blks * blk_sz
        self.minor_version = minor
        self.header_checksum = checksum
        self.total_chunks = total_chunks
        starts, ends, kinds, args = array("Q"), array("Q"), bytearray(), array("Q")
        crcs: list[tuple[int, int, int]] = []  # (header offset, blocks before it, expected CRC-32)
        counts = {name: 0 for name in CHUNK_NAMES.values()}
        pos, block = file_hdr, 0
        window, window_at = b"", 0  # chunk headers are read in batches
        for i in range(total_chunks):
            if pos + chunk_hdr > src.size:
                raise self._fail(pos, "truncated", f"chunk {i} of {total_chunks}: its header runs past the end of "
                                 f"the {src.size}-byte file")
            if not window_at <= pos <= window_at + len(window) - CHUNK.size:
                window_at = pos
                window = src.pread(min(_INDEX_READ, src.size - pos), pos)
            ctype, _reserved, chunk_sz, total_sz = CHUNK.unpack_from(window, pos - window_at)
            data = total_sz - chunk_hdr
            where = f"chunk {i} ({CHUNK_NAMES.get(ctype, hex(ctype))})"
            if total_sz < chunk_hdr:
                raise self._fail(pos, "chunk-size", f"{where}: total_sz {total_sz} is less than the {chunk_hdr}-byte "
                                 "chunk header")
            if ctype == RAW:
                if data != chunk_sz * blk_sz:
                    raise self._fail(pos, "chunk-size", f"{where}: {data} bytes of data for {chunk_sz} blocks of "
                                     f"{blk_sz}")
            elif ctype in (FILL, CRC32):
                if data != 4:
                    raise self._fail(pos, "chunk-size", f"{where}: {data} bytes of data, not 4")
            elif ctype == DONT_CARE:
                if data:
                    raise self._fail(pos, "chunk-size", f"{where}: {data} bytes of data, not 0")
            else:
                raise self._fail(pos, "chunk-type", f"chunk {i}: unknown chunk type {ctype:#06x}")
            data_at = pos + chunk_hdr
            if data_at + data > src.size:
                raise self._fail(pos, "truncated", f"{where}: its {data} bytes of data run past the end of the "
                                 f"{src.size}-byte file")
            counts[CHUNK_NAMES[ctype]] += 1
            if ctype == CRC32:
                crcs.append((pos, block, struct.unpack("<I", src.pread(4, data_at))[0]))
            elif chunk_sz:
                if block + chunk_sz > total_blks:
                    raise self._fail(pos, "overrun", f"{where}: blocks {block}..{block + chunk_sz - 1} run past the "
                                     f"image's {total_blks} blocks (total_blks, offset 16)")
                starts.append(block)
                ends.append(block + chunk_sz)
                kinds.append(ctype & 0xFF)
                if ctype == RAW:
                    args.append(data_at)
                elif ctype == FILL:
                    args.append(struct.unpack("<I", src.pread(4, data_at))[0])
                else:
                    args.append(0)
            block += chunk_sz if ctype != CRC32 else 0
            pos = data_at + data
        if block != total_blks:
            raise self._fail(pos, "short", f"the chunks cover {block} blocks, the header says {total_blks} "
                             "(total_blks, offset 16)")
        self._starts, self._ends, self._kinds, self._args = starts, ends, bytes(kinds), args
        self.crcs = crcs
        self.chunk_counts = counts
        self.sparse_size = pos  # where the last chunk ends in the file

    # --- reads -------------------------------------------------------------

    def readinto(self, buf: memoryview, offset: int, flags: int = 0) -> None:
        n = len(buf)
        end = min(n, max(0, self.size - offset))
        bs = self.block_size
        starts, ends, kinds, args = self._starts, self._ends, self._kinds, self._args
        i = bisect_right(starts, offset // bs) - 1
        done = 0
        while done < end:
            at = offset + done
            # the chunks cover every block, one after another (checked when opened)
            chunk_start = starts[i] * bs
            take = min(end - done, ends[i] * bs - at)
            piece = buf[done : done + take]
            kind = kinds[i]
            if kind == RAW & 0xFF:
                self.source.readinto(piece, args[i] + at - chunk_start, flags)
            elif kind == FILL & 0xFF:
                fill_pattern(piece, struct.pack("<I", args[i]), (at - chunk_start) % 4)
            else:
                fill_zeros(piece)
            done += take
            i += 1
        if end < n:
            fill_zeros(buf[end:])

    def chunks(self):
        """``(first block, blocks, kind name, file offset of RAW data or FILL value)`` per chunk, in order."""
        for s, e, k, a in zip(self._starts, self._ends, self._kinds, self._args):
            yield s, e - s, CHUNK_NAMES[0xCA00 | k], a

    def close(self) -> None:
        self.source.close()

    def describe(self) -> dict:
        return {**super().describe(), "block_size": self.block_size, "blocks": self.total_blocks,
                "sparse_bytes": self.sparse_size, "chunks": dict(self.chunk_counts)}


# --- writing ----------------------------------------------------------------


def unsparse(image: SparseImage, output, *, check_crc: bool = True, bar=None) -> int:
    """Write the raw image ``image`` stands for to the file ``output``; returns its size.

    RAW and non-zero FILL chunks are written, DONT_CARE chunks and zero
    fills left as holes (the output is a sparse file). CRC32 chunks are
    checked on the way when ``check_crc``. Written under a temporary name
    and renamed at the end: on an error nothing is left.
    """
    bs = image.block_size
    step = max(1, (1 << 20) // bs)
    checks: dict[int, list[tuple[int, int]]] = {}
    for where, upto, want in image.crcs:
        checks.setdefault(upto, []).append((where, want))
    crc = 0

    def check(block: int) -> None:
        for where, want in checks.get(block, ()):
            if crc != want:
                raise image._fail(where, "crc32", f"the CRC32 chunk says {want:#010x}, the {block} blocks before "
                                  f"it have {crc:#010x}")

    def write(fd: int) -> None:
        nonlocal crc
        os.ftruncate(fd, image.size)
        if check_crc:
            check(0)
        for first, count, kind, arg in image.chunks():
            hole = kind == "DONT_CARE" or (kind == "FILL" and arg == 0)
            for b in range(first, first + count, step):
                length = min(step, first + count - b) * bs
                if hole:
                    if check_crc:
                        crc = zlib.crc32(_ZERO_STEP[:length] if length <= len(_ZERO_STEP) else bytes(length), crc)
                else:
                    piece = image.pread(length, b * bs)
                    os.pwrite(fd, piece, b * bs)
                    if check_crc:
                        crc = zlib.crc32(piece, crc)
                if bar is not None:
                    bar.update(length)
            if check_crc:
                check(first + count)

    write_atomically(output, write)
    return image.size


def write_sparse(source: Image, output, *, block_size: int = 4096, holes: bool = False, crc: bool = False,
                 bar=None) -> dict:
    """Write ``source`` (any image) to ``output`` as an Android sparse image.

    Runs of one repeated 4-byte value become FILL chunks (zeros too, unless
    ``holes``: then zero runs are DONT_CARE, which a flasher skips), the
    rest RAW chunks of at most :data:`MAX_WRITE_CHUNK`; ``crc`` appends a
    CRC32 chunk over the whole image. The image's size must be a multiple of
    ``block_size`` (a multiple of 4). Returns the chunk counts.
    """
    if block_size <= 0 or block_size % 4:
        raise ImageError(f"block size {block_size} is not a positive multiple of 4")
    if source.size % block_size:
        raise ImageError(f"{source.path} is {source.size} bytes, not a multiple of the block size {block_size}: "
                         "pick a block size that divides it (--block-size)")
    blocks = source.size // block_size
    if blocks >= 1 << 32:
        raise ImageError(f"{source.path} has {blocks} blocks of {block_size}; a sparse image holds fewer than 2^32: "
                         "use a larger --block-size")
    counts = {name: 0 for name in CHUNK_NAMES.values()}

    def write(fd: int) -> None:
        pos = HEADER.size
        running = 0
        total_chunks = 0

        def emit(ctype: int, count: int, payload) -> None:
            nonlocal pos, total_chunks
            if ctype == RAW:
                body = payload
            elif ctype in (FILL, CRC32):
                body = struct.pack("<I", payload)
            else:
                body = b""
            os.pwrite(fd, CHUNK.pack(ctype, 0, count, CHUNK.size + len(body)) + body, pos)
            pos += CHUNK.size + len(body)
            total_chunks += 1
            counts[CHUNK_NAMES[ctype]] += 1

        pending: list = []  # the chunk being built: [type, blocks, data parts / value]
        step = max(1, (1 << 20) // block_size)
        for b in range(0, blocks, step):
            data = source.pread(min(step, blocks - b) * block_size, b * block_size)
            if crc:
                running = zlib.crc32(data, running)
            for k in range(0, len(data), block_size):
                blk = data[k : k + block_size]
                head = blk[:4]
                if blk == head * (block_size // 4):
                    value = struct.unpack("<I", head)[0]
                    ctype = DONT_CARE if holes and value == 0 else FILL
                else:
                    ctype, value = RAW, None
                if pending and pending[0] == ctype and (
                    (ctype == RAW and pending[1] * block_size < MAX_WRITE_CHUNK)
                    or (ctype == FILL and pending[2] == value) or ctype == DONT_CARE
                ):
                    pending[1] += 1
                    if ctype == RAW:
                        pending[2].append(blk)
                    continue
                if pending:
                    emit(pending[0], pending[1], b"".join(pending[2]) if pending[0] == RAW else pending[2])
                pending = [ctype, 1, [blk] if ctype == RAW else value]
            if bar is not None:
                bar.update(len(data))
        if pending:
            emit(pending[0], pending[1], b"".join(pending[2]) if pending[0] == RAW else pending[2])
        if crc:
            emit(CRC32, 0, running)
        os.pwrite(fd, HEADER.pack(MAGIC, MAJOR_VERSION, 0, HEADER.size, CHUNK.size, block_size, blocks,
                                  total_chunks, 0), 0)
        os.ftruncate(fd, pos)

    write_atomically(output, write)
    return counts
