"""``dmuserd image ...`` (Android sparse images) and ``dmuserd super ...`` (super images, LP metadata).

Registration only builds parsers; each handler imports what it needs from
:mod:`dmuserd.images`. Problems with an image come out as one line naming
the file, the offset and the rule (:class:`~dmuserd.images.ImageFormatError`).
"""

from __future__ import annotations

import argparse

from dmuserd.daemon.cli import os_errors_as

_os_errors = os_errors_as("dmuserd.images:ImageError")


def register(subparsers) -> None:
    image = subparsers.add_parser(
        "image", help="Android sparse images: unsparse, sparse, inspect",
        description="Convert between raw images and Android sparse images (libsparse's format, what img2simg "
                    "makes and factory images hold).",
    )
    sub = image.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    p = sub.add_parser("unsparse", help="write the raw image a sparse image stands for (checks its CRC32 chunks)")
    p.add_argument("input", help="the sparse image (or a locator: factory.zip::system.img)")
    p.add_argument("output", help="the raw image to write (holes where the sparse image has none)")
    p.set_defaults(func=_unsparse)
    p = sub.add_parser("sparse", help="write a raw image as an Android sparse image")
    p.add_argument("input", help="the raw image (or any locator: super.img::system_a)")
    p.add_argument("output", help="the sparse image to write")
    p.add_argument("--block-size", type=int, default=4096, help="block size (default 4096)")
    p.add_argument("--holes", action="store_true",
                   help="zero blocks as DONT_CARE chunks (a flasher skips them) instead of FILL 0")
    p.add_argument("--crc", action="store_true", help="end with a CRC32 chunk over the whole image")
    p.set_defaults(func=_sparse)
    p = sub.add_parser("inspect", help="what an image is: raw, sparse (its chunks), a partition, a zip entry")
    p.add_argument("input", help="an image or a locator")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_image_inspect)

    sup = subparsers.add_parser(
        "super", help="super images (dynamic partitions): inspect the LP metadata, extract partitions",
        description="Read the LP metadata of a super image (raw or sparse, or a super_empty.img) like lpdump, "
                    "and extract its logical partitions like lpunpack.",
    )
    sub = sup.add_subparsers(dest="super_command", metavar="ACTION", required=True)
    p = sub.add_parser("inspect", help="geometry, metadata slots, partitions, extents, groups, block devices")
    p.add_argument("image", help="super.img (raw or sparse), super_empty.img, or a locator")
    p.add_argument("--slot", help="only this metadata slot (a, b, ...; default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_super_inspect)
    p = sub.add_parser("extract", help="write each logical partition of a slot as OUT/NAME.img")
    p.add_argument("image", help="super.img (raw or sparse) or a locator")
    p.add_argument("-o", "--output-dir", required=True, metavar="OUT/", help="where the images go")
    p.add_argument("--slot", default="a", help="the metadata slot (default a)")
    p.add_argument("--partitions", metavar="A,B", help="only these partitions (default: all with data)")
    p.set_defaults(func=_super_extract)


def _bar(total: int, desc: str):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=not sys.stderr.isatty(),
                leave=False)


@_os_errors
def _unsparse(args: argparse.Namespace) -> int:
    from dmuserd.images import ImageError, open_image
    from dmuserd.images.sparse import SparseImage, unsparse

    with open_image(args.input) as image:
        if not isinstance(image, SparseImage):
            raise ImageError(f"{args.input} is not an Android sparse image (no sparse magic): nothing to unsparse")
        with _bar(image.size, "unsparse") as bar:
            size = unsparse(image, args.output, bar=bar)
        crcs = len(image.crcs)
    checked = f"; {crcs} CRC32 chunk(s) checked" if crcs else ""
    print(f"{args.output}: {size} bytes{checked}")
    return 0


@_os_errors
def _sparse(args: argparse.Namespace) -> int:
    from dmuserd.images import open_image
    from dmuserd.images.sparse import write_sparse

    with open_image(args.input) as image, _bar(image.size, "sparse") as bar:
        counts = write_sparse(image, args.output, block_size=args.block_size, holes=args.holes, crc=args.crc, bar=bar)
    import os

    chunks = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    print(f"{args.output}: {os.path.getsize(args.output)} bytes for {image.size} ({chunks} chunks)")
    return 0


