"""``super``: one logical partition of a super image (dynamic partitions), read through its extents.

``--backend super:path=super.img,partition=system_a[,slot=a]``

``path`` is a super image, raw or sparse (or any locator of
:mod:`dmuserd.images`, such as ``factory.zip::super.img``); ``partition``
the logical partition's name as the LP metadata has it; ``slot`` the
metadata slot to read it from (default: the one its suffix names, ``_b``
→ b, else a). The metadata is checked (checksums, tables, extents inside
the image; a bad primary copy falls back to its backup, as liblp does)
and reads go to the partition's extents in place. Read-only.
"""

from __future__ import annotations

from typing import Self

from dmuserd.backends._image import ImageBackend
from dmuserd.backends.options import Options


class SuperBackend(ImageBackend):
    name = "super"

    @classmethod
    def from_options(cls, options: dict[str, str]) -> Self:
        from dmuserd.images import open_super

        opts = Options(cls.name, options)
        path = opts.str("path", required=True)
        partition = opts.str("partition", required=True)
        slot = opts.str("slot")
        opts.finish()
        super_image = cls.opened(cls.name, open_super, path)
        try:
            return cls(cls.opened(cls.name, super_image.partition, partition, slot))
        except BaseException:
            super_image.close()
            raise
