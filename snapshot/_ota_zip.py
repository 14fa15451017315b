"""An OTA package (``ota.zip``): where its ``payload.bin`` is, and what the package says about it.

A build server's OTA is a zip holding ``payload.bin`` (*stored*, not
compressed, so update_engine can stream it from any offset),
``payload_properties.txt`` (the payload's size and SHA-256, and those of its
metadata, base64) and ``META-INF/com/android/metadata`` (``key=value``
lines: the pre and post builds, the OTA type, ...). dmuserd reads the
payload in place through :mod:`dmuserd.images` (a stored zip entry is a
range of the zip; a compressed one, which repackaged zips may have, is
decompressed once to a temporary file). Nothing is extracted to the
user's disk.

A plain ``payload.bin`` works everywhere a zip does (the whole file, with no
properties).

The zip comes from outside: every structure is checked, and what is wrong
comes out as :class:`OtaPackageError` naming the file, the entry and the rule.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
import zlib
from dataclasses import dataclass, field

from dmuserd.images import Image, ImageError, RawImage
from dmuserd.images._zip import SliceImage, is_zip, zip_entry
from dmuserd.snapshot.payload import PayloadError

PAYLOAD_NAME = "payload.bin"
PROPERTIES_NAME = "payload_properties.txt"
METADATA_NAME = "META-INF/com/android/metadata"
#: small text entries we read whole: no more than this
MAX_TEXT_ENTRY = 1 << 20


class OtaPackageError(PayloadError):
    """An OTA zip that cannot be used: what is wrong with which entry."""


@dataclass(frozen=True)
class OtaPackage:
    path: str
    properties: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


@dataclass
class PayloadLocation:
    """A payload's bytes: ``image`` (``size`` bytes), in ``path``.

    ``package`` is None for a bare ``payload.bin``; for a zip, its
    ``properties`` and ``metadata`` (``{}`` when the entry is missing).
    """

    path: str
    image: Image
    package: OtaPackage | None = None

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def offset(self) -> int | None:
        """Where the payload starts in ``path`` (None: a compressed entry, read from a temporary copy)."""
        if self.package is None:
            return 0
        return self.image.start if isinstance(self.image, SliceImage) else None

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end)."""
        length = max(0, min(length, self.size - offset))
        return self.image.pread(length, offset) if length else b""

    def close(self) -> None:
        self.image.close()


def locate_payload(path) -> PayloadLocation:
    """The payload inside ``path`` (an OTA zip) or ``path`` itself (a payload.bin); close it when done."""
    path = os.fspath(path)
    try:
        image = RawImage(path)
    except ImageError as exc:
        raise OtaPackageError(str(exc)) from None
    except OSError as exc:
        raise OtaPackageError(f"cannot open {path}: {exc.strerror}; check the path") from None
    try:
        if not is_zip(image):
            return PayloadLocation(path, image)
        with zipfile.ZipFile(path) as archive:
            if PAYLOAD_NAME not in archive.namelist():
                raise OtaPackageError(f"{path} is a zip without {PAYLOAD_NAME}: is it an A/B OTA package?")
            package = OtaPackage(path, _key_values(archive, PROPERTIES_NAME, path),
                                 _key_values(archive, METADATA_NAME, path))
        entry = zip_entry(image, PAYLOAD_NAME, path)  # owns image from here
    except ImageError as exc:
        raise OtaPackageError(str(exc)) from None
    except zipfile.BadZipFile as exc:
        image.close()
        raise OtaPackageError(f"{path} is not a readable zip ({exc})") from None
    except (OSError, EOFError, ValueError) as exc:
        image.close()
        raise OtaPackageError(f"cannot read the zip {path}: {exc}") from None
    except BaseException:
        image.close()
        raise
    return PayloadLocation(path, entry, package)


def _key_values(archive: zipfile.ZipFile, name: str, path: str) -> dict:
    """``key=value`` lines of a small text entry ({} when absent)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        return {}
    if info.file_size > MAX_TEXT_ENTRY:
        raise OtaPackageError(f"{path}: {name} is {info.file_size} bytes, over the {MAX_TEXT_ENTRY} expected")
    try:
        text = archive.read(name).decode("utf-8")
    except (ValueError, zlib.error, zipfile.BadZipFile, NotImplementedError, EOFError) as exc:  # (UnicodeDecodeError)
        raise OtaPackageError(f"{path}: {name} is not readable text ({exc})") from None
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    return values


# --- payload_properties.txt ------------------------------------------------------------


def _b64_digest(value: str, key: str, path: str) -> bytes:
    try:
        digest = base64.b64decode(value, validate=True)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise OtaPackageError(f"{path}: {PROPERTIES_NAME} {key}={value!r} is not a base64 SHA-256")
    return digest


def _int(value: str, key: str, path: str) -> int:
    if not value.isdigit():
        raise OtaPackageError(f"{path}: {PROPERTIES_NAME} {key}={value!r} is not a size")
    return int(value)


def check_metadata(location: PayloadLocation, read, metadata_size: int) -> list[str]:
    """Check METADATA_SIZE/METADATA_HASH (header + manifest); returns what was checked.

    ``read(offset, length)`` reads the payload.
    """
    props = location.package.properties if location.package else {}
    checked = []
    if "METADATA_SIZE" in props:
        want = _int(props["METADATA_SIZE"], "METADATA_SIZE", location.path)
        if want != metadata_size:
            raise OtaPackageError(f"{location.path}: {PROPERTIES_NAME} says the metadata is {want} bytes, the "
                                  f"payload's is {metadata_size}: the package is inconsistent; fetch it again")
        checked.append("METADATA_SIZE")
    if "METADATA_HASH" in props:
        want = _b64_digest(props["METADATA_HASH"], "METADATA_HASH", location.path)
        if hashlib.sha256(read(0, metadata_size)).digest() != want:
            raise OtaPackageError(f"{location.path}: the payload's metadata does not have the METADATA_HASH of "
                                  f"{PROPERTIES_NAME}: the package is corrupt; fetch it again")
        checked.append("METADATA_HASH")
    return checked


def check_file(location: PayloadLocation, read, *, bar=None, chunk: int = 1 << 20) -> list[str]:
    """Check FILE_SIZE/FILE_HASH (the whole payload.bin); returns what was checked."""
    props = location.package.properties if location.package else {}
    checked = []
    if "FILE_SIZE" in props:
        want = _int(props["FILE_SIZE"], "FILE_SIZE", location.path)
        if want != location.size:
            raise OtaPackageError(f"{location.path}: {PROPERTIES_NAME} says the payload is {want} bytes, it is "
                                  f"{location.size}: the package is inconsistent; fetch it again")
        checked.append("FILE_SIZE")
    if "FILE_HASH" in props:
        want = _b64_digest(props["FILE_HASH"], "FILE_HASH", location.path)
        h = hashlib.sha256()
        for pos in range(0, location.size, chunk):
            data = read(pos, min(chunk, location.size - pos))
            h.update(data)
            if bar is not None:
                bar.update(len(data))
        if h.digest() != want:
            raise OtaPackageError(f"{location.path}: {PAYLOAD_NAME} does not have the FILE_HASH of "
                                  f"{PROPERTIES_NAME}: the package is corrupt; fetch it again")
        checked.append("FILE_HASH")
    return checked
