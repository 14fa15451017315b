"""``super`` images: Android's logical partition (LP) metadata, read in place and written.

A device with dynamic partitions has one physical partition, ``super``,
whose first bytes describe the logical partitions (``system_a``,
``vendor_b``, ...) as extents of it (AOSP ``fs_mgr/liblp``, metadata
versions 10.0 to 10.2; all integers little-endian):

* 4096 reserved bytes, then the **geometry** (a 52-byte struct padded to
  4096 bytes) and its backup copy: magic ``0x616c4467``, struct size,
  SHA-256 of the struct (its checksum field zeroed), the space one copy of
  the metadata may take (``metadata_max_size``, a multiple of 512), the
  number of metadata slots (2 on an A/B device) and the logical block size;
* the **metadata**, one copy per slot, then a backup copy of each:
  slot ``s`` at ``12288 + s * max`` and its backup at
  ``12288 + (slots + s) * max``. Each is a header (128 bytes in 10.0 and
  10.1, 256 in 10.2, which adds ``flags``) with its own SHA-256 and that of
  the tables, and four tables after it: partitions (name, attributes, first
  extent and count, group), extents (sectors, and for a linear extent the
  sector of a block device it maps to; zero extents read zeros), groups
  (name, maximum size) and block devices (the first is ``super`` itself:
  where logical partitions may start, alignment, size, name).

A ``super_empty.img`` (what a build makes for flashing) is the geometry at
offset 0 and the metadata of slot 0 right after it, with no data.

:class:`SuperImage` reads the geometry (the backup when the primary copy is
bad, as liblp does) and a slot's metadata (likewise), checking every rule
liblp's reader checks and the ones dmuserd relies on to read data: names
made of letters, digits, ``_``, ``-`` and ``.``, unique; extents of known
types inside the image. Partition and group names with the "slot suffixed"
flag get the slot's suffix (``_a`` for slot 0, ``_b`` for 1), as liblp
does on retrofit devices. :meth:`SuperImage.partition` gives a logical
partition as an :class:`~dmuserd.images.Image` mapping reads through its
extents: no copy is made.

What is wrong comes out as :class:`LpFormatError` naming the file, the byte
offset (in the raw image: for a sparse ``super.img``, in what it expands
to) and the rule.

It is also dmuserd's one LP metadata **writer** (``dmuserd ota merge``, and
the tests' images): :func:`geometry_bytes`, :func:`metadata_bytes`,
:func:`write_metadata` (a slot's two copies, backup first, each synced),
and what update_engine does to a target slot: :func:`metadata_for_update`
(liblp's in-place snapshot update) and :func:`resize_partition` (growth
from free space within the group's limit, or a shorter tail).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from bisect import bisect_right
from dataclasses import dataclass, field, replace

from dmuserd.images._image import Image, ImageError, ImageFormatError, fill_zeros

GEOMETRY_MAGIC = 0x616C4467
HEADER_MAGIC = 0x414C5030
GEOMETRY_SIZE = 4096
RESERVED_BYTES = 4096
SECTOR = 512
MAJOR_VERSION = 10
MINOR_VERSION_MAX = 2
#: metadata copies bigger than this are refused (lpmake's default is 64 KiB; liblp's tables hold hundreds of
#: partitions in far less): a hostile geometry cannot make us read gigabytes
MAX_METADATA_SIZE = 16 << 20

GEOMETRY = struct.Struct("<II32sIII")  # 52 bytes
HEADER_V1_0 = struct.Struct("<IHHI32sI32s12I")  # 128 bytes
HEADER_V1_2_SIZE = 256
PARTITION = struct.Struct("<36sIIII")  # 52
EXTENT = struct.Struct("<QIQI")  # 24
GROUP = struct.Struct("<36sIQ")  # 48
BLOCK_DEVICE = struct.Struct("<QIIQ36sI")  # 64

ATTR_READONLY, ATTR_SLOT_SUFFIXED, ATTR_UPDATED, ATTR_DISABLED = 1, 2, 4, 8
ATTRIBUTE_NAMES = {ATTR_READONLY: "readonly", ATTR_SLOT_SUFFIXED: "slot-suffixed", ATTR_UPDATED: "updated",
                   ATTR_DISABLED: "disabled"}
_ATTRS_V0 = ATTR_READONLY | ATTR_SLOT_SUFFIXED
_ATTRS_V1 = _ATTRS_V0 | ATTR_UPDATED | ATTR_DISABLED
GROUP_SLOT_SUFFIXED = 1
BLOCK_DEVICE_SLOT_SUFFIXED = 1
HEADER_FLAG_NAMES = {1: "virtual_ab_device", 2: "overlays_active"}
TARGET_LINEAR, TARGET_ZERO = 0, 1
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class LpFormatError(ImageFormatError):
    """A super image's geometry or metadata breaks a rule (see the module docstring)."""

    def __init__(self, path, offset: int, rule: str, detail: str) -> None:
        super().__init__("super image", path, offset, rule, detail)


