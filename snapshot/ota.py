"""Apply an Android OTA payload the way Virtual A/B does: one COW file per partition.

On a Virtual A/B device update_engine does not write the new partition; it
writes a COW file that snapuserd serves over the old partition and later
merges into it in place. :func:`apply_payload` does the same for each
partition of a ``payload.bin`` (``../shared/specs/ota-payload.md``):

* up front, the SOURCE_COPY blocks: those a ``COW_COPY`` merge operation
  covers become Copy ops, in the payload's merge order and written as the
  COW's sequence data (as AOSP's ``ConvertToCowOperations`` and
  ``WriteMergeSequence`` do; blocks copied onto themselves need no op);
  SOURCE_COPY blocks no merge operation covers become Replace ops holding
  the source block. A payload without merge operations (older minor
  versions, like the test vectors) gets its merge order computed here: the
  same ordering ``dmuserd cow create`` uses (a topological sort of "must
  merge before the op overwriting my source", a cycle broken by turning a
  member into a Replace), so the in-place merge is safe either way. Then
  label 0;
* then each install operation in order, followed by a label with the next
  operation's index: REPLACE/REPLACE_BZ/REPLACE_XZ → Replace; ZERO/DISCARD
  → Zero; the diff operations (SOURCE_BSDIFF, BROTLI_BSDIFF, PUFFDIFF,
  ZUCCHINI, LZ4DIFF_BSDIFF, LZ4DIFF_PUFFDIFF; one module per format, see
  :func:`~dmuserd.snapshot._payload_data.apply_diff`) → the patch applied
  to the source extents, written as Xor ops against the source where a
  ``COW_XOR`` merge operation says so, as Replace ops elsewhere;
  SOURCE_COPY → nothing more;
* last, for a partition with dm-verity fields, the hash tree and the FEC
  that update_engine computes on the device after the data
  (:mod:`~dmuserd.snapshot._verity`), computed from the partition the
  operations made and written as Replace ops, with a label of their own.

The file is written under a hidden temporary name in the output directory
(``.NAME.cow.KEY.partial``, KEY naming the payload and the COW settings),
checked when complete (the reader validates it and its merge order; the
rendered partition's SHA-256 must equal ``new_partition_info.hash``), then
renamed to ``NAME.cow``. A failure removes the temporary file. An
interruption (Ctrl-C, a crash) leaves it, and the next run with the same
payload and settings resumes at its last label.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from dmuserd.snapshot._compression import parse_spec
from dmuserd.snapshot._cow_format import MAX_FACTOR_SHIFT, Compression, CowError, CowFormatError
from dmuserd.snapshot._cow_format import OpType as CowOpType
from dmuserd.snapshot._cow_reader import CowReader
from dmuserd.snapshot._cow_tools import _order as order_copies
from dmuserd.snapshot._cow_writer import CowWriter, xor_bytes
from dmuserd.snapshot._payload_data import DataError, apply_diff, replace_data
from dmuserd.snapshot.payload import (
    SUPPORTED_OPS,
    MergeOpType,
    OpType,
    Payload,
    PayloadError,
    PayloadFormatError,
    PayloadHashError,
    UnsupportedOperationError,
    op_where,
)
from dmuserd.snapshot.view import SnapshotView

log = structlog.get_logger("dmuserd.ota")

#: how a partition's old image is named in ``--source-dir`` (first found wins)
SOURCE_NAMES = ("{name}.img", "{name}")
_CHUNK = 1 << 20
_DIFF_OPS = (OpType.SOURCE_BSDIFF, OpType.BROTLI_BSDIFF, OpType.PUFFDIFF, OpType.ZUCCHINI, OpType.LZ4DIFF_BSDIFF,
             OpType.LZ4DIFF_PUFFDIFF)
_REPLACE_OPS = (OpType.REPLACE, OpType.REPLACE_BZ, OpType.REPLACE_XZ)


class SourceImageError(PayloadError):
    """The old partition image is missing or does not fit the payload."""


@dataclass(frozen=True)
class CowSettings:
    """How the COW files are written: version, compression, v3 chunk size."""

    version: int = 2
    compression: Compression = Compression.NONE
    level: int | None = None
    factor: int | None = None

    def key(self) -> str:
        return f"v{self.version}-{self.compression.name.lower()}-{self.level}-{self.factor}"


def cow_settings(payload: Payload, *, version: int | None = None, compression: str | None = None) -> CowSettings:
    """The manifest's VABC settings (``cow_version``, ``vabc_compression_param``,
    ``compression_factor``), overridden by what the user asked for.

    A manifest without them gets COW v2, uncompressed.
    """
    m = payload.manifest
    dpm = m.dynamic_partition_metadata if m.HasField("dynamic_partition_metadata") else None
    if version is None:
        version = (dpm.cow_version if dpm is not None else 0) or 2
        if version not in (2, 3):
            raise PayloadError(f"payload {payload.path} asks for COW version {version}; dmuserd writes 2 and 3: "
                               "pass --cow-version 2 or 3")
    if compression is None:
        compression = (dpm.vabc_compression_param if dpm is not None else "") or "none"
    try:
        algorithm, level = parse_spec(compression)
    except CowError as exc:
        raise PayloadError(f"compression {compression!r}: {exc}") from None
    factor = None
    if version >= 3 and dpm is not None and dpm.compression_factor:
        factor = dpm.compression_factor
        bs = payload.block_size
        k = factor // bs
        if factor % bs or k & (k - 1) or factor > bs << MAX_FACTOR_SHIFT:
            raise PayloadFormatError("manifest", "compression-factor",
                                     f"compression_factor {factor} is not block_size << 0..{MAX_FACTOR_SHIFT}",
                                     path=payload.path)
    return CowSettings(version, algorithm, level, factor)


def target_slot(slot) -> int:
    """The slot an A/B update writes when the old build is in ``slot``: b (1) for a, a (0) for b.

    As update_engine: the source slot's partitions are read, the other
    slot's (``system_b`` for an old build in slot a) are written.
    """
    from dmuserd.images.lp import SuperLookupError, slot_number

    try:
        number = slot_number(slot)
    except SuperLookupError as exc:
        raise PayloadError(f"--slot {slot}: {exc}") from None
    if number not in (0, 1):
        raise PayloadError(f"--slot {slot}: an A/B update goes from slot a to b or from b to a")
    return 1 - number


def find_source(source_dir, name: str, slot: str | None = None) -> str:
    """The old image of partition ``name``, as a locator of :mod:`dmuserd.images`.

    ``source_dir`` is one source or a list of them, tried in order (first
    found wins): a folder of images (``NAME.img`` or ``NAME``, raw or
    Android sparse), a zip of such images (a factory image), or a super
    image (raw or sparse), whose logical partition ``NAME_SLOT`` is taken.
    With ``slot`` (``a``, ``b``: the slot the old build is in),
    ``NAME_SLOT.img`` and ``NAME_SLOT`` are looked for first in folders and
    zips too.
    """
    if source_dir is None:
        raise SourceImageError(
            f"partition {name!r} is a delta update: it needs the old image; pass --source-dir (or --source): a "
            f"folder with {SOURCE_NAMES[0].format(name=name)} in it, a factory-image zip or a super image"
        )
    sources = [source_dir] if isinstance(source_dir, (str, os.PathLike)) else list(source_dir)
    names = [pattern.format(name=f"{name}_{slot}") for pattern in SOURCE_NAMES] if slot else []
    names += [pattern.format(name=name) for pattern in SOURCE_NAMES]
    tried = []
    for source in sources:
        found, looked = _find_in_source(os.fspath(source), name, names, slot)
        if found is not None:
            return found
        tried.append(looked)
    raise SourceImageError(f"partition {name!r}: no old image in {'; nor in '.join(tried)}")


def _find_in_source(source: str, name: str, names: list[str], slot: str | None) -> tuple[str | None, str]:
    """``(locator, "")`` of partition ``name`` in one source, or ``(None, what was looked for)``."""
    from dmuserd.images import SEP, open_image, split_locator
    from dmuserd.images._zip import entry_names, is_zip
    from dmuserd.images.lp import LpFormatError, SuperImage, slot_number, slot_suffix

    head, members = split_locator(source)
    if not members and os.path.isdir(head):
        tried = [os.path.join(source, n) for n in names]
        found = next((path for path in tried if os.path.exists(path)), None)
        return found, f"{source} (looked for {' and '.join(tried)})"
    with open_image(source) as image:
        if is_zip(image):
            entries = set(entry_names(image, source))
            found = next((n for n in names if n in entries), None)
            return (None if found is None else f"{source}{SEP}{found}"), f"the zip {source} (looked for " \
                f"{', '.join(names)})"
        try:
            sup = SuperImage(image, source)
        except LpFormatError as exc:
            if exc.rule != "geometry-magic":
                raise
            raise SourceImageError(f"--source {source} is neither a folder, a zip of images nor a super image "
                                   "(no LP geometry)") from None
        meta = sup.metadata(slot if slot else 0)
        have = [p.name for p in meta.partitions]
        if slot:
            wanted = f"{name}{slot_suffix(slot_number(slot))}"
            if wanted in have:
                return f"{source}{SEP}{wanted}", ""
        elif name in have:
            return f"{source}{SEP}{name}", ""
        elif any(n in have for n in (f"{name}_a", f"{name}_b")):
            raise SourceImageError(f"partition {name!r}: the super image {source} has it per slot "
                                   f"({', '.join(n for n in have if n.startswith(name + '_'))}): pass --slot with "
                                   "the slot the old build is in (a or b)")
        want = f"{name}{slot_suffix(slot_number(slot))}" if slot else name
        return None, f"the super image {source} (no partition {want!r} in slot {slot or 'a'}, metadata at offset " \
            f"{meta.offset}: it has {', '.join(have) or 'none'})"


@dataclass
class PartitionResult:
    """One converted partition: serve it as ``snapshot:base=BASE,cow=COW,size=SIZE``."""

    name: str
    cow: str
    base: str
    size: int
    sha256: str
    operations: int
    resumed_at: int | None = None
    counts: dict = field(default_factory=dict)


def apply_payload(
    payload_path,
    *,
    cow_dir,
    source_dir=None,
    partitions: list[str] | None = None,
    version: int | None = None,
    compression: str | None = None,
    verify: bool = True,
    progress: bool | None = None,
    on_operation: Callable[[str, int], None] | None = None,
    mover=None,
    slot: str | None = None,
    check_sources: bool = True,
) -> list[PartitionResult]:
    """Write ``cow_dir/NAME.cow`` for each partition (all, or ``partitions``).

    ``source_dir`` holds the old images (needed for delta partitions): see
    :func:`find_source`, with ``slot`` the slot the old build is in.
    ``verify`` checks each result's SHA-256 against ``new_partition_info``
    before it gets its final name. ``progress`` None: a tqdm bar when
    stderr is a terminal. ``on_operation(partition, index)`` is called after
    each install operation is written and labelled. ``mover`` (a
    :class:`~dmuserd.dsa_offload.BlockingMover`) assembles the blocks the
    verification hashes; without one, the CPU does. ``check_sources``
    False leaves out the old images' whole-image hashes (their sizes are
    still checked): with ``verify`` False too, a caller that wants the
    partitions early checks each later with :func:`check_partition`.
    """
    with Payload(payload_path) as payload:
        names = list(payload.partitions) if not partitions else list(dict.fromkeys(partitions))
        parts = [payload.partition(n) for n in names]
        settings = cow_settings(payload, version=version, compression=compression)
        # everything that can be refused up front is, before any file is written
        sources = {}
        verity = {}
        for part in parts:
            check_supported(part)
            verity[part.partition_name] = verity_params(payload, part)
            if part.HasField("old_partition_info"):
                sources[part.partition_name] = find_source(source_dir, part.partition_name, slot)
        for part in parts:
            if part.partition_name in sources:
                check_source_image(part, sources[part.partition_name], whole=check_sources)
        os.makedirs(cow_dir, exist_ok=True)
        results = []
        with progress_bar(sum(len(p.operations) for p in parts), progress) as bar:
            for part in parts:
                bar.set_description(f"ota apply {part.partition_name}")
                converter = _PartitionConverter(payload, part, sources.get(part.partition_name), settings,
                                                verity[part.partition_name])
                converter.mover = mover
                results.append(converter.run(cow_dir, verify, bar, on_operation))
        return results


def check_payload(payload_path, *, cert=None, whole: bool = True, progress: bool | None = None) -> list[str]:
    """Check a payload (or OTA zip) before use; one line per thing checked or not.

    With an OTA zip, its ``payload_properties.txt`` sizes and hashes (the
    whole-file hash only with ``whole``); with ``cert``, both signatures
    (:mod:`~dmuserd.snapshot._payload_signature`). Raises
    :class:`PayloadError` at the first mismatch.
    """
    from dmuserd.snapshot import _ota_zip, _payload_signature

    lines = []
    with Payload(payload_path) as payload:
        location = payload.location
        if location.package is not None:
            checked = _ota_zip.check_metadata(location, payload.read, payload.metadata_size)
            if whole:
                with progress_bar(location.size, progress, desc="payload hash", unit="B") as bar:
                    checked += _ota_zip.check_file(location, payload.read, bar=bar)
            lines.append(f"{_ota_zip.PROPERTIES_NAME}: " + (", ".join(checked) + " match" if checked else
                                                            "missing or empty: the payload's hashes are not checked"))
        if cert is None:
            lines.append("signatures: not checked (pass --cert with the signer's certificate to check them)")
        else:
            with progress_bar(payload.data_size, progress, desc="signature", unit="B") as bar:
                _payload_signature.verify(payload, cert, bar=bar)
            lines.append(f"signatures: metadata and payload signatures verified against {cert}")
    return lines


def verity_params(payload: Payload, part):
    """The partition's dm-verity fields, checked (None when it has no hash tree and no FEC)."""
    from dmuserd.snapshot._verity import VerityError, VerityParams

    try:
        return VerityParams.from_partition(part, block_size=payload.block_size,
                                           partition_size=part.new_partition_info.size)
    except VerityError as exc:
        raise PayloadFormatError(f"partition {part.partition_name!r}", "verity", str(exc),
                                 path=payload.path) from None


