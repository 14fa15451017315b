"""The merge's scratch window in a COW file (snapuserd's read-ahead buffer).

The ``buffer_size`` bytes right after the COW header are scratch space for
an in-place merge (``../shared/specs/android-cow.md``). Layout, as
snapuserd's read-ahead thread uses it (``header_size`` = ``hs``, ``bs`` the
block size):

* ``hs``: the state byte: 0 none, 1 in progress, 2 the window is complete
  and durable (its data may be trusted after a crash);
* ``hs + 1``: entries ``{u64 new_block, u64 file_offset}`` ending with an
  all-zero entry; ``file_offset`` is where that block's data lies in the
  COW file;
* ``hs + meta_size`` with ``meta_size = buffer_size * 16 / bs``: up to
  ``(buffer_size - meta_size) / bs`` blocks of data (510 for 2 MiB).

The window holds the *new* contents of the ordered (Copy/Xor) ops being
merged: once the state byte says 2, a crash while those ops overwrite the
base is recovered by writing the window again, whatever the base holds.

One addition of ours, invisible to snapuserd (it never reads past the
terminating entry): the last 8 bytes of the metadata area hold a tag and a
CRC-32C of the entries and the data, so a resume can tell a damaged window
from a good one. A window without the tag (written by snapuserd) is
accepted as it is.

This module only lays the bytes out and parses them; the merge engine
decides when to write and sync them.
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass

STATE_NONE = 0
STATE_IN_PROGRESS = 1
STATE_DONE = 2

ENTRY = struct.Struct("<QQ")
#: b"DMWC": "dmuserd window CRC"
CRC_TAG = 0x43574D44
_TAG = struct.Struct("<II")


@dataclass(frozen=True)
class ScratchLayout:
    """Where the parts of the scratch window lie in one COW file."""

    header_size: int
    buffer_size: int
    block_size: int

    @property
    def state_offset(self) -> int:
        return self.header_size

    @property
    def meta_offset(self) -> int:
        return self.header_size + 1

    @property
    def meta_size(self) -> int:
        return self.buffer_size * ENTRY.size // self.block_size

    @property
    def data_offset(self) -> int:
        return self.header_size + self.meta_size

    @property
    def tag_offset(self) -> int:
        return self.header_size + self.meta_size - _TAG.size

    @property
    def capacity(self) -> int:
        """Blocks one window holds (0: this file has no usable scratch space)."""
        if self.meta_size < 1 + 2 * ENTRY.size + _TAG.size:
            return 0
        by_data = (self.buffer_size - self.meta_size) // self.block_size
        # entries, the terminator and the tag must end before the data
        by_meta = (self.meta_size - 1 - _TAG.size) // ENTRY.size - 1
        return max(0, min(by_data, by_meta))

    def entries_bytes(self, new_blocks) -> bytes:
        """The entries for a window of ``new_blocks`` (in order), with the terminator."""
        blocks = array("Q", new_blocks)
        n, start, bs = len(blocks), self.data_offset, self.block_size
        entries = array("Q", bytes(16 * (n + 1)))  # {new_block, file_offset} pairs, then a zero pair
        entries[0 : 2 * n : 2] = blocks
        entries[1 : 2 * n : 2] = array("Q", range(start, start + n * bs, bs))
        if sys.byteorder == "big":
            entries.byteswap()
        return entries.tobytes()

    def tag_bytes(self, crc: int) -> bytes:
        return _TAG.pack(CRC_TAG, crc & 0xFFFFFFFF)

    def parse_entries(self, meta: bytes) -> list[int] | str:
        """New blocks of the window whose metadata area (from ``meta_offset``) is
        ``meta``, or a string saying what is wrong with it."""
        blocks: list[int] = []
        limit = self.capacity
        for i in range(limit + 1):
            new_block, file_offset = ENTRY.unpack_from(meta, i * ENTRY.size)
            if new_block == 0 and file_offset == 0:
                return blocks if blocks else "the window has no entries"
            want = self.data_offset + i * self.block_size
            if file_offset != want:
                return (f"entry {i} (new block {new_block}) says its data is at {file_offset}; "
                        f"the window's block {i} is at {want}")
            blocks.append(new_block)
        return f"the entries run past the window's {limit} blocks without an end marker"

    def parse_tag(self, raw: bytes) -> int | None:
        """The CRC-32C recorded by us, or None when the window carries no tag."""
        tag, crc = _TAG.unpack(raw)
        return crc if tag == CRC_TAG else None