class SuperLookupError(ImageError):
    """A slot or partition asked for is not in the super image."""


def slot_suffix(slot: int) -> str:
    """``0`` → ``"_a"``, ``1`` → ``"_b"``, ..."""
    return "_" + chr(ord("a") + slot)


def slot_number(slot: str | int) -> int:
    """``"a"``/``"_a"``/``0`` → 0, ``"b"`` → 1, ... (refuses anything else)."""
    if isinstance(slot, int):
        return slot
    text = str(slot).strip().lower().lstrip("_")
    if len(text) == 1 and "a" <= text <= "z":
        return ord(text) - ord("a")
    raise SuperLookupError(f"slot {slot!r} is not a slot name: use a, b, ...")


@dataclass(frozen=True)
class Geometry:
    metadata_max_size: int
    metadata_slot_count: int
    logical_block_size: int
    offset: int  # where it was read
    copy: str  # "primary", "backup" or "empty image"


@dataclass(frozen=True)
class Extent:
    num_sectors: int
    target_type: int
    target_data: int
    target_source: int

    @property
    def kind(self) -> str:
        return "linear" if self.target_type == TARGET_LINEAR else "zero"


@dataclass(frozen=True)
class Group:
    name: str
    flags: int
    maximum_size: int


@dataclass(frozen=True)
class BlockDevice:
    first_logical_sector: int
    alignment: int
    alignment_offset: int
    size: int
    partition_name: str
    flags: int


@dataclass(frozen=True)
class Partition:
    name: str
    attributes: int
    group: str
    extents: tuple[Extent, ...]

    @property
    def size(self) -> int:
        return sum(e.num_sectors for e in self.extents) * SECTOR

    @property
    def attribute_names(self) -> list[str]:
        return [n for bit, n in ATTRIBUTE_NAMES.items() if self.attributes & bit]


@dataclass
class Metadata:
    """One slot's metadata, as read (names already carry the slot suffix where flagged)."""

    slot: int
    offset: int
    copy: str  # "primary" or "backup"
    major_version: int
    minor_version: int
    header_size: int
    tables_size: int
    flags: int
    partitions: list[Partition]
    groups: list[Group]
    block_devices: list[BlockDevice]
    extents: list[Extent]
    problems: list[str] = field(default_factory=list)  # what was wrong with the primary copy

    def partition(self, name: str) -> Partition | None:
        return next((p for p in self.partitions if p.name == name), None)


def _geometry_digest(head: bytes) -> bytes:
    """SHA-256 of the 52-byte geometry struct with its checksum field zeroed."""
    return hashlib.sha256(head[:8] + bytes(32) + head[40:GEOMETRY.size]).digest()


def _header_digest(head: bytes) -> bytes:
    """SHA-256 of a metadata header (``header_size`` bytes) with its checksum field zeroed."""
    return hashlib.sha256(head[:12] + bytes(32) + head[44:]).digest()


def _name(raw: bytes) -> str | None:
    """A fixed 36-byte name field, or None when it is not ASCII."""
    text = raw.split(b"\0", 1)[0]
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        return None


