"""``zero``: a read-only device of zeros.

``--backend zero:size=1G``. Like ``/dev/zero`` with a size: writes, discards
and write-zeroes answer UNSUPPORTED (the client sees an I/O error), which
makes it a convenient read-only device for tests.
"""

from __future__ import annotations

from dmuserd.backends._api import Op
from dmuserd.backends.null import NullBackend


class ZeroBackend(NullBackend):
    name = "zero"

    def __init__(self, size: int, block_size: int = 512) -> None:
        super().__init__(size, block_size, disabled_ops={Op.WRITE, Op.DISCARD, Op.WRITE_ZEROES})
