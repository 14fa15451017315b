"""Entries of a zip file (a factory image, an OTA package) as images.

A *stored* entry is read in place, as a range of the zip. A compressed one
(factory images deflate their ``*.img``) cannot be read at random offsets:
it is decompressed once per process into an unlinked temporary file (in
``$TMPDIR``; a sparse image stays sparse there), which later opens share.
The zip's structures come from outside: whatever is wrong with them is an
:class:`~dmuserd.images.ImageFormatError` (kind ``zip``) naming the entry
and the rule.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
import threading
import zipfile
import zlib

import structlog

from dmuserd.images._image import Image, ImageError, ImageFormatError, RawImage

ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes
_extracted: dict[tuple, int] = {}  # (zip, entry, crc, size) -> fd of the unlinked temporary file
_extract_lock = threading.Lock()


def zip_error(path, offset: int, rule: str, detail: str) -> ImageFormatError:
    return ImageFormatError("zip", path, offset, rule, detail)


class SliceImage(Image):
    """``size`` bytes of ``lower`` from ``start`` (closed with it)."""

    kind = "zip entry"

    def __init__(self, lower: Image, start: int, size: int, path: str) -> None:
        self.lower, self.start, self.size, self.path = lower, start, size, path

    def readinto(self, buf: memoryview, offset: int, flags: int = 0) -> None:
        end = min(len(buf), max(0, self.size - offset))
        if end:
            self.lower.readinto(buf[:end], self.start + offset, flags)
        if end < len(buf):
            buf[end:] = bytes(len(buf) - end)

    def raw_file(self):
        below = self.lower.raw_file()
        return None if below is None else (below[0], below[1] + self.start)

    def close(self) -> None:
        self.lower.close()


class _ImageFile(io.RawIOBase):
    """An image as a read-only binary file (what :mod:`zipfile` wants)."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.image.size - self.pos))
        if n:
            self.image.readinto(memoryview(b).cast("B")[:n], self.pos)
            self.pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.image.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos


def is_zip(image: Image) -> bool:
    return image.size >= 4 and image.pread(4, 0) == ZIP_MAGIC


def _archive(image: Image, path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BufferedReader(_ImageFile(image), 64 << 10))
    except zipfile.BadZipFile as exc:
        raise zip_error(path, image.size, "zip-directory", f"no readable central directory ({exc}): the zip is "
                        "truncated or damaged") from None
    except (OSError, EOFError, ValueError, struct.error, NotImplementedError) as exc:
        raise zip_error(path, image.size, "zip-directory", f"the central directory is damaged ({exc})") from None


def entry_names(image: Image, path: str) -> list[str]:
    """The names of the zip's entries."""
    with _archive(image, path) as archive:
        return archive.namelist()


def zip_entry(image: Image, name: str, path: str) -> Image:
    """Entry ``name`` of the zip ``image`` (named ``path`` in messages), as an image.

    ``image`` belongs to the result from now on (closed with it; at once
    when the entry was decompressed to a temporary file).
    """
    where = f"{path}::{name}"
    try:
        with _archive(image, path) as archive:
            try:
                info = archive.getinfo(name)
            except KeyError:
                names = ", ".join(n for n in archive.namelist() if not n.endswith("/"))
                raise ImageError(f"{path} has no entry {name!r} (it has: {names or 'nothing'})") from None
            if info.flag_bits & 0x1:
                raise ImageError(f"{where} is encrypted in the zip; dmuserd reads unencrypted zips")
            if info.compress_type == zipfile.ZIP_STORED:
                start = _data_offset(image, info, path)
                return SliceImage(image, start, info.file_size, where)
            fd = _extract(archive, info, image, path)
    except BaseException:
        image.close()
        raise
    image.close()
    return RawImage(where, fd=fd)


def _data_offset(image: Image, info: zipfile.ZipInfo, path: str) -> int:
    """Where a stored entry's bytes start: after its local header, name and extra field."""
    header = image.pread(_LOCAL_HEADER.size, info.header_offset)
    if header[:4] != ZIP_MAGIC:
        raise zip_error(path, info.header_offset, "zip-local-header", f"the local header of {info.filename} is "
                        "missing")
    name_len, extra_len = _LOCAL_HEADER.unpack(header)[-2:]
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if start + info.file_size > image.size:
        raise zip_error(path, start, "zip-entry-range", f"{info.filename} ({info.file_size} bytes) runs past the end "
                        f"of the {image.size}-byte zip: it is truncated")
    return start


def _extract(archive: zipfile.ZipFile, info: zipfile.ZipInfo, image: Image, path: str) -> int:
    """A new descriptor of the entry decompressed into an unlinked temporary file (once per process)."""
    key = (os.path.realpath(path) if os.path.exists(path) else path, info.filename, info.CRC, info.file_size,
           info.header_offset)
    with _extract_lock:
        fd = _extracted.get(key)
        if fd is None:
            structlog.get_logger("dmuserd.images").info(
                "decompressing a zip entry to a temporary file", zip=path, entry=info.filename, bytes=info.file_size,
                directory=tempfile.gettempdir())
            out = tempfile.TemporaryFile(prefix="dmuserd-zip-")
            try:
                with archive.open(info) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as exc:
                out.close()
                raise zip_error(path, info.header_offset, "zip-entry-data", f"{info.filename} cannot be "
                                f"decompressed ({exc}): the zip is damaged") from None
            except BaseException:
                out.close()
                raise
            fd = os.dup(out.fileno())
            out.close()
            _extracted[key] = fd
        return os.dup(fd)