class SuperImage:
    """The geometry and metadata of a super image (an :class:`~dmuserd.images.Image`: raw, sparse, ...).

    ``image`` stays open while this is (closed by :meth:`close`). Raises
    :class:`LpFormatError` when no valid geometry is found.
    """

    def __init__(self, image: Image, path: str | None = None) -> None:
        self.image = image
        self.path = path or image.path
        self.problems: list[str] = []  # what was wrong with a primary copy that a backup replaced
        try:
            self.geometry = self._read_geometry()
        except BaseException:
            image.close()
            raise
        self.empty = self.geometry.copy == "empty image"

    def _fail(self, offset: int, rule: str, detail: str) -> LpFormatError:
        return LpFormatError(self.path, offset, rule, detail)

    # --- geometry ------------------------------------------------------------

    def _read_geometry(self) -> Geometry:
        image = self.image
        magic = struct.pack("<I", GEOMETRY_MAGIC)
        errors = []
        for offset, copy in ((RESERVED_BYTES, "primary"), (RESERVED_BYTES + GEOMETRY_SIZE, "backup")):
            try:
                return self._parse_geometry(offset, copy)
            except LpFormatError as exc:
                errors.append(exc)
        if image.size >= GEOMETRY.size and image.pread(4, 0) == magic:  # super_empty.img
            return self._parse_geometry(0, "empty image")
        first = errors[0]
        if first.rule == "geometry-magic" and errors[1].rule == "geometry-magic":
            raise self._fail(RESERVED_BYTES, "geometry-magic",
                             f"no LP geometry at {RESERVED_BYTES} or {RESERVED_BYTES + GEOMETRY_SIZE} (nor at 0, "
                             "as in a super_empty.img): not a super image")
        raise self._fail(first.offset, first.rule, f"{first.detail}; the backup copy: {errors[1].detail}")

    def _parse_geometry(self, offset: int, copy: str) -> Geometry:
        if self.image.size < offset + GEOMETRY_SIZE and copy != "empty image":
            raise self._fail(offset, "geometry-magic", f"the image is {self.image.size} bytes, it ends before the "
                             f"geometry at {offset}")
        raw = self.image.pread(GEOMETRY.size, offset)
        magic, struct_size, checksum, max_size, slots, block_size = GEOMETRY.unpack(raw)
        if magic != GEOMETRY_MAGIC:
            raise self._fail(offset, "geometry-magic", f"geometry magic {magic:#010x}, not {GEOMETRY_MAGIC:#010x}")
        if struct_size != GEOMETRY.size:
            raise self._fail(offset + 4, "geometry-size", f"geometry struct_size {struct_size}, not {GEOMETRY.size}")
        if _geometry_digest(raw) != checksum:
            raise self._fail(offset + 8, "geometry-checksum", "the geometry's SHA-256 does not match its checksum")
        if not slots:
            raise self._fail(offset + 44, "slot-count", "metadata_slot_count is 0")
        if not max_size or max_size % SECTOR:
            raise self._fail(offset + 40, "metadata-max-size", f"metadata_max_size {max_size} is not a non-zero "
                             f"multiple of {SECTOR}")
        if max_size > MAX_METADATA_SIZE:
            raise self._fail(offset + 40, "metadata-max-size", f"metadata_max_size {max_size} is more than "
                             f"{MAX_METADATA_SIZE} bytes")
        if not block_size or block_size % SECTOR:
            raise self._fail(offset + 48, "block-size", f"logical_block_size {block_size} is not a non-zero "
                             f"multiple of {SECTOR}")
        if copy != "empty image":
            end = RESERVED_BYTES + 2 * GEOMETRY_SIZE + 2 * slots * max_size
            if end > self.image.size:
                raise self._fail(offset + 44, "metadata-region", f"{slots} slots of {max_size} bytes (and their "
                                 f"backups) end at {end}, past the {self.image.size}-byte image")
        return Geometry(max_size, slots, block_size, offset, copy)

    # --- metadata --------------------------------------------------------------

    @property
    def slot_count(self) -> int:
        """How many metadata slots can be read (1 in a super_empty.img)."""
        return 1 if self.empty else self.geometry.metadata_slot_count

    def slot_names(self) -> list[str]:
        return [slot_suffix(s)[1:] for s in range(self.slot_count)]

    def metadata_offsets(self, slot: int) -> list[tuple[int, str]]:
        """Where slot ``slot``'s copies are: ``[(offset, "primary"), (offset, "backup")]``."""
        g = self.geometry
        if self.empty:
            return [(GEOMETRY_SIZE, "primary")]
        base = RESERVED_BYTES + 2 * GEOMETRY_SIZE
        return [(base + slot * g.metadata_max_size, "primary"),
                (base + (g.metadata_slot_count + slot) * g.metadata_max_size, "backup")]

    def check_slot(self, slot: str | int) -> int:
        """The slot's number, refused when the image has no such slot."""
        number = slot_number(slot)
        if not 0 <= number < self.slot_count:
            names = ", ".join(self.slot_names())
            raise SuperLookupError(f"{self.path} has no slot {slot_suffix(number)[1:]}: its metadata has "
                                   f"{self.slot_count} slot(s) ({names}; metadata_slot_count of the geometry at "
                                   f"offset {self.geometry.offset})")
        return number

    def metadata(self, slot: str | int = 0) -> Metadata:
        """Slot ``slot``'s metadata: the primary copy, or the backup when the primary breaks a rule."""
        number = self.check_slot(slot)
        errors: list[LpFormatError] = []
        for offset, copy in self.metadata_offsets(number):
            try:
                meta = self._parse_metadata(number, offset, copy)
            except LpFormatError as exc:
                errors.append(exc)
                continue
            meta.problems = [str(e) for e in errors]
            return meta
        if len(errors) == 1:
            raise errors[0]
        first = errors[0]
        raise self._fail(first.offset, first.rule, f"slot {slot_suffix(number)[1:]}: {first.detail}; the backup "
                         f"copy at {errors[1].offset}: {errors[1].detail} (rule {errors[1].rule})")

    def _parse_metadata(self, slot: int, at: int, copy: str) -> Metadata:
        g = self.geometry
        image = self.image
        fail = self._fail
        if at + HEADER_V1_0.size > image.size:
            raise fail(at, "header-magic", f"the image ends before the metadata header at {at}")
        raw = image.pread(HEADER_V1_0.size, at)
        fields = HEADER_V1_0.unpack(raw)
        magic, major, minor, header_size, header_checksum, tables_size, tables_checksum = fields[:7]
        tables = [fields[7 + 3 * k : 10 + 3 * k] for k in range(4)]  # (offset, count, entry size)
        if magic != HEADER_MAGIC:
            raise fail(at, "header-magic", f"metadata magic {magic:#010x}, not {HEADER_MAGIC:#010x}")
        if major != MAJOR_VERSION or minor > MINOR_VERSION_MAX:
            raise fail(at + 4, "version", f"metadata version {major}.{minor}; dmuserd reads {MAJOR_VERSION}.0 to "
                       f"{MAJOR_VERSION}.{MINOR_VERSION_MAX}")
        want_size = HEADER_V1_2_SIZE if minor >= 2 else HEADER_V1_0.size
        if header_size != want_size:
            raise fail(at + 8, "header-size", f"header_size {header_size}; version 10.{minor} has {want_size}")
        if header_size > HEADER_V1_0.size:
            raw += image.pread(header_size - HEADER_V1_0.size, at + HEADER_V1_0.size)
        if _header_digest(raw[:header_size]) != header_checksum:
            raise fail(at + 12, "header-checksum", "the metadata header's SHA-256 does not match header_checksum")
        flags = struct.unpack_from("<I", raw, 128)[0] if header_size > HEADER_V1_0.size else 0
        if header_size + tables_size > g.metadata_max_size:
            raise fail(at + 44, "tables-size", f"header ({header_size}) and tables ({tables_size} bytes) are more "
                       f"than metadata_max_size {g.metadata_max_size}")
        names = ("partitions", "extents", "groups", "block_devices")
        sizes = (PARTITION.size, EXTENT.size, GROUP.size, BLOCK_DEVICE.size)
        for k, ((offset, count, entry), name, size) in enumerate(zip(tables, names, sizes)):
            where = at + 80 + 12 * k
            if offset > tables_size or count * entry > tables_size - offset:
                raise fail(where, "table-bounds", f"the {name} table ({count} entries of {entry} bytes at "
                           f"{offset}) does not fit in the {tables_size} bytes of tables")
            if entry != size:
                raise fail(where + 8, "entry-size", f"{name} entries are {entry} bytes, not {size}")
        body_at = at + header_size
        if body_at + tables_size > image.size:
            raise fail(at + 44, "tables-size", f"the tables ({tables_size} bytes at {body_at}) run past the end of "
                       "the image")
        body = image.pread(tables_size, body_at)
        if hashlib.sha256(body).digest() != tables_checksum:
            raise fail(at + 48, "tables-checksum", "the tables' SHA-256 does not match tables_checksum")

        def rows(k: int, fmt: struct.Struct):
            offset, count, _ = tables[k]
            for i in range(count):
                yield i, body_at + offset + i * fmt.size, fmt.unpack_from(body, offset + i * fmt.size)

        suffix = slot_suffix(slot)
        extents = []
        for i, where, (sectors, ttype, data, source) in rows(1, EXTENT):
            if ttype == TARGET_LINEAR:
                if source >= tables[3][1]:
                    raise fail(where + 20, "extent-device", f"extent {i} maps to block device {source}; there are "
                               f"{tables[3][1]}")
            elif ttype != TARGET_ZERO:
                raise fail(where + 8, "extent-type", f"extent {i} has target type {ttype} (0 linear, 1 zero)")
            extents.append(Extent(sectors, ttype, data, source))
        groups = []
        for i, where, (raw_name, gflags, maximum) in rows(2, GROUP):
            name = _name(raw_name)
            if name is None:
                raise fail(where, "group-name", f"group {i}'s name is not ASCII")
            if gflags & GROUP_SLOT_SUFFIXED:
                name += suffix
            groups.append(Group(name, gflags & ~GROUP_SLOT_SUFFIXED, maximum))
        devices = []
        for i, where, (first, align, align_off, size, raw_name, dflags) in rows(3, BLOCK_DEVICE):
            name = _name(raw_name)
            if name is None:
                raise fail(where + 24, "device-name", f"block device {i}'s name is not ASCII")
            if dflags & BLOCK_DEVICE_SLOT_SUFFIXED:
                name += suffix
            devices.append(BlockDevice(first, align, align_off, size, name, dflags & ~BLOCK_DEVICE_SLOT_SUFFIXED))
        if not devices:
            raise fail(at + 116, "block-devices", "the metadata lists no block device (the first must be super)")
        region = RESERVED_BYTES + 2 * (GEOMETRY_SIZE + g.metadata_max_size * g.metadata_slot_count)
        if region > devices[0].first_logical_sector * SECTOR:
            raise fail(body_at + tables[3][0], "metadata-overlap", f"logical partitions may start at sector "
                       f"{devices[0].first_logical_sector}, inside the metadata area (its first {region} bytes)")
        valid = _ATTRS_V1 if minor >= 1 else _ATTRS_V0
        partitions, seen = [], set()
        for i, where, (raw_name, attrs, first, count, group) in rows(0, PARTITION):
            name = _name(raw_name)
            if name is None or not _NAME.fullmatch(name):
                shown = raw_name.split(b"\0", 1)[0]
                raise fail(where, "partition-name", f"partition {i}'s name {shown!r} is not letters, digits, _, - "
                           "and . (liblp allows letters, digits and _)")
            if attrs & ~valid:
                raise fail(where + 36, "partition-attributes", f"partition {name!r} has attributes {attrs:#x}; "
                           f"version 10.{minor} allows {valid:#x}")
            if first + count > len(extents):
                raise fail(where + 40, "partition-extents", f"partition {name!r} has extents {first}..{first + count - 1}"
                           f"; there are {len(extents)}")
            if group >= len(groups):
                raise fail(where + 48, "partition-group", f"partition {name!r} is in group {group}; there are "
                           f"{len(groups)}")
            if attrs & ATTR_SLOT_SUFFIXED:
                name += suffix
                if len(name) > 36:
                    raise fail(where, "partition-name", f"partition {name!r} is longer than 36 characters with "
                               "its slot suffix")
            if name in seen:
                raise fail(where, "partition-name", f"two partitions are named {name!r}")
            seen.add(name)
            partitions.append(Partition(name, attrs & ~ATTR_SLOT_SUFFIXED, groups[group].name,
                                        tuple(extents[first : first + count])))
        return Metadata(slot, at, copy, major, minor, header_size, tables_size, flags, partitions, groups, devices,
                        extents)

    # --- partitions ------------------------------------------------------------

    def find(self, name: str, slot: str | int | None = None) -> tuple[Metadata, Partition]:
        """Partition ``name`` in slot ``slot``'s metadata (default: the slot its suffix names, else a)."""
        if slot is None:
            match = re.fullmatch(r".*_([a-z])", name)
            slot = match.group(1) if match and ord(match.group(1)) - ord("a") < self.slot_count else 0
        meta = self.metadata(slot)
        part = meta.partition(name)
        if part is None:
            names = ", ".join(p.name for p in meta.partitions) or "none"
            raise SuperLookupError(f"{self.path}: no partition {name!r} in the metadata of slot "
                                   f"{slot_suffix(meta.slot)[1:]} (offset {meta.offset}; it has: {names})")
        return meta, part

    def partition(self, name: str, slot: str | int | None = None) -> "LogicalPartition":
        """Partition ``name`` as an image reading through its extents (this image stays open with it)."""
        if self.empty:
            raise SuperLookupError(f"{self.path} is a super_empty.img: metadata only, no partition data")
        meta, part = self.find(name, slot)
        return LogicalPartition(self, meta, part)

    def close(self) -> None:
        self.image.close()

    def __enter__(self) -> "SuperImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LogicalPartition(Image):
    """One logical partition of a :class:`SuperImage`: reads mapped through its extents.

    A linear extent reads the super image (block device 0; a partition on
    another block device, as on retrofit devices, is refused); a zero
    extent reads zeros. Extents must lie inside the super image.
    """

    kind = "partition"

    def __init__(self, super_image: SuperImage, meta: Metadata, part: Partition) -> None:
        self.super_image = super_image
        self.name = part.name
        self.path = f"{super_image.path}::{part.name}"
        self.partition = part
        self.metadata = meta
        self.block_size = super_image.geometry.logical_block_size
        starts, maps = [], []
        pos = 0
        limit = super_image.image.size
        for k, extent in enumerate(part.extents):
            length = extent.num_sectors * SECTOR
            if extent.target_type == TARGET_LINEAR:
                if extent.target_source != 0:
                    device = meta.block_devices[extent.target_source].partition_name
                    raise SuperLookupError(f"{self.path}: extent {k} lies on block device {device!r}, not in "
                                           f"{super_image.path} (a super split over several devices): pass that "
                                           "device's image")
                target = extent.target_data * SECTOR
                if target + length > limit:
                    raise LpFormatError(super_image.path, meta.offset, "extent-outside-image",
                                        f"partition {part.name!r} extent {k} (sectors {extent.target_data}.."
                                        f"{extent.target_data + extent.num_sectors - 1}) ends past the "
                                        f"{limit}-byte image")
            else:
                target = -1
            if length:
                starts.append(pos)
                maps.append((pos + length, target))
            pos += length
        self.size = pos
        self._starts = starts
        self._maps = maps

    def readinto(self, buf: memoryview, offset: int, flags: int = 0) -> None:
        n = len(buf)
        end = min(n, max(0, self.size - offset))
        i = bisect_right(self._starts, offset) - 1
        done = 0
        lower = self.super_image.image
        while done < end:
            at = offset + done
            start = self._starts[i]
            stop, target = self._maps[i]
            take = min(end - done, stop - at)
            piece = buf[done : done + take]
            if target < 0:
                fill_zeros(piece)
            else:
                lower.readinto(piece, target + at - start, flags)
            done += take
            i += 1
        if end < n:
            fill_zeros(buf[end:])

    def close(self) -> None:
        self.super_image.close()

    def describe(self) -> dict:
        return {**super().describe(), "partition": self.name, "slot": slot_suffix(self.metadata.slot)[1:],
                "extents": len(self.partition.extents)}


