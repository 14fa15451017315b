"""dmuserd's LP metadata writer: what it writes reads back equal (every version, both copies); a slot
interrupted between its two copies reads as the old or the new metadata, never a mix; liblp's in-place
update of a target slot; partitions resized from free space, the group's limit and super's size
respected, sectors another slot still uses never taken."""

from __future__ import annotations

import os
import random

import pytest
from lp_writer import SuperBuilder, metadata_offset

from dmuserd.images import open_super
from dmuserd.images.lp import (
    LpFormatError,
    LpSpaceError,
    metadata_bytes,
    metadata_for_update,
    resize_partition,
    write_metadata,
)


def _super(path, *, minor: int = 2, group_max: int = 8 << 20, size: int = 12 << 20) -> SuperBuilder:
    r = random.Random(3)
    b = SuperBuilder(size=size, minor=minor, slots=2)
    ga = b.add_group("main_a", group_max)
    gb = b.add_group("main_b", group_max)
    b.add_partition("system_a", r.randbytes(1 << 20), group=ga, pieces=2)
    b.add_partition("vendor_a", r.randbytes(300 * 512), group=ga)
    b.add_partition("system_b", b"", group=gb)
    b.add_partition("vendor_b", b"", group=gb)
    b.write(path)
    return b


@pytest.mark.parametrize("minor", [0, 1, 2])
def test_written_metadata_reads_back_equal(tmp_path, minor):
    path = tmp_path / "super.img"
    b = _super(path, minor=minor)
    with open_super(path) as sup:
        meta, geometry = sup.metadata("a"), sup.geometry
    update = metadata_for_update(meta, 0, 1)
    write_metadata(path, geometry, 1, update)
    with open_super(path) as sup:
        got = sup.metadata("b")
        assert (got.copy, got.minor_version, got.flags) == ("primary", minor, meta.flags)
        assert got.partitions == update.partitions and got.groups == update.groups
        assert got.block_devices == meta.block_devices
        assert sup.metadata("a").partitions == meta.partitions  # the other slot untouched
    raw = path.read_bytes()
    blob = metadata_bytes(update)
    for backup in (False, True):
        at = metadata_offset(b, 1, backup)
        assert raw[at : at + len(blob)] == blob


def test_an_interrupted_write_reads_old_or_new(tmp_path):
    """The backup is written (and synced) before the primary: between them the slot reads the old primary; a
    torn primary falls back to the new backup."""
    path = tmp_path / "super.img"
    b = _super(path)
    with open_super(path) as sup:
        meta, old = sup.metadata("a"), sup.metadata("b")
    update = metadata_for_update(meta, 0, 1)
    blob = metadata_bytes(update)
    primary, backup = metadata_offset(b, 1), metadata_offset(b, 1, backup=True)
    pristine = path.read_bytes()
    copies = set()
    for cut in [*range(0, len(blob), 37), len(blob)]:
        image = bytearray(pristine)
        image[backup : backup + len(blob)] = blob  # the first write done and synced
        image[primary : primary + cut] = blob[:cut]  # the second one cut short
        path.write_bytes(image)
        with open_super(path) as sup:
            got = sup.metadata("b")
        copies.add(got.copy)
        assert (got.partitions, got.groups) in ((old.partitions, old.groups), (update.partitions, update.groups)), cut
        if got.copy == "backup":
            assert got.partitions == update.partitions
    assert copies == {"primary", "backup"}


def test_metadata_too_big_for_a_slot_is_refused(tmp_path):
    path = tmp_path / "super.img"
    b = SuperBuilder(size=4 << 20, slots=2, max_size=4096, alignment=4096)
    b.add_partition("system_a", bytes(4096))
    b.write(path)
    with open_super(path) as sup:
        meta, geometry = sup.metadata("a"), sup.geometry
    parts = [meta.partitions[0].__class__(f"p{i}_b", 0, "default", ()) for i in range(90)]
    big = metadata_for_update(meta, 0, 1)
    big.partitions = parts
    before = path.read_bytes()
    with pytest.raises(LpFormatError) as err:
        write_metadata(path, geometry, 1, big)
    assert err.value.rule == "tables-size" and "more than metadata_max_size 4096" in str(err.value)
    assert path.read_bytes() == before


