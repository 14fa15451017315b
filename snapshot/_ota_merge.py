"""``dmuserd ota merge``: an OTA merged into a super image, as a Virtual A/B device ends its update.

On the device, update_engine writes the target slot's LP metadata at the
start of the update: liblp's in-place snapshot update
(:func:`~dmuserd.images.lp.metadata_for_update`) renames the source slot's
partitions for the target slot over the same sectors (``system_a`` →
``system_b``), and a partition the new build makes bigger gets more
sectors from free space in super (its group's limit respected). The COW
files are then merged into those sectors. :func:`merge_ota` does the same
to a super image on disk, in place or into a copy:

1. everything that can be refused is, before any byte is written: the
   slot, the partitions (in the source slot, all their extents linear and
   in super), the new layout (room in super and in the groups);
2. the COW files ``COW_DIR/NAME.cow`` are made (:func:`~dmuserd.snapshot.ota.apply_payload`,
   itself resumable) unless ones that render the new partition and are
   not yet merged are there;
3. for ``output``, super is copied (raw or sparse → raw, holes kept) to
   ``OUTPUT.partial`` and synced;
4. a state file, ``COW_DIR/.ota-merge.json``, is written (atomically): from
   here on the COW files are being merged, and a run with the same
   arguments resumes instead of starting over;
5. the target slot's metadata is written (:func:`~dmuserd.images.lp.write_metadata`:
   backup then primary, each synced; written again on resume, the same);
6. each COW file is merged by the in-place merge engine
   (:func:`~dmuserd.snapshot.merge.merge_cow`, crash-safe and resumable)
   into the partition's sectors: the source partition's extents, and the
   grown ones (:class:`ExtentIO` maps the partition's offsets onto the file);
7. each target partition, read back through the new metadata, must hash to
   ``new_partition_info.hash``; then ``OUTPUT.partial`` is renamed to
   ``OUTPUT`` and the state file removed (and ``COW_DIR`` too when it was
   the default one, ``TARGET.ota-merge``).

Killed at any instant, the same command ends with the same image. Sectors
a shrunk partition gives up stay allocated to the source slot's partition
(the merge reads them), so a grown partition never takes them. After the
merge the source slot's partitions name the same sectors, which now hold
the new build, as on a device after its merge.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from dmuserd.snapshot.merge import MergeIO
from dmuserd.snapshot.payload import Payload, PayloadError, PayloadHashError

if TYPE_CHECKING:
    from dmuserd.images.lp import Geometry, Metadata

log = structlog.get_logger("dmuserd.ota")

STATE_NAME = ".ota-merge.json"
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


class OtaMergeError(PayloadError):
    """An OTA that cannot be merged into this super image (said before anything is written), or an
    interrupted merge that cannot be resumed with these arguments."""


class ExtentIO(MergeIO):
    """:class:`~dmuserd.snapshot.merge.MergeIO` whose ``"base"`` is a logical partition of the super image
    open as the base file: partition offsets are mapped through ``extents`` (``(file offset, length)`` in
    partition order); one ``preadv``/``pwritev`` per piece contiguous in the file."""

    def __init__(self, base_fd: int, cow_fd: int, extents: list[tuple[int, int]]) -> None:
        super().__init__(base_fd, cow_fd)
        self._starts, self._extents, pos = [], list(extents), 0
        for _, length in extents:
            self._starts.append(pos)
            pos += length
        self.size = pos

    def _pieces(self, views: list[memoryview], offset: int) -> list[tuple[int, list[memoryview]]]:
        pieces: list[tuple[int, list[memoryview]]] = []
        end_of_last = -1
        for view in views:
            while len(view):
                i = bisect_right(self._starts, offset) - 1
                if offset >= self.size or i < 0:
                    raise ValueError(f"partition offset {offset} is past its {self.size} bytes")
                at, length = self._extents[i]
                inside = offset - self._starts[i]
                take = min(len(view), length - inside)
                where = at + inside
                if where == end_of_last:
                    pieces[-1][1].append(view[:take])
                else:
                    pieces.append((where, [view[:take]]))
                end_of_last = where + take
                view, offset = view[take:], offset + take
        return pieces

    def preadv(self, which: str, views: list[memoryview], offset: int) -> None:
        if which != "base":
            return super().preadv(which, views, offset)
        for where, group in self._pieces(views, offset):
            super().preadv(which, group, where)

    def pwritev(self, which: str, views: list[memoryview], offset: int) -> None:
        if which != "base":
            return super().pwritev(which, views, offset)
        for where, group in self._pieces(views, offset):
            super().pwritev(which, group, where)


@dataclass
class MergedPartition:
    """One partition merged: ``target`` (``system_b``) in the target slot now holds the new build."""

    name: str
    target: str
    old_size: int
    size: int
    sha256: str
    merged_now: int  # ops this run merged
    total_ops: int  # 0: the image was found merged already (nothing done)


@dataclass
class _Plan:
    names: list[str]
    sizes: dict[str, int]
    hashes: dict[str, str]
    key: str
    source_slot: int
    target_slot: int
    geometry: Geometry
    source_meta: Metadata
    target_meta: Metadata


def _plan(payload_path, source: str, slot, partitions) -> _Plan:
    """Everything checked before anything is written (see the module doc, step 1)."""
    from dmuserd.images import open_super
    from dmuserd.images.lp import TARGET_LINEAR, metadata_for_update, resize_partition, slot_suffix
    from dmuserd.snapshot.ota import check_supported, target_slot

    if slot is None:
        raise OtaMergeError("ota merge needs --slot: the slot the old build is in (a or b)")
    with Payload(payload_path) as payload:
        names = list(payload.partitions) if not partitions else list(dict.fromkeys(partitions))
        parts = [payload.partition(n) for n in names]
        for part in parts:
            check_supported(part)
        sizes = {p.partition_name: p.new_partition_info.size for p in parts}
        hashes = {p.partition_name: p.new_partition_info.hash.hex() for p in parts}
        key = hashlib.sha256(payload.manifest_raw).hexdigest()[:16]
    with open_super(source) as sup:
        source_slot = sup.check_slot(slot)
        target = target_slot(slot)
        if sup.empty:
            raise OtaMergeError(f"{source} is a super_empty.img (metadata only): there are no partitions to merge "
                                "into")
        if sup.slot_count < 2:
            raise OtaMergeError(f"{source} has {sup.slot_count} metadata slot: no slot "
                                f"{slot_suffix(target)[1:]} to write the new build's layout to")
        geometry = sup.geometry
        source_meta = sup.metadata(source_slot)
    src_suffix, tgt_suffix = slot_suffix(source_slot), slot_suffix(target)
    have = [p.name for p in source_meta.partitions]
    for name in names:
        part = source_meta.partition(name + src_suffix)
        if part is None:
            raise OtaMergeError(f"partition {name!r}: no partition {name + src_suffix!r} in slot "
                                f"{src_suffix[1:]} of the super image {source} (metadata at offset "
                                f"{source_meta.offset}: it has {', '.join(have) or 'none'}); physical partitions "
                                "(boot, vbmeta, ...) are not in super: leave them out with --partitions")
        for k, e in enumerate(part.extents):
            if e.target_type != TARGET_LINEAR or e.target_source != 0:
                kind = "a zero extent" if e.target_type != TARGET_LINEAR else "on another block device"
                raise OtaMergeError(f"{source}: partition {part.name!r} extent {k} is {kind}: its sectors "
                                    "cannot be written in place")
        if sizes[name] % 512:
            raise OtaMergeError(f"partition {name!r}: the new size {sizes[name]} is not a multiple of 512 bytes")
    target_meta = metadata_for_update(source_meta, source_slot, target)
    # the merge reads the old partitions whole (a shrunk one too): their sectors stay out of what may be allocated
    merged = dataclasses.replace(source_meta, partitions=[source_meta.partition(n + src_suffix) for n in names])
    for name in names:
        target_meta = resize_partition(target_meta, name + tgt_suffix, sizes[name], keep=[merged], path=source,
                                       block_size=geometry.logical_block_size)
    return _Plan(names, sizes, hashes, key, source_slot, target, geometry, source_meta, target_meta)


def _extents(part) -> list[tuple[int, int]]:
    return [(e.target_data * 512, e.num_sectors * 512) for e in part.extents if e.num_sectors]


def _fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_state(path: str, state: dict) -> None:
    from dmuserd.snapshot.ota import _fsync_dir

    temp = path + ".tmp"
    with open(temp, "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _copy_raw(source: str, dest: str) -> None:
    """``source`` (raw or sparse) written to ``dest`` as the raw image it stands for; zero MiBs left as holes."""
    from dmuserd.images import open_image

    with open_image(source) as image, open(dest, "wb") as out:
        out.truncate(image.size)
        for offset in range(0, image.size, _CHUNK):
            chunk = image.pread(min(_CHUNK, image.size - offset), offset)
            if chunk != _ZEROS[: len(chunk)]:
                out.seek(offset)
                out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def _usable_cow(path: str, base: str, size: int, want: str) -> bool:
    """A COW file there already that renders the new partition over ``base`` and has nothing merged yet."""
    from dmuserd.snapshot._cow_format import CowError
    from dmuserd.snapshot._cow_reader import CowReader
    from dmuserd.snapshot.ota import render_sha256

    if not os.path.exists(path):
        return False
    try:
        with CowReader(path) as reader:
            return reader.num_merge_ops == 0 and render_sha256(reader, base, size) == want
    except (CowError, OSError):
        return False


def _make_cows(payload_path, plan: _Plan, source: str, cow_dir: str, slot, *, verify: bool) -> None:
    from dmuserd.images.lp import slot_suffix
    from dmuserd.snapshot.ota import apply_payload

    suffix = slot_suffix(plan.source_slot)
    missing = [n for n in plan.names
               if not _usable_cow(os.path.join(cow_dir, f"{n}.cow"), f"{source}::{n}{suffix}", plan.sizes[n],
                                  plan.hashes[n])]
    if missing:
        apply_payload(payload_path, cow_dir=cow_dir, source_dir=[source], partitions=missing, slot=slot,
                      verify=verify, progress=False)


def _already_merged(path: str, plan: _Plan) -> bool:
    """Whether ``path`` is the merge's result already (a run killed after its last step, or run twice): the
    target slot's metadata is the planned one and its partitions hash to the new build."""
    from dmuserd.images import ImageError, open_super
    from dmuserd.images.lp import slot_suffix
    from dmuserd.snapshot.ota import file_sha256

    if not os.path.exists(path):
        return False
    try:
        with open_super(path) as sup:
            meta = sup.metadata(plan.target_slot)
    except ImageError:
        return False
    if (meta.partitions, meta.groups) != (plan.target_meta.partitions, plan.target_meta.groups):
        return False
    suffix = slot_suffix(plan.target_slot)
    return all(file_sha256(f"{path}::{n}{suffix}", plan.sizes[n])[0] == plan.hashes[n] for n in plan.names)


