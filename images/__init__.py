"""Android images read in place: raw files, sparse images, ``super`` partitions, zip entries.

The old build an OTA applies to rarely comes as a folder of raw partition
images: a factory image is a zip of Android **sparse** images, a device
dump is one **super** image whose LP metadata lays out the logical
partitions. This package reads all of them as :class:`Image` objects
without unpacking anything (:mod:`.sparse`, :mod:`.lp`, zip entries), and
names any of them with one string, a *locator*::

    system.img                      a raw or sparse image (detected by its magic)
    super.img::system_a             a logical partition of a super image (raw or sparse)
    factory.zip::system.img         an entry of a zip (itself raw or sparse)
    factory.zip::super.img::vendor_a

A path that exists as a file is always taken whole, even with ``::`` in
its name. :func:`open_image` opens a locator; the ``sparse`` and ``super``
backends, ``dmuserd ota --source`` and every ``--base`` of ``dmuserd cow``
go through it.

It is the lowest layer that knows these formats: it imports nothing of
dmuserd but :mod:`dmuserd.errors`, so the backends (``backends/``) and the
snapshot code (``snapshot/``) both build on it. Hostile input is the
normal case here: what breaks a rule is an :class:`ImageFormatError`
naming the file, the byte offset and the rule; a missing slot, partition
or entry an :class:`ImageError`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dmuserd.images._image import Image, ImageError, ImageFormatError, RawImage

__all__ = ["SEP", "SPARSE_MAGIC", "Image", "ImageError", "ImageFormatError", "RawImage", "not_raw_reason",
           "open_image", "open_super", "split_locator"]

#: separates a container (zip, super image) from what is taken out of it
SEP = "::"

#: the first four bytes of an Android sparse image (little-endian; :mod:`.sparse` reads the rest): here, so
#: that telling a sparse image from a raw one (:func:`not_raw_reason`, every ``dmuserd cow merge``) loads
#: no format module
SPARSE_MAGIC = 0xED26FF3A

# The image classes are loaded on first use (PEP 562): a command that only asks
# :func:`not_raw_reason` (``dmuserd cow merge``'s start-up) loads none of them.
_LAZY = ("Image", "ImageError", "ImageFormatError", "RawImage")


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from dmuserd.images import _image

    value = getattr(_image, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def split_locator(locator) -> tuple[str, list[str]]:
    """``"a.zip::super.img::system_a"`` → ``("a.zip", ["super.img", "system_a"])``; an existing path stays whole."""
    text = os.fspath(locator)
    if SEP not in text or os.path.exists(text):
        return text, []
    head, *names = text.split(SEP)
    return head, names


def open_image(locator, *, slot=None) -> Image:
    """Open what ``locator`` names (see the module docstring) for reading.

    Sparse images are read as the raw images they stand for. ``slot``
    picks the metadata slot of a super image whose partition is named
    (default: the slot the partition's suffix names, else a).
    """
    from dmuserd.images._image import RawImage

    head, names = split_locator(locator)
    image: Image = RawImage(head)
    where = head
    try:
        image = _unsparse(image, where)
        for name in names:
            image = _member(image, name, where, slot)
            where = f"{where}{SEP}{name}"
            image = _unsparse(image, where)
    except BaseException:
        image.close()
        raise
    return image


def open_super(locator):
    """The :class:`~dmuserd.images.lp.SuperImage` at ``locator`` (raw or sparse)."""
    from dmuserd.images.lp import SuperImage

    return SuperImage(open_image(locator), os.fspath(locator))


def _unsparse(image: Image, where: str) -> Image:
    from dmuserd.images.sparse import SparseImage, is_sparse

    return SparseImage(image, where) if is_sparse(image) else image


def _member(image: Image, name: str, where: str, slot) -> Image:
    """``name`` taken out of ``image``: a zip entry or a super image's logical partition."""
    from dmuserd.images._image import ImageError
    from dmuserd.images._zip import is_zip, zip_entry
    from dmuserd.images.lp import LpFormatError, SuperImage

    if is_zip(image):
        return zip_entry(image, name, where)
    try:
        super_image = SuperImage(image, where)
    except LpFormatError as exc:
        if exc.rule != "geometry-magic":
            raise
        raise ImageError(f"{where} is neither a zip nor a super image (no LP geometry, no zip header): there is no "
                         f"{name!r} to take out of it") from None
    return super_image.partition(name, slot)


def not_raw_reason(path) -> str | None:
    """Why ``path`` cannot be written in place as a raw image, or None when it can (a plain file or device).

    None too where it cannot be read at all: opening it as the base says what is wrong."""
    head, names = split_locator(path)
    if names:
        return f"{path} is inside another image ({SEP} names a zip entry or a super partition), not a file"
    try:
        # O_NONBLOCK: naming a FIFO must not block (its pread fails: ESPIPE)
        fd = os.open(head, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        start = os.pread(fd, 4, 0)
    except OSError:  # a directory, a FIFO
        return None
    finally:
        os.close(fd)
    if start == SPARSE_MAGIC.to_bytes(4, "little"):
        return f"{path} is an Android sparse image"
    return None