def _slot_a_and_update(tmp_path):
    """Slot a's metadata of :func:`_super`'s image, and liblp's update of it for slot b."""
    path = tmp_path / "super.img"
    _super(path)
    with open_super(path) as sup:
        meta = sup.metadata("a")
    return meta, metadata_for_update(meta, 0, 1)


def test_in_place_update_renames_the_source_slot(tmp_path):
    meta, update = _slot_a_and_update(tmp_path)
    assert [p.name for p in update.partitions] == ["system_b", "vendor_b"]
    assert [g.name for g in update.groups] == ["default", "main_b"]
    assert [p.group for p in update.partitions] == ["main_b", "main_b"]
    assert [p.extents for p in update.partitions] == [meta.partition("system_a").extents,
                                                      meta.partition("vendor_a").extents]
    back = metadata_for_update(update, 1, 0)
    assert [p.name for p in back.partitions] == ["system_a", "vendor_a"]


def test_resize_grows_from_free_space_and_shrinks_from_the_end(tmp_path):
    meta, update = _slot_a_and_update(tmp_path)
    vendor = update.partition("vendor_b")
    end = vendor.extents[-1].target_data + vendor.extents[-1].num_sectors
    # a block more: the free sectors right after vendor's last extent lengthen it (though lower gaps are free)
    grown = resize_partition(update, "vendor_b", vendor.size + 4096)
    got = grown.partition("vendor_b").extents
    assert len(got) == len(vendor.extents) and got[-1].num_sectors == vendor.extents[-1].num_sectors + 8
    assert end % 8  # (vendor is 300 sectors: the gap after it is not whole blocks)
    # system_b 3 MiB more: the free sectors after its last extent (up to vendor), then aligned free space from
    # the lowest address up (past vendor: its first MiB boundary)
    system = update.partition("system_b")
    grown = resize_partition(update, "system_b", system.size + (3 << 20))
    got = grown.partition("system_b").extents
    last = system.extents[-1]
    gap = vendor.extents[0].target_data - last.target_data - last.num_sectors
    assert gap > 0 and got[:2] == (system.extents[0], last.__class__(last.num_sectors + gap, 0, last.target_data, 0))
    first = system.extents[0]
    low = -(-(first.target_data + first.num_sectors) // 2048) * 2048  # aligned, before the second piece
    assert low < last.target_data
    assert [(e.target_data, e.num_sectors) for e in got[2:]] == [
        (low, last.target_data - low), (-(-end // 2048) * 2048, (3 << 20) // 512 - gap - (last.target_data - low))]
    assert grown.partition("system_b").size == system.size + (3 << 20)
    # shrinking cuts the end
    system = update.partition("system_b")
    small = resize_partition(update, "system_b", system.size - (600 << 10))  # the second piece, and 176 sectors
    got = small.partition("system_b").extents
    assert got == (system.extents[0].__class__(1024 - 176, 0, system.extents[0].target_data, 0),)
    # the sectors system_a still holds (kept) are not handed to vendor_b
    regrown = resize_partition(small, "vendor_b", vendor.size + (3 << 20), keep=[meta])
    held = [(e.target_data, e.target_data + e.num_sectors) for e in system.extents]
    for e in regrown.partition("vendor_b").extents[len(vendor.extents) - 1 :]:
        for first, stop in held:
            assert e.target_data + e.num_sectors <= first or e.target_data >= stop


def test_no_room_says_which_limit(tmp_path):
    path = tmp_path / "super.img"
    _super(path, group_max=2 << 20)
    with open_super(path) as sup:
        update = metadata_for_update(sup.metadata("a"), 0, 1)
    with pytest.raises(LpSpaceError, match=r"its group 'main_b' allows 2097152 bytes and its other partitions "
                                           r"take 1048576"):
        resize_partition(update, "vendor_b", 2 << 20, path=str(path))
    path2 = tmp_path / "small.img"
    _super(path2, size=4 << 20)
    with open_super(path2) as sup:
        update = metadata_for_update(sup.metadata("a"), 0, 1)
    with pytest.raises(LpSpaceError, match=r"super has \d+ bytes free .* are needed"):
        resize_partition(update, "vendor_b", 3 << 20, path=str(path2))
    assert os.path.getsize(path2) == 4 << 20