def check_supported(part) -> None:
    """Refuse, before anything is written, an operation dmuserd cannot apply."""
    for i, op in enumerate(part.operations):
        op_type = OpType(op.type)
        if op_type not in SUPPORTED_OPS:
            known = ", ".join(t.name for t in sorted(SUPPORTED_OPS))
            raise UnsupportedOperationError(
                f"{op_where(part.partition_name, i)}: unsupported operation {op_type.name}; dmuserd applies "
                f"{known} (apply this payload with update_engine)"
            )


def check_source_image(part, path: str, *, whole: bool = True) -> None:
    """The old image must be as long as the old partition and, when the
    manifest has ``old_partition_info.hash`` (and ``whole``), be that image
    (one read, so a wrong image is refused before anything is written;
    operations' ``src_sha256_hash`` are checked again as they are applied)."""
    from dmuserd.images import ImageError, open_image

    name, info = part.partition_name, part.old_partition_info
    try:
        with open_image(path) as image:
            size = image.size
    except ImageError as exc:
        raise SourceImageError(f"partition {name!r}: the old image: {exc}") from None
    if size < info.size:
        raise SourceImageError(
            f"partition {name!r}: the old image {path} is {size} bytes, the payload's old partition is "
            f"{info.size}: pass the image the payload was made for"
        )
    if info.hash and whole:
        got, _ = file_sha256(path, info.size)
        if got != info.hash.hex():
            raise PayloadHashError(
                f"partition {name!r}: the old image {path} has SHA-256 {got}, old_partition_info.hash says "
                f"{info.hash.hex()}; this is not the old {name!r} image the payload was made for: pass the "
                "right --source-dir"
            )


