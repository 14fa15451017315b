"""Serving a read-only :class:`~dmuserd.images.Image` (the ``sparse`` and ``super`` backends).

A read fills a new buffer through :meth:`Image.readinto`, first on the
event loop with ``RWF_NOWAIT`` (the page-cache case: no thread hop), and
when that would block, again in a worker thread. Writes are not offered:
an image read in place (a sparse file's chunks, a partition's extents in a
super image) is the old build, and stays as it is.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from dmuserd.backends._api import Backend, BackendError
from dmuserd.errors import DmuserdError

if TYPE_CHECKING:
    from dmuserd.images import Image

_Opened = TypeVar("_Opened")


class ImageBackend(Backend):
    """Read-only serving of an image; subclasses open it in ``from_options``."""

    def __init__(self, image: Image) -> None:
        self.image = image
        try:
            super().__init__(size=image.size, block_size=512)
        except BackendError as exc:
            image.close()
            raise BackendError(f"backend {self.name!r}: {image.path}: {exc}") from None
        self._nowait = True

    @staticmethod
    def opened(name: str, opener: Callable[..., _Opened], *args: Any, **kwargs: Any) -> _Opened:
        """``opener(*args, **kwargs)``, its typed errors raised as :class:`BackendError` naming the backend."""
        try:
            return opener(*args, **kwargs)
        except DmuserdError as exc:
            raise BackendError(f"backend {name!r}: {exc}") from None

    async def read(self, offset: int, length: int) -> memoryview:
        buf = bytearray(length)
        view = memoryview(buf)
        if self._nowait:
            try:
                self.image.readinto(view, offset, os.RWF_NOWAIT)
                return view
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                self._nowait = False
        await trio.to_thread.run_sync(self.image.readinto, view, offset)
        return view

    async def close(self) -> None:
        self.image.close()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "image": self.image.describe()}
