"""Compress and decompress COW data chunks, with AOSP's stored-raw rule.

The five algorithms of the format, done by the libraries (zlib, brotli,
lz4, zstandard), never by hand:

* ``gz`` is a zlib stream (``compress2``), not gzip;
* ``lz4`` is a raw LZ4 block (no frame, no size prefix);
* ``zstd`` is one zstd frame, window limited to the chunk size as AOSP does.

Stored raw: a chunk whose compressed form is not smaller than the chunk is
stored as is, and a ``data_length`` equal to the chunk size means "raw" -
for lz4 and zstd in v2, and for every algorithm in v3. v2 gz and brotli
always store compressed data (4107 bytes for an incompressible 4 KiB block)
and are always decompressed.

Decompression is bounded: it never produces more than ``chunk_size + 1``
bytes, whatever a hostile file says, and a size other than the chunk size
is a :class:`CowFormatError` (rule ``decompressed-size``).
"""

from __future__ import annotations

import zlib

from dmuserd.snapshot._cow_format import Compression, CowError, CowFormatError

#: AOSP's default level per algorithm (CompressWorker::GetDefaultCompressionLevel)
DEFAULT_LEVEL = {
    Compression.NONE: 0,
    Compression.GZ: zlib.Z_BEST_COMPRESSION,
    Compression.BROTLI: 11,
    Compression.LZ4: 0,
    Compression.ZSTD: 3,
}


def parse_spec(spec: str) -> tuple[Compression, int | None]:
    """``"zstd"`` or ``"zstd,9"`` (AOSP's ``algorithm,level``) → (algorithm, level)."""
    name, _, level = str(spec).partition(",")
    algorithm = Compression.parse(name)
    if not level:
        return algorithm, None
    try:
        return algorithm, int(level)
    except ValueError:
        raise CowError(f"compression level {level!r} in {spec!r} is not an integer") from None


def stores_raw_when_equal(algorithm: Compression, version: int) -> bool:
    """Whether ``data_length == chunk size`` means the data is stored raw."""
    if algorithm == Compression.NONE:
        return True
    return version >= 3 or algorithm in (Compression.LZ4, Compression.ZSTD)


class Compressor:
    """Compress chunks for one file (algorithm, level and version fixed)."""

    def __init__(self, algorithm, level: int | None = None, *, version: int = 2) -> None:
        self.algorithm = Compression.parse(algorithm)
        self.level = DEFAULT_LEVEL[self.algorithm] if level is None else level
        self.version = version
        self._raw_rule = stores_raw_when_equal(self.algorithm, version)
        self._zstd = {}

    def compress(self, chunk: bytes) -> bytes:
        """The bytes to store for ``chunk`` (maybe ``chunk`` itself, raw)."""
        algorithm = self.algorithm
        if algorithm == Compression.NONE:
            return bytes(chunk)
        if algorithm == Compression.GZ:
            out = zlib.compress(chunk, self.level)
        elif algorithm == Compression.BROTLI:
            import brotli

            out = brotli.compress(bytes(chunk), quality=self.level)
        elif algorithm == Compression.LZ4:
            import lz4.block

            out = lz4.block.compress(chunk, store_size=False)
        else:
            out = self._zstd_for(len(chunk)).compress(chunk)
        if self._raw_rule and len(out) >= len(chunk):
            return bytes(chunk)
        return out

    def _zstd_for(self, size: int):
        # AOSP sets windowLog = log2(chunk size); one compressor per size.
        cctx = self._zstd.get(size)
        if cctx is None:
            import zstandard

            params = zstandard.ZstdCompressionParameters.from_level(
                self.level, window_log=max(10, size.bit_length() - 1), source_size=size
            )
            cctx = self._zstd[size] = zstandard.ZstdCompressor(compression_params=params)
        return cctx


def decompress(algorithm: Compression, version: int, data: bytes, chunk_size: int, *, offset: int = 0) -> bytes:
    """Decode one stored chunk to exactly ``chunk_size`` bytes.

    ``offset`` is the data's position in the file, for error messages.
    """
    if len(data) == chunk_size and stores_raw_when_equal(algorithm, version):
        return bytes(data)
    if algorithm == Compression.NONE:
        raise CowFormatError(
            offset, "decompressed-size", f"uncompressed data is {len(data)} bytes, the chunk is {chunk_size}"
        )
    try:
        out = _decode(algorithm, data, chunk_size)
    except _Oversize as exc:
        raise CowFormatError(
            offset, "decompressed-size", f"zstd frame declares {exc.args[0]} bytes, the chunk is {chunk_size}"
        ) from None
    except CowFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - each library has its own error type
        raise CowFormatError(
            offset, "corrupt-data", f"{algorithm.name.lower()} data of {len(data)} bytes does not decode: {exc}"
        ) from None
    if len(out) != chunk_size:
        raise CowFormatError(
            offset,
            "decompressed-size",
            f"{algorithm.name.lower()} data of {len(data)} bytes decodes to "
            f"{'more than ' + str(chunk_size) if len(out) > chunk_size else len(out)} bytes, the chunk is {chunk_size}",
        )
    return out


class _Oversize(Exception):
    """A frame declares more bytes than the chunk holds."""


def _decode(algorithm: Compression, data: bytes, chunk_size: int) -> bytes:
    limit = chunk_size + 1  # one byte more than allowed tells "too big" apart
    if algorithm == Compression.GZ:
        return zlib.decompressobj().decompress(data, limit)
    if algorithm == Compression.BROTLI:
        import brotli

        return brotli.Decompressor().process(bytes(data), output_buffer_limit=limit)[:limit]
    if algorithm == Compression.LZ4:
        import lz4.block

        return lz4.block.decompress(data, uncompressed_size=chunk_size)
    if algorithm == Compression.ZSTD:
        import zstandard

        # A frame that declares its size would be decoded whole regardless of
        # max_output_size: check the declared size first.
        declared = zstandard.frame_content_size(data)
        if declared > chunk_size:
            raise _Oversize(declared)
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
    raise CowFormatError(0, "compression", f"unknown compression algorithm {int(algorithm)}")