def merge_ota(payload_path, *, source, slot, output=None, cow_dir=None, partitions: list[str] | None = None,
              offload: str = "auto", verify: bool = True) -> list[MergedPartition]:
    """Merge the OTA ``payload_path`` into the super image ``source`` (``output`` None: in place; else into a
    copy at ``output``), ``slot`` being the slot the old build is in; see the module doc.

    ``cow_dir`` (default ``TARGET.ota-merge``, removed when done) holds the
    COW files and the state of an interrupted merge. Returns one
    :class:`MergedPartition` per partition.
    """
    import trio

    from dmuserd.images import not_raw_reason
    from dmuserd.images.lp import slot_suffix, write_metadata
    from dmuserd.snapshot.merge import merge_cow
    from dmuserd.snapshot.ota import _fsync_dir, file_sha256

    source = os.fspath(source)
    final = os.fspath(output) if output is not None else source
    if output is None:
        reason = not_raw_reason(source)
        if reason is not None:
            raise OtaMergeError(f"{reason}: an in-place merge writes it, which only a raw image can take; pass "
                                "--output NEW.img to merge into a copy")
    elif os.path.abspath(final) == os.path.abspath(source):
        raise OtaMergeError(f"--output {final} is the source image: use --in-place to merge into it")
    default_dir = cow_dir is None
    cow_dir = os.fspath(cow_dir) if cow_dir is not None else final + ".ota-merge"
    state_path = os.path.join(cow_dir, STATE_NAME)
    work = final + ".partial" if output is not None else final
    plan = _plan(payload_path, source, slot, partitions)
    identity = {"payload": plan.key, "source": os.path.abspath(source),
                "output": None if output is None else os.path.abspath(final), "slot": slot_suffix(plan.source_slot)[1:],
                "partitions": plan.names}
    state = None
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        if state != identity:
            raise OtaMergeError(f"{cow_dir} holds an interrupted merge of other arguments ({state}); finish it with "
                                "those, or remove the directory to start over (its COW files are partly merged)")
        if output is not None and not os.path.exists(work):
            if not os.path.exists(final):
                raise OtaMergeError(f"{work}, the copy an interrupted merge was writing, is gone; remove {cow_dir} "
                                    "to start over")
            work = final  # renamed already: only the clean-up was left
        log.info("resuming an interrupted ota merge", target=work, cow_dir=cow_dir)
    elif _already_merged(final, plan):
        log.info("the update is merged already", target=final)
        src_suffix = slot_suffix(plan.source_slot)
        return [MergedPartition(n, n + slot_suffix(plan.target_slot), plan.source_meta.partition(n + src_suffix).size,
                                plan.sizes[n], plan.hashes[n], 0, 0) for n in plan.names]
    else:
        if output is not None and os.path.exists(final):
            raise OtaMergeError(f"--output {final} exists: remove it or pick another name")
        os.makedirs(cow_dir, exist_ok=True)
        _make_cows(payload_path, plan, source, cow_dir, slot, verify=verify)
        if output is not None:
            _copy_raw(source, work)
        _write_state(state_path, identity)
    write_metadata(work, plan.geometry, plan.target_slot, plan.target_meta)
    src_suffix, tgt_suffix = slot_suffix(plan.source_slot), slot_suffix(plan.target_slot)
    results = []
    for name in plan.names:
        old = plan.source_meta.partition(name + src_suffix)
        new = plan.target_meta.partition(name + tgt_suffix)
        extents = _extents(new if new.size >= old.size else old)
        cow = os.path.join(cow_dir, f"{name}.cow")
        if not os.path.exists(cow):
            raise OtaMergeError(f"partition {name!r}: {cow} is gone in the middle of its merge; it cannot be "
                                "finished without it")
        io_class = functools.partial(ExtentIO, extents=extents)
        result = trio.run(functools.partial(merge_cow, work, cow, offload=offload, io_class=io_class,
                                            base_size=sum(n for _, n in extents)))
        log.info("partition merged", partition=name, target=name + tgt_suffix, this_run=result.merged_now,
                 ops=result.total_ops)
        results.append(MergedPartition(name, name + tgt_suffix, old.size, plan.sizes[name], "",
                                       result.merged_now, result.total_ops))
    for merged in results:
        got, _ = file_sha256(f"{work}::{merged.target}", merged.size)
        if got != plan.hashes[merged.name]:
            raise PayloadHashError(f"partition {merged.name!r}: {work}::{merged.target} has SHA-256 {got} after the "
                                   f"merge, new_partition_info.hash says {plan.hashes[merged.name]}")
        merged.sha256 = got
    if work != final:
        _fsync_path(work)
        os.replace(work, final)
        _fsync_dir(os.path.dirname(os.path.abspath(final)))
    if default_dir:
        shutil.rmtree(cow_dir)
    else:
        os.unlink(state_path)
        _fsync_dir(cow_dir)
    return results