# --- writing -------------------------------------------------------------------------------------------------------
#
# One writer of LP metadata, liblp's layout (``fs_mgr/liblp/writer.cpp``): the tests' images are made with it too,
# so what it writes is what the reader above checks.


class LpSpaceError(ImageError):
    """A partition cannot grow: its group's maximum size or the super device has no room."""


def with_geometry_checksum(raw: bytes) -> bytes:
    """A geometry struct (its first 52 bytes used) with its SHA-256 made right, padded to 4096 bytes."""
    head = bytes(raw[: GEOMETRY.size])
    return (head[:8] + _geometry_digest(head) + head[40:]).ljust(GEOMETRY_SIZE, b"\0")


def with_metadata_checksums(raw: bytes) -> bytes:
    """A metadata copy (header then tables) with both SHA-256 fields made right for what it holds.

    The header's own ``header_size`` and ``tables_size`` say what is hashed
    (a test can set them to anything; they are clamped to the bytes there).
    """
    raw = bytearray(raw)
    header_size, tables_size = struct.unpack_from("<I", raw, 8)[0], struct.unpack_from("<I", raw, 44)[0]
    header_size = min(header_size, len(raw))
    raw[48:80] = hashlib.sha256(raw[header_size : header_size + tables_size]).digest()
    raw[12:44] = _header_digest(bytes(raw[:header_size]))
    return bytes(raw)


