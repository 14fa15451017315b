"""Super images for tests, written with dmuserd's own LP writer (:mod:`dmuserd.images.lp`).

:class:`SuperBuilder` lays partitions out the way lpmake does (after the
metadata area, aligned), writes their data, the geometry and its backup,
and each slot's metadata and its backup; :meth:`SuperBuilder.empty` writes
a ``super_empty.img``. :func:`metadata_bytes` takes plain tuples (group by
index) and can make header fields wrong on purpose, checksums made right
again, so tests reach every rule of the reader.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from dmuserd.images import lp

GEOMETRY_MAGIC = lp.GEOMETRY_MAGIC
HEADER_MAGIC = lp.HEADER_MAGIC
SECTOR = lp.SECTOR
RESERVED = lp.RESERVED_BYTES
GEOMETRY_SIZE = lp.GEOMETRY_SIZE


def geometry_bytes(max_size: int, slots: int, block_size: int, *, magic: int = GEOMETRY_MAGIC,
                   struct_size: int = 52) -> bytes:
    raw = bytearray(lp.geometry_bytes(max_size, slots, block_size))
    struct.pack_into("<II", raw, 0, magic, struct_size)
    return lp.with_geometry_checksum(raw)


@dataclass
class Part:
    name: str
    extents: list  # [(num_sectors, target_type, target_data, target_source)]
    group: int = 0
    attributes: int = 0


@dataclass
class Meta:
    partitions: list[Part]
    groups: list = field(default_factory=lambda: [("default", 0, 0)])  # (name, flags, maximum_size)
    block_devices: list = field(default_factory=list)  # (first_sector, alignment, offset, size, name, flags)
    minor: int = 2
    flags: int = 0

    def metadata(self, slot: int = 0) -> lp.Metadata:
        """As dmuserd's typed metadata (a group index past the table becomes group 0: patch it after)."""
        groups = [lp.Group(*g) for g in self.groups]
        parts = [lp.Partition(p.name, p.attributes, groups[p.group if p.group < len(groups) else 0].name,
                              tuple(lp.Extent(*e) for e in p.extents)) for p in self.partitions]
        devices = [lp.BlockDevice(*d) for d in self.block_devices]
        return lp.Metadata(slot, 0, "primary", 10, self.minor, 0, 0, self.flags, parts, groups, devices, [])


def metadata_bytes(meta: Meta, *, magic: int = HEADER_MAGIC, major: int = 10, header_size: int | None = None,
                   entry_sizes=(52, 24, 48, 64)) -> bytes:
    """A metadata copy by dmuserd's writer, then the fields asked for made wrong, checksums right again."""
    blob = bytearray(lp.metadata_bytes(meta.metadata()))
    actual = struct.unpack_from("<I", blob, 8)[0]
    partitions_at = actual + struct.unpack_from("<I", blob, 80)[0]
    for i, p in enumerate(meta.partitions):
        struct.pack_into("<I", blob, partitions_at + i * 52 + 48, p.group)
    struct.pack_into("<IH", blob, 0, magic, major)
    for k, size in enumerate(entry_sizes):
        struct.pack_into("<I", blob, 80 + 12 * k + 8, size)
    if header_size is not None and header_size != actual:
        blob = blob[:actual][:header_size].ljust(header_size, b"\0") + blob[actual:]
        struct.pack_into("<I", blob, 8, header_size)
    return lp.with_metadata_checksums(blob)


class SuperBuilder:
    """A super image: partitions allocated one after another (aligned) after the metadata area."""

    def __init__(self, *, size: int = 32 << 20, slots: int = 2, max_size: int = 65536, block_size: int = 4096,
                 alignment: int = 1 << 20, minor: int = 2, flags: int = 1, name: str = "super") -> None:
        self.size, self.slots, self.max_size, self.block_size = size, slots, max_size, block_size
        self.alignment, self.minor, self.flags, self.name = alignment, minor, flags, name
        region = RESERVED + 2 * GEOMETRY_SIZE + 2 * slots * max_size
        self.first_sector = -(-region // alignment) * alignment // SECTOR
        self.next_sector = self.first_sector
        self.groups = [("default", 0, 0)]
        self.parts: list[Part] = []
        self.data: list[tuple[int, bytes]] = []  # (byte offset in super, data)

    def add_group(self, name: str, maximum_size: int = 0, flags: int = 0) -> int:
        self.groups.append((name, flags, maximum_size))
        return len(self.groups) - 1

    def add_partition(self, name: str, data: bytes = b"", *, group: int = 0, attributes: int = 1,
                      pieces: int = 1, zero_sectors: int = 0) -> Part:
        """``data`` (a multiple of 512 bytes) in ``pieces`` extents with a gap between them, then
        ``zero_sectors`` of a zero extent."""
        assert len(data) % SECTOR == 0
        sectors = len(data) // SECTOR
        extents = []
        done = 0
        for k in range(pieces):
            count = sectors // pieces + (sectors % pieces if k == pieces - 1 else 0)
            if not count:
                continue
            start = self.next_sector
            extents.append((count, 0, start, 0))
            self.data.append((start * SECTOR, data[done * SECTOR : (done + count) * SECTOR]))
            done += count
            end = (start + count) * SECTOR
            self.next_sector = -(-end // self.alignment) * self.alignment // SECTOR + (8 if pieces > 1 else 0)
        if zero_sectors:
            extents.append((zero_sectors, 1, 0, 0))
        assert self.next_sector * SECTOR <= self.size, "super too small"
        part = Part(name, extents, group, attributes)
        self.parts.append(part)
        return part

    def meta(self) -> Meta:
        device = (self.first_sector, self.alignment, 0, self.size, self.name, 0)
        return Meta(list(self.parts), list(self.groups), [device], self.minor, self.flags)

    def image(self, *, slot_metas: dict | None = None, geometry: bytes | None = None,
              backup_geometry: bytes | None = None) -> bytearray:
        """The whole super image; ``slot_metas`` {slot: metadata bytes} replaces a slot's copies."""
        out = bytearray(self.size)
        geo = geometry if geometry is not None else geometry_bytes(self.max_size, self.slots, self.block_size)
        out[RESERVED : RESERVED + GEOMETRY_SIZE] = geo
        backup = backup_geometry if backup_geometry is not None else geo
        out[RESERVED + GEOMETRY_SIZE : RESERVED + 2 * GEOMETRY_SIZE] = backup
        default = metadata_bytes(self.meta())
        assert len(default) <= self.max_size
        for slot in range(self.slots):
            blob = (slot_metas or {}).get(slot, default)
            for copy in (slot, self.slots + slot):
                at = RESERVED + 2 * GEOMETRY_SIZE + copy * self.max_size
                out[at : at + len(blob)] = blob
        for offset, data in self.data:
            out[offset : offset + len(data)] = data
        return out

    def write(self, path, **kwargs) -> bytearray:
        image = self.image(**kwargs)
        with open(path, "wb") as f:
            f.write(image)
        return image

    def empty(self, path) -> bytes:
        """A super_empty.img: geometry at 0, slot 0's metadata after it, no data."""
        blob = geometry_bytes(self.max_size, self.slots, self.block_size) + metadata_bytes(self.meta())
        with open(path, "wb") as f:
            f.write(blob)
        return blob


def metadata_offset(builder: SuperBuilder, slot: int, backup: bool = False) -> int:
    copy = builder.slots + slot if backup else slot
    return RESERVED + 2 * GEOMETRY_SIZE + copy * builder.max_size
