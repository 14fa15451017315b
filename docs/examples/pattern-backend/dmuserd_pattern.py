"""``pattern``: a read-only disk whose every 8 bytes hold their own offset.

An example of a dmuserd backend in a package of its own (see the README's
"Writing a backend"). Like nbdkit's pattern plugin, it needs no storage and
lets a client check that it reads exactly the bytes it asked for: the 8
bytes at offset ``n`` (a multiple of 8) are ``n`` as a big-endian u64.

    pip install docs/examples/pattern-backend
    dmuserd serve --backend pattern:size=1G --export fuse:/run/dmuserd/fuse

It overrides only ``read``, so that is its only capability: writes, flushes,
discards and write-zeroes answer UNSUPPORTED (EOPNOTSUPP over NBD; EIO
through FUSE and loop).

``test_dmuserd_pattern.py`` beside it checks it with dmuserd's backend
conformance suite (:mod:`dmuserd.backends.testing`): run ``python -m pytest``
in this folder.
"""

from __future__ import annotations

import sys
from array import array

from dmuserd.backends import Backend, Options


class PatternBackend(Backend):
    name = "pattern"

    @classmethod
    def from_options(cls, options: dict[str, str]) -> PatternBackend:
        opts = Options(cls.name, options)  # typed options, unknown keys refused by name
        size = opts.size("size", required=True)
        block_size = opts.size("block_size", 512)
        opts.finish()
        return cls(size=size, block_size=block_size)

    async def read(self, offset: int, length: int) -> bytes:
        # The daemon only asks for whole blocks inside the device, so offset
        # and length are multiples of 512 here: no checks needed.
        words = array("Q", range(offset, offset + length, 8))
        if sys.byteorder == "little":
            words.byteswap()  # to big-endian
        return words.tobytes()