def geometry_bytes(metadata_max_size: int, slot_count: int, logical_block_size: int) -> bytes:
    """The geometry block (4096 bytes, checksum right) as written at 4096 and again at 8192."""
    return with_geometry_checksum(GEOMETRY.pack(GEOMETRY_MAGIC, GEOMETRY.size, bytes(32), metadata_max_size,
                                                slot_count, logical_block_size))


def _name_field(text: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) > 36:
        raise ValueError(f"LP name {text!r} is longer than 36 characters")
    return raw.ljust(36, b"\0")


def metadata_bytes(meta: Metadata) -> bytes:
    """One metadata copy of ``meta``: the header (10.0/10.1: 128 bytes, 10.2: 256 with ``flags``) and the four
    tables, checksums right.

    The extent table is made from the partitions' extents, in partition
    order (as liblp's builder does); ``meta.extents``, ``header_size`` and
    ``tables_size`` are not used. Names are written as they are: a
    partition read with the "slot suffixed" attribute already carries the
    suffix (the reader drops the attribute), so writing it back names it
    for that one slot, which is what a device's slot metadata holds.
    """
    group_index = {}
    for i, g in enumerate(meta.groups):
        group_index.setdefault(g.name, i)
    parts, extents = [], []
    for p in meta.partitions:
        if p.group not in group_index:
            raise ValueError(f"partition {p.name!r} is in group {p.group!r}, which the metadata does not list")
        parts.append(PARTITION.pack(_name_field(p.name), p.attributes, len(extents), len(p.extents),
                                    group_index[p.group]))
        extents += [EXTENT.pack(e.num_sectors, e.target_type, e.target_data, e.target_source) for e in p.extents]
    groups = [GROUP.pack(_name_field(g.name), g.flags, g.maximum_size) for g in meta.groups]
    devices = [BLOCK_DEVICE.pack(d.first_logical_sector, d.alignment, d.alignment_offset, d.size,
                                 _name_field(d.partition_name), d.flags) for d in meta.block_devices]
    tables = [parts, extents, groups, devices]
    descriptors, offset = [], 0
    for rows, fmt in zip(tables, (PARTITION, EXTENT, GROUP, BLOCK_DEVICE)):
        descriptors += [offset, len(rows), fmt.size]
        offset += len(rows) * fmt.size
    body = b"".join(b"".join(rows) for rows in tables)
    header_size = HEADER_V1_2_SIZE if meta.minor_version >= 2 else HEADER_V1_0.size
    head = HEADER_V1_0.pack(HEADER_MAGIC, MAJOR_VERSION, meta.minor_version, header_size, bytes(32), len(body),
                            bytes(32), *descriptors)
    if header_size > HEADER_V1_0.size:
        head += struct.pack("<I", meta.flags).ljust(header_size - HEADER_V1_0.size, b"\0")
    return with_metadata_checksums(head + body)