def progress_bar(total: int, enabled: bool | None, *, desc: str = "ota apply", unit: str = "op"):
    """A tqdm bar on stderr; ``enabled`` None: only when stderr is a terminal."""
    from tqdm import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=sys.stderr, disable=disable,
                leave=False)


def _fsync_dir(path) -> None:
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PartitionConverter:
    """One partition's install operations → one COW file."""

    def __init__(self, payload: Payload, part, source: str | None, settings: CowSettings, verity=None) -> None:
        self.payload = payload
        self.verity = verity  # VerityParams, or None
        self.part = part
        self.name = part.partition_name
        self.settings = settings
        self.bs = payload.block_size
        self.new_size = part.new_partition_info.size
        self.new_blocks = -(-self.new_size // self.bs)
        self.old_size = part.old_partition_info.size if part.HasField("old_partition_info") else 0
        self.source = source
        self.mover = None  # the data mover the verification reads through (None: the CPU)
        self.base = source if source is not None else os.devnull

    # --- driver ------------------------------------------------------------------

    def run(self, cow_dir, verify: bool, bar, on_operation) -> PartitionResult:
        final = os.path.join(os.fspath(cow_dir), f"{self.name}.cow")
        key = hashlib.sha256(
            self.payload.manifest_raw + f"\0{self.name}\0{self.settings.key()}".encode()
        ).hexdigest()[:16]
        temp = os.path.join(os.fspath(cow_dir), f".{self.name}.cow.{key}.partial")
        pattern = os.path.join(glob.escape(os.fspath(cow_dir)), f".{glob.escape(self.name)}.cow.*.partial")
        for stale in glob.glob(pattern):
            if stale != temp:
                os.unlink(stale)
        src = None  # the old image (a dmuserd.images.Image), when the partition has one
        writer = None
        try:
            if self.source is not None:
                src = self._open_source()
            ops = len(self.part.operations)
            last = ops + (self.verity is not None)  # the verity blocks get a label of their own
            resume_at = _last_label(temp, last) if os.path.exists(temp) else None
            if resume_at is None:
                plan = self._plan()
                writer = CowWriter(temp, version=self.settings.version, compression=self.settings.compression,
                                   compression_level=self.settings.level, block_size=self.bs,
                                   compression_factor=self.settings.factor,
                                   op_count_max=max(1, self.new_blocks) if self.settings.version >= 3 else None)
                self._write_upfront(writer, src, plan)
                writer.add_label(0)
                start = 0
            else:
                log.info("resuming an interrupted conversion", partition=self.name, label=resume_at, file=temp)
                plan = self._plan()
                writer = CowWriter.resume(temp, resume_at, compression=self.settings.compression,
                                          compression_level=self.settings.level)
                start = resume_at
            bar.update(min(start, ops))  # operations done before the interruption
            xor_map = plan[3]
            for index in range(start, ops):
                self._write_operation(writer, src, index, xor_map)
                writer.add_label(index + 1)
                bar.update(1)
                if on_operation is not None:
                    on_operation(self.name, index)
            writer.finalize()
            writer = None
            if self.verity is not None and start <= ops:
                writer = self._write_verity(temp)
                writer.finalize()
                writer = None
            counts, digest = self._check(temp, verify)
            os.replace(temp, final)
            _fsync_dir(cow_dir)
        except KeyboardInterrupt:
            # interrupted, not failed: keep the file, resumable from its last label
            if writer is not None:
                writer.close()
            raise
        except BaseException:
            if writer is not None:
                writer.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        finally:
            if src is not None:
                src.close()
        log.info("partition converted", partition=self.name, cow=final, ops=len(self.part.operations),
                 resumed_at=resume_at, **counts)
        return PartitionResult(self.name, final, self.base, self.new_size, digest, len(self.part.operations),
                               resume_at, counts)

    def _write_verity(self, temp: str) -> CowWriter:
        """Append the hash tree and FEC (computed from the partition the operations made) as Replace ops.

        update_engine computes them on the device after the data operations
        (``VerityWriterAndroid``); here they are computed from the finished
        file rendered over the old image, then written after the last
        operation's label with a label of their own.
        """
        from dmuserd.snapshot._verity import verity_writes

        bs = self.bs
        ops = len(self.part.operations)
        log.info("computing the dm-verity hash tree and FEC", partition=self.name)
        with CowReader(temp, base_size=self.old_size, target_size=self.new_size, check_merge=False) as reader, \
                SnapshotView(reader, self.base, size=self.new_size) as view:
            writes = list(verity_writes(self.verity, lambda start, count: view.read(start * bs, count * bs)))
        writer = CowWriter.resume(temp, ops, compression=self.settings.compression,
                                  compression_level=self.settings.level)
        for block, data in writes:
            writer.add_replace(block, data)
        writer.add_label(ops + 1)
        return writer

    def _open_source(self):
        """The old image as a :class:`dmuserd.images.Image` (raw, sparse, a super partition, a zip entry)."""
        from dmuserd.images import ImageError, open_image

        try:
            return open_image(self.source)
        except ImageError as exc:
            raise SourceImageError(f"partition {self.name!r}: the old image: {exc}") from None

    def _check(self, temp: str, verify: bool) -> tuple[dict, str]:
        """Read the finished file back (format and merge order) and hash what it renders."""
        try:
            reader = CowReader(temp, base_size=self.old_size, target_size=self.new_size)
        except CowFormatError as exc:
            if exc.rule not in ("source-overwritten", "ordered-after-unordered"):
                raise
            # the payload's merge operations put a copy after the op overwriting its source
            raise self._fail(f"partition {self.name!r} merge operations", "merge-order",
                             f"merging in this order is unsafe: {exc.detail}") from None
        with reader:
            counts = {k: v for k, v in reader.counts().items() if v and k in ("copy", "xor", "replace", "zero")}
            if not verify:
                return counts, ""
            return counts, check_rendered(self.part, reader, self.base, self.source is not None, mover=self.mover)

    # --- what to write -------------------------------------------------------------

    def _fail(self, where: str, rule: str, detail: str) -> PayloadFormatError:
        return PayloadFormatError(where, rule, detail, path=self.payload.path)

    def _plan(self):
        """(sequence, copies [(dst, src)], source replaces [(dst, src)], xor map {dst: base byte offset})."""
        bs = self.bs
        source_copy: dict[int, int] = {}
        diff_blocks: set[int] = set()
        for op in self.part.operations:
            if op.type == OpType.SOURCE_COPY:
                srcs = (e.start_block + k for e in op.src_extents for k in range(e.num_blocks))
                dsts = (e.start_block + k for e in op.dst_extents for k in range(e.num_blocks))
                source_copy.update(zip(dsts, srcs))
            elif op.type in _DIFF_OPS:
                diff_blocks.update(e.start_block + k for e in op.dst_extents for k in range(e.num_blocks))
        merges = self.part.merge_operations
        if not merges:
            kinds = bytearray(self.new_blocks)
            sources = {}
            for dst, src in source_copy.items():
                if dst != src:
                    kinds[dst] = int(CowOpType.COPY)
                    sources[dst] = src
            sequence, _broken = order_copies(kinds, sources)
            copies = [(b, sources[b]) for b in sequence]
            replaces = sorted((d, s) for d, s in source_copy.items() if d != s and d not in sources)
            return sequence, copies, replaces, {}
        copy_dst: set[int] = set()
        copies: list[tuple[int, int]] = []
        xor_map: dict[int, int] = {}
        sequence: list[int] = []
        named: set[int] = set()
        for m, merge in enumerate(merges):
            mw = f"partition {self.name!r} merge operation #{m}"
            src, dst = merge.src_extent, merge.dst_extent
            n = dst.num_blocks
            if merge.type == MergeOpType.COW_COPY:
                for k in range(n):
                    d, s = dst.start_block + k, src.start_block + k
                    if source_copy.get(d) != s:
                        raise self._fail(mw, "merge-op", f"COW_COPY says new block {d} is old block {s}; no "
                                         "SOURCE_COPY operation copies that")
                    copy_dst.add(d)
                if src.start_block == dst.start_block:
                    continue  # a copy onto itself: nothing to merge
                # AOSP adds the blocks of an extent in reverse
                copies.extend((dst.start_block + k, src.start_block + k) for k in reversed(range(n)))
                blocks = [dst.start_block + k for k in range(n)]
            elif merge.type == MergeOpType.COW_XOR:
                blocks = []
                for k in range(n):
                    d = dst.start_block + k
                    if d not in diff_blocks:
                        raise self._fail(mw, "merge-op", f"COW_XOR covers new block {d}, which no diff operation "
                                         "writes")
                    offset = (src.start_block + k) * bs + merge.src_offset
                    if offset + bs <= self.old_size:  # else: the source runs off the partition; a Replace
                        xor_map[d] = offset
                        blocks.append(d)
            else:
                continue  # COW_REPLACE: a plain Replace, merged after the ordered ops
            overlap = dst.start_block < src.start_block + src.num_blocks and src.start_block < dst.start_block + n
            if overlap and dst.start_block > src.start_block:
                blocks.reverse()  # a self-overlapping shift up merges from the top (WriteMergeSequence)
            for b in blocks:
                if b in named:
                    raise self._fail(mw, "merge-op", f"new block {b} is in two merge operations")
                named.add(b)
                sequence.append(b)
        replaces = sorted((d, s) for d, s in source_copy.items() if d != s and d not in copy_dst)
        return sequence, copies, replaces, xor_map

    def _read_source(self, src, offset: int, length: int) -> bytes:
        data = src.pread(length, offset) if offset + length <= src.size else b""
        if len(data) != length:
            raise SourceImageError(f"partition {self.name!r}: the old image {self.source} ends before byte "
                                   f"{offset + length}")
        return data

    def _source_extents(self, src, op) -> bytes:
        bs = self.bs
        return b"".join(self._read_source(src, e.start_block * bs, e.num_blocks * bs) for e in op.src_extents)

    def _write_upfront(self, writer: CowWriter, src, plan) -> None:
        sequence, copies, replaces, _xor = plan
        # the source blocks copied must be the ones the payload expects
        for i, op in enumerate(self.part.operations):
            if op.type == OpType.SOURCE_COPY and op.HasField("src_sha256_hash"):
                self.payload.check_source(self.name, i, op, self._source_extents(src, op), self.source)
        if sequence:
            writer.add_sequence_data(sequence)
        for dst, from_block in copies:
            writer.add_copy(dst, from_block)
        bs = self.bs
        i = 0
        while i < len(replaces):  # runs of consecutive (dst, src) in one Replace
            j = i + 1
            while (j < len(replaces) and j - i < _CHUNK // bs and replaces[j][0] == replaces[j - 1][0] + 1
                   and replaces[j][1] == replaces[j - 1][1] + 1):
                j += 1
            writer.add_replace(replaces[i][0], self._read_source(src, replaces[i][1] * bs, (j - i) * bs))
            i = j

    def _write_operation(self, writer: CowWriter, src, index: int, xor_map: dict[int, int]) -> None:
        op = self.part.operations[index]
        op_type = OpType(op.type)
        bs = self.bs
        dst_bytes = sum(e.num_blocks for e in op.dst_extents) * bs
        if op_type in (OpType.ZERO, OpType.DISCARD):
            for e in op.dst_extents:
                writer.add_zero(e.start_block, e.num_blocks)
            return
        if op_type == OpType.SOURCE_COPY:
            return  # written up front
        blob = self.payload.read_blob(self.name, index, op)
        try:
            if op_type in _REPLACE_OPS:
                data = replace_data(op_type, blob, dst_bytes)
            else:
                source = self._source_extents(src, op)
                self.payload.check_source(self.name, index, op, source, self.source)
                data = apply_diff(op_type, blob, source, dst_bytes)
        except DataError as exc:
            raise self._fail(op_where(self.name, index), "blob-data", str(exc)) from None
        view = memoryview(data)
        pos = 0  # blocks of ``data`` used so far
        for e in op.dst_extents:
            k = 0
            while k < e.num_blocks:
                block = e.start_block + k
                offset = xor_map.get(block)
                if offset is not None:
                    new = view[(pos + k) * bs : (pos + k + 1) * bs]
                    writer.add_xor(block, xor_bytes(new, self._read_source(src, offset, bs)), offset)
                    k += 1
                    continue
                j = k + 1
                while j < e.num_blocks and e.start_block + j not in xor_map:
                    j += 1
                writer.add_replace(block, view[(pos + k) * bs : (pos + j) * bs])
                k = j
            pos += e.num_blocks


def _last_label(path: str, max_label: int) -> int | None:
    """The highest label of an unfinished conversion, or None when it has none (start over).

    v3 publishes its newest resume points in the header. An unfinished v2
    file reads only up to a label; its labels are 0, 1, 2, ... in order, so
    label L exists exactly when the file reads up to L: a binary search.
    """
    def labels(label: int | None) -> list[int] | None:
        try:
            with CowReader(path, label=label, check_merge=False) as reader:
                return reader.labels
        except (CowError, OSError):
            return None

    found = labels(None)
    if found is not None or labels(0) is None:
        return max(found) if found else None
    low, high = 0, max_label  # label ``low`` exists
    while low < high:
        mid = (low + high + 1) // 2
        if labels(mid) is not None:
            low = mid
        else:
            high = mid - 1
    return low


def check_rendered(part, reader: CowReader, base, has_source: bool, *, mover=None) -> str:
    """SHA-256 of what the COW file of ``reader`` renders over ``base``, which must be
    ``new_partition_info.hash`` (:class:`PayloadHashError` naming the partition)."""
    digest = render_sha256(reader, base, part.new_partition_info.size, mover=mover)
    want = part.new_partition_info.hash.hex()
    if digest != want:
        hint = "the old image may not be the one the payload was made for" if has_source else "the payload is corrupt"
        raise PayloadHashError(
            f"partition {part.partition_name!r}: the converted COW renders to SHA-256 {digest}, new_partition_info "
            f"says {want}; {hint}"
        )
    return digest


def check_partition(payload_path, result: PartitionResult, *, mover=None) -> str:
    """The checks :func:`apply_payload` leaves out with ``check_sources`` and ``verify`` False, made on its
    ``result`` afterwards: the old image's SHA-256, then the rendered partition's; returns the latter."""
    with Payload(payload_path) as payload:
        part = payload.partition(result.name)
    has_source = part.HasField("old_partition_info")
    if has_source:
        check_source_image(part, result.base)
    with CowReader(result.cow, base_size=part.old_partition_info.size if has_source else 0,
                   target_size=part.new_partition_info.size) as reader:
        return check_rendered(part, reader, result.base, has_source, mover=mover)


def render_sha256(reader: CowReader, base, size: int, *, bar=None, mover=None) -> str:
    """SHA-256 of the partition ``base`` + the COW file of ``reader`` renders (``size`` bytes).

    ``mover``: a :class:`~dmuserd.dsa_offload.BlockingMover` placing the blocks (None: the CPU)."""
    digest = hashlib.sha256()
    with SnapshotView(reader, base, size=size) as view:
        for offset in range(0, size, _CHUNK):
            chunk = view.read(offset, min(_CHUNK, size - offset), mover)
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


def file_sha256(path, size: int, *, bar=None) -> tuple[str, int]:
    """SHA-256 of the first ``size`` bytes of an image, and how many bytes it had.

    ``path``: a file or block device, or any locator of :mod:`dmuserd.images`
    (an Android sparse image reads as the raw image it stands for).
    """
    from dmuserd.images import open_image

    digest = hashlib.sha256()
    with open_image(path) as image:
        done = 0
        while done < min(size, image.size):
            chunk = image.pread(min(_CHUNK, size - done, image.size - done), done)
            digest.update(chunk)
            done += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest(), done
