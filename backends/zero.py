"""``zero``: a read-only device of zeros.

``--backend zero:size=1G``. Like ``/dev/zero`` with a size: writes, discards
and write-zeroes answer UNSUPPORTED (the client sees an I/O error), which
makes it a convenient read-only device for tests. It does not override
them, so a direct call raises :class:`~dmuserd.backends.Unsupported` too
(rather than quietly dropping the data, as ``null`` does).
"""

from __future__ import annotations

from dmuserd.backends.null import ReadsZeros


class ZeroBackend(ReadsZeros):
    name = "zero"