def write_metadata(path, geometry: Geometry, slot: int, meta: Metadata) -> None:
    """Write ``meta`` as slot ``slot``'s metadata of the raw super image at ``path``: the backup copy, synced,
    then the primary copy, synced.

    Interrupted at any instant, the slot reads (primary, else backup, as
    :meth:`SuperImage.metadata` and liblp do) as either the old metadata or
    the new one, never a mix. Refused (``LpFormatError``) when the copy is
    bigger than ``metadata_max_size``.
    """
    blob = metadata_bytes(meta)
    base = RESERVED_BYTES + 2 * GEOMETRY_SIZE
    primary = base + slot * geometry.metadata_max_size
    if len(blob) > geometry.metadata_max_size:
        raise LpFormatError(path, primary, "tables-size", f"slot {slot_suffix(slot)[1:]}'s new metadata is "
                            f"{len(blob)} bytes, more than metadata_max_size {geometry.metadata_max_size}")
    backup = base + (geometry.metadata_slot_count + slot) * geometry.metadata_max_size
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for at in (backup, primary):
            if os.pwrite(fd, blob, at) != len(blob):
                raise ImageError(f"{path}: short write of LP metadata at offset {at}")
            os.fdatasync(fd)
    finally:
        os.close(fd)


# --- updating a slot (what update_engine does to the target slot) ---------------------------------------------------