@_os_errors
def _image_inspect(args: argparse.Namespace) -> int:
    import json

    from dmuserd.images import open_image

    with open_image(args.input) as image:
        info = image.describe()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def super_info(super_image, slots) -> dict:
    """What ``dmuserd super inspect --json`` prints: the geometry and each slot's metadata."""
    from dmuserd.images.lp import HEADER_FLAG_NAMES, SECTOR, slot_suffix

    g = super_image.geometry
    info = {
        "path": super_image.path,
        "kind": "super_empty" if super_image.empty else "super",
        "size": super_image.image.size,
        "geometry": {"offset": g.offset, "copy": g.copy, "metadata_max_size": g.metadata_max_size,
                     "metadata_slot_count": g.metadata_slot_count, "logical_block_size": g.logical_block_size},
        "slots": [],
    }
    for slot in slots:
        meta = super_image.metadata(slot)
        info["slots"].append({
            "slot": slot_suffix(meta.slot)[1:],
            "offset": meta.offset,
            "copy": meta.copy,
            "problems": meta.problems,
            "version": f"{meta.major_version}.{meta.minor_version}",
            "header_size": meta.header_size,
            "tables_size": meta.tables_size,
            "flags": [n for bit, n in HEADER_FLAG_NAMES.items() if meta.flags & bit]
            + ([f"{meta.flags & ~3:#x}"] if meta.flags & ~3 else []),
            "partitions": [
                {"name": p.name, "group": p.group, "attributes": p.attribute_names, "size": p.size,
                 "extents": [{"kind": e.kind, "sectors": e.num_sectors,
                              **({"device": meta.block_devices[e.target_source].partition_name,
                                  "start_sector": e.target_data} if e.kind == "linear" else {})}
                             for e in p.extents]}
                for p in meta.partitions
            ],
            "groups": [{"name": gr.name, "maximum_size": gr.maximum_size, "flags": gr.flags} for gr in meta.groups],
            "block_devices": [
                {"name": d.partition_name, "size": d.size, "first_logical_sector": d.first_logical_sector,
                 "first_logical_byte": d.first_logical_sector * SECTOR, "alignment": d.alignment,
                 "alignment_offset": d.alignment_offset, "flags": d.flags}
                for d in meta.block_devices
            ],
        })
    return info


@_os_errors
def _super_inspect(args: argparse.Namespace) -> int:
    import json

    from dmuserd.images import open_super

    with open_super(args.image) as super_image:
        slots = [super_image.check_slot(args.slot)] if args.slot else list(range(super_image.slot_count))
        info = super_info(super_image, slots)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    g = info["geometry"]
    lines = [
        f"Super image: {info['path']} ({info['kind']}, {info['size']} bytes)",
        f"Geometry: {g['copy']} copy at {g['offset']}; metadata max size {g['metadata_max_size']} bytes, "
        f"{g['metadata_slot_count']} slots, logical block size {g['logical_block_size']}",
    ]
    for slot in info["slots"]:
        flags = ", ".join(slot["flags"]) or "none"
        lines.append(f"Slot {slot['slot']}: metadata {slot['version']} ({slot['copy']} copy at {slot['offset']}, "
                     f"{slot['header_size'] + slot['tables_size']} bytes), flags: {flags}")
        for problem in slot["problems"]:
            lines.append(f"  primary copy unusable, the backup was read: {problem}")
        for p in slot["partitions"]:
            attrs = ",".join(p["attributes"]) or "none"
            lines.append(f"  partition {p['name']}: {p['size']} bytes, group {p['group']}, attributes {attrs}")
            for e in p["extents"]:
                if e["kind"] == "linear":
                    lines.append(f"    {e['sectors']} sectors at sector {e['start_sector']} of {e['device']}")
                else:
                    lines.append(f"    {e['sectors']} sectors of zeros")
        for gr in slot["groups"]:
            limit = f"{gr['maximum_size']} bytes" if gr["maximum_size"] else "no limit"
            lines.append(f"  group {gr['name']}: {limit}")
        for d in slot["block_devices"]:
            lines.append(f"  block device {d['name']}: {d['size']} bytes, partitions from byte "
                         f"{d['first_logical_byte']}, alignment {d['alignment']}")
    print("\n".join(lines))
    return 0


@_os_errors
def _super_extract(args: argparse.Namespace) -> int:
    import os

    from dmuserd.images import ImageError, open_super
    from dmuserd.images.lp import LogicalPartition

    wanted = [p for p in (args.partitions or "").split(",") if p]
    with open_super(args.image) as super_image:
        meta = super_image.metadata(args.slot)
        names = [p.name for p in meta.partitions]
        missing = [w for w in wanted if w not in names]
        if missing:
            raise ImageError(f"{args.image}: no partition {', '.join(missing)} in the metadata of slot {args.slot} "
                             f"(it has: {', '.join(names) or 'none'})")
        parts = [p for p in meta.partitions if (p.name in wanted if wanted else p.size)]
        if super_image.empty:
            raise ImageError(f"{args.image} is a super_empty.img: metadata only, no partition data to extract")
        views = [LogicalPartition(super_image, meta, p) for p in parts]  # refuses bad extents before writing
        os.makedirs(args.output_dir, exist_ok=True)
        for view in views:
            out = os.path.join(args.output_dir, f"{view.name}.img")
            with _bar(view.size, view.name) as bar:
                _copy_out(view, out, bar)
            print(f"{out}: {view.name}, {view.size} bytes")
        skipped = [p.name for p in meta.partitions if p not in parts]
        if skipped and not wanted:
            print(f"skipped (no data): {', '.join(skipped)}")
    return 0


def _copy_out(view, output: str, bar) -> None:
    """The partition's bytes to ``output`` (zero extents and all-zero pieces left as holes)."""
    from dmuserd.images._image import write_atomically

    step = 1 << 20

    def write(fd: int) -> None:
        import os

        os.ftruncate(fd, view.size)
        for offset in range(0, view.size, step):
            data = view.pread(min(step, view.size - offset), offset)
            if data.count(0) != len(data):
                os.pwrite(fd, data, offset)
            bar.update(len(data))

    write_atomically(output, write)
