"""Slotted channels: dm-user headers on the socket, the data in shared memory (sans I/O).

The NBD export's plugin and the daemon both map one *pool*: a memfd the
daemon creates, cut into ``slots`` slots of ``slot_size`` bytes, the way
ublk shares its I/O buffers with its server. On a *slotted* channel:

1. the daemon speaks first, once: :meth:`PoolLayout.encode` (32 bytes:
   magic, version, slots, slot_size) with the pool's descriptor attached
   (``SCM_RIGHTS``);
2. every request is the dm-user header followed by a *slot word*
   (:data:`SLOT_STRUCT`, a little-endian u64): the index of the slot that
   holds a WRITE's data or is to receive a READ's, or :data:`NO_SLOT`, and
   the message is then exactly as on a plain channel (a WRITE's payload
   follows the word, a READ's data follows its answer);
3. every answer is the plain dm-user answer header; a successful READ with
   a slot carries no bytes after it: its data is in the slot.

Only a READ or a WRITE names a slot, of at most ``slot_size`` bytes, and
a slot belongs to one request at a time, whichever channel of the pool
sent it, from its header until its answer: :class:`SlotPool` checks all
three and refuses with :class:`~dmuserd.protocol.ProtocolError` (field
``slot`` or ``len``), which ends that channel only. The daemon never
trusts the slot's contents either: a WRITE's data is whatever the slot
holds while the backend takes it, as with any buffer a client can still
change.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

from dmuserd.protocol._constants import RequestType
from dmuserd.protocol._errors import ProtocolError

if TYPE_CHECKING:
    from mmap import mmap

    #: What a pool's memory or a READ's answer may be (the protocol imports only the standard library).
    Buffer: TypeAlias = "bytes | bytearray | memoryview | mmap"

#: The slot word after each request header on a slotted channel.
SLOT_STRUCT = struct.Struct("<Q")
#: The slot word's value for "no slot": the data travels on the socket.
NO_SLOT = (1 << 64) - 1
#: b"dmuserdP" as a little-endian u64: the first field of a pool announcement.
POOL_MAGIC = int.from_bytes(b"dmuserdP", "little")
#: The version of this framing; a plugin that does not know it uses a plain channel.
POOL_VERSION = 1

_LAYOUT = struct.Struct("<4Q")
#: Bytes of a pool announcement on the wire.
ANNOUNCEMENT_SIZE = _LAYOUT.size
_IO_TYPES = frozenset({int(RequestType.READ), int(RequestType.WRITE)})


class PoolLayout(NamedTuple):
    """How a pool is cut: ``slots`` slots of ``slot_size`` bytes, slot ``i`` at ``i * slot_size``."""

    slots: int
    slot_size: int

    @property
    def size(self) -> int:
        """Bytes the pool's memory must hold at least."""
        return self.slots * self.slot_size

    def encode(self) -> bytes:
        return _LAYOUT.pack(POOL_MAGIC, POOL_VERSION, self.slots, self.slot_size)

    @classmethod
    def decode(cls, data: bytes) -> PoolLayout:
        """The layout announced in ``data`` (:data:`ANNOUNCEMENT_SIZE` bytes); ProtocolError if it is none."""
        if len(data) != _LAYOUT.size:
            raise ProtocolError("pool", len(data), f"an announcement is {_LAYOUT.size} bytes")
        magic, version, slots, slot_size = _LAYOUT.unpack(data)
        if magic != POOL_MAGIC or version != POOL_VERSION:
            raise ProtocolError("pool", (magic, version), f"not a version {POOL_VERSION} pool announcement")
        if not slots or not slot_size or slot_size % 512:
            raise ProtocolError("pool", (slots, slot_size), "no slots, or a slot that is not whole sectors")
        return cls(slots, slot_size)


class SlotPool:
    """The daemon's side of a pool: views of its slots and which requests hold them.

    One object per pool, shared by every channel that maps it (a slot is
    busy whichever channel took it). ``buffer`` is the pool's memory, at
    least ``layout.size`` bytes, writable.
    """

    def __init__(self, buffer: Buffer, layout: PoolLayout) -> None:
        view = memoryview(buffer).cast("B")
        if view.readonly or len(view) < layout.size:
            raise ValueError(f"a pool of {layout.slots} x {layout.slot_size} bytes needs {layout.size} "
                             f"writable bytes, got {len(view)}{' read-only' if view.readonly else ''}")
        self.layout = layout
        self.slot_size = layout.slot_size
        size = layout.slot_size
        self._views = [view[i * size:(i + 1) * size] for i in range(layout.slots)]
        self._busy: set[int] = set()

    @property
    def busy(self) -> int:
        """Slots held by requests now."""
        return len(self._busy)

    def take(self, slot: int, rtype: int, length: int) -> memoryview:
        """Slot ``slot`` for a request of ``rtype`` and ``length`` bytes: its first ``length`` bytes.

        Raises :class:`ProtocolError` if the request may not use it: not a
        READ or WRITE, no such slot, longer than a slot, or the slot is held.
        """
        if rtype not in _IO_TYPES:
            raise ProtocolError("slot", slot, f"a request of type {rtype} names a slot (only READ and WRITE may)")
        if slot >= len(self._views):
            raise ProtocolError("slot", slot, f"no such slot: the pool has {len(self._views)}")
        if length > self.slot_size:
            raise ProtocolError("len", length, f"longer than a slot ({self.slot_size} bytes)")
        if slot in self._busy:
            raise ProtocolError("slot", slot, "the slot is held by another request not answered yet")
        self._busy.add(slot)
        return self._views[slot][:length]

    def fill(self, slot: int, payload: Buffer | list[Buffer]) -> None:
        """Copy a READ's answer (a buffer, or a list of buffers in order) into ``slot``."""
        dst = self._views[slot]
        if isinstance(payload, list):
            pos = 0
            for piece in payload:
                piece = memoryview(piece).cast("B")
                dst[pos:pos + len(piece)] = piece
                pos += len(piece)
        elif type(payload) is bytes:
            dst[:len(payload)] = payload
        else:
            piece = memoryview(payload).cast("B")
            dst[:len(piece)] = piece

    def release(self, slot: int) -> None:
        """The request holding ``slot`` is answered (or gone): the slot is free again."""
        self._busy.discard(slot)