def _rename_suffix(name: str, source: str, target: str) -> str | None:
    """``name`` with the source slot's suffix turned into the target's; None for a name of the target slot."""
    if name.endswith(target):
        return None
    return name[: -len(source)] + target if name.endswith(source) else name


def metadata_for_update(meta: Metadata, source_slot: int, target_slot: int) -> Metadata:
    """The target slot's metadata at the start of a Virtual A/B update, from the source slot's ``meta``.

    As liblp's ``UpdateMetadataForInPlaceSnapshot``: partitions and groups
    named for the target slot are dropped (they held the previous build of
    the other slot), those named for the source slot are renamed for the
    target slot and keep their extents: ``system_a`` becomes ``system_b``
    over the same sectors, which the update's COW files are merged into.
    """
    source, target = slot_suffix(source_slot), slot_suffix(target_slot)
    groups, renamed = [], {}
    for g in meta.groups:
        name = _rename_suffix(g.name, source, target)
        if name is not None:
            renamed[g.name] = name
            groups.append(Group(name, g.flags, g.maximum_size))
    partitions = []
    for p in meta.partitions:
        name = _rename_suffix(p.name, source, target)
        if name is None:
            continue
        group = renamed.get(p.group, groups[0].name if groups else p.group)  # a dropped group: the default one
        partitions.append(Partition(name, p.attributes, group, p.extents))
    return replace(meta, slot=target_slot, partitions=partitions, groups=groups, extents=[], problems=[])


