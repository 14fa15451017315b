"""``sparse``: an Android sparse image served as the raw image it stands for.

``--backend sparse:path=system.img``

The chunk headers are read and checked once when the backend opens (a bad
image is refused naming the offset and the rule); each read then bisects
the chunk index and copies RAW data straight from the file, FILL and
DONT_CARE chunks being filled in memory (:mod:`dmuserd.images.sparse`).
Nothing is unpacked. Read-only. A raw image given by mistake is refused
(serve it with the ``file`` backend).
"""

from __future__ import annotations

from typing import Self

from dmuserd.backends._api import BackendError
from dmuserd.backends._image import ImageBackend
from dmuserd.backends.options import Options


class SparseBackend(ImageBackend):
    name = "sparse"

    @classmethod
    def from_options(cls, options: dict[str, str]) -> Self:
        from dmuserd.images import RawImage
        from dmuserd.images.sparse import SparseImage, is_sparse

        opts = Options(cls.name, options)
        path = opts.str("path", required=True)
        opts.finish()
        raw = cls.opened(cls.name, RawImage, path)
        if not is_sparse(raw):
            raw.close()
            raise BackendError(f"backend 'sparse': {path} is not an Android sparse image (no sparse magic): serve a "
                               "raw image with --backend file:path=...,readonly=1")
        return cls(cls.opened(cls.name, SparseImage, raw, path))