def _used_sectors(metas) -> list[tuple[int, int]]:
    """(first, end) sector ranges of super (block device 0) that linear extents of ``metas`` map, merged."""
    ranges = sorted((e.target_data, e.target_data + e.num_sectors) for m in metas for p in m.partitions
                    for e in p.extents if e.target_type == TARGET_LINEAR and e.target_source == 0 and e.num_sectors)
    merged: list[list[int]] = []
    for first, end in ranges:
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([first, end])
    return [(a, b) for a, b in merged]


def resize_partition(meta: Metadata, name: str, size: int, *, keep=(), path="super",
                     block_size: int = 4096) -> Metadata:
    """``meta`` with partition ``name`` made ``size`` bytes, as liblp's builder does.

    Shrinking cuts extents from the end. Growing first lengthens the
    partition's last extent into free sectors right after it, then takes
    free sectors of super (block device 0) from the lowest address up, each
    free region's start aligned as the device says, in whole logical blocks
    (``block_size``; ``size`` grows by a multiple of it). Sectors mapped by ``meta`` or by any
    metadata in ``keep`` (another slot's, still in use) are not free.
    Raises :class:`LpSpaceError` when the partition's group (its
    ``maximum_size``) or super has no room, naming both figures.
    """
    if size % SECTOR:
        raise ValueError(f"partition size {size} is not a multiple of {SECTOR}")
    part = meta.partition(name)
    if part is None:
        raise SuperLookupError(f"{path}: no partition {name!r} in the metadata of slot {slot_suffix(meta.slot)[1:]}")
    want = size // SECTOR
    extents = list(part.extents)
    have = sum(e.num_sectors for e in extents)
    if want < have:
        cut = have - want
        while cut:
            last = extents.pop()
            if last.num_sectors > cut:
                extents.append(Extent(last.num_sectors - cut, last.target_type, last.target_data, last.target_source))
                break
            cut -= last.num_sectors
    elif want > have:
        group = next((g for g in meta.groups if g.name == part.group), None)
        if group is not None and group.maximum_size:
            taken = sum(p.size for p in meta.partitions if p.group == group.name and p.name != name)
            if taken + size > group.maximum_size:
                raise LpSpaceError(f"{path}: partition {name!r} cannot grow to {size} bytes: its group "
                                   f"{group.name!r} allows {group.maximum_size} bytes and its other partitions "
                                   f"take {taken}")
        device = meta.block_devices[0]
        align = max(device.alignment // SECTOR, 1)
        offset = device.alignment_offset // SECTOR
        unit = max(block_size // SECTOR, 1)
        need = want - have
        free, cursor = [], device.first_logical_sector
        for first, end in _used_sectors([meta, *keep]) + [(device.size // SECTOR, device.size // SECTOR)]:
            if first > cursor:
                free.append((cursor, first))
            cursor = max(cursor, end)
        tail = extents[-1] if extents else None
        tail_end = tail.target_data + tail.num_sectors if tail is not None and tail.target_type == TARGET_LINEAR \
            and tail.target_source == 0 else None
        for first, end in sorted(free, key=lambda r: (r[0] != tail_end, r[0])):  # the last extent's own gap first
            if first != tail_end:
                first += (offset - first) % align
            take = min(need, (end - first) // unit * unit)
            if take <= 0:
                continue
            last = extents[-1] if extents else None
            if first == tail_end and last is not None:
                extents[-1] = Extent(last.num_sectors + take, TARGET_LINEAR, last.target_data, 0)
            else:
                extents.append(Extent(take, TARGET_LINEAR, first, 0))
            need -= take
            if not need:
                break
        if need:
            space = sum(end - first for first, end in free) * SECTOR
            raise LpSpaceError(f"{path}: partition {name!r} cannot grow from {have * SECTOR} to {size} bytes: "
                               f"{device.partition_name} has {space} bytes free (before alignment), "
                               f"{(want - have) * SECTOR} are needed")
    partitions = [Partition(p.name, p.attributes, p.group, tuple(extents)) if p.name == name else p
                  for p in meta.partitions]
    return replace(meta, partitions=partitions, extents=[], problems=[])
