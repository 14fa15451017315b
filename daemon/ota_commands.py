"""``dmuserd ota ...``: inspect, apply, serve and verify Android OTA payloads.

Registration only builds parsers; each handler imports what it needs.
Problems with the payload or the images come out as one line through the
CLI's DmuserdError path (:class:`~dmuserd.snapshot.payload.PayloadError`).
"""

from __future__ import annotations

import argparse

from dmuserd.daemon.cli import os_errors_as
from dmuserd.daemon.cow_commands import offload_option


_os_errors = os_errors_as("dmuserd.snapshot.payload:PayloadError")


def _partitions(text: str | None) -> list[str] | None:
    return [p for p in text.split(",") if p] if text else None


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", "--source-dir", dest="source_dir", action="append", metavar="OLD",
                   help="the old build (needed for a delta payload): a folder of images NAME.img or NAME (raw or "
                        "Android sparse), a factory-image zip of them, or a super image (raw or sparse); "
                        "repeat it to look in several, in order")
    p.add_argument("--slot", help="the slot the old build is in (a or b): a super image's partitions NAME_SLOT are "
                                  "the old images, and the new partitions are NAME with the other slot's suffix")


def served_name(name: str, slot: str | None) -> str:
    """What a new partition is called: ``system`` with ``--slot a`` is ``system_b`` (the target slot)."""
    if not slot:
        return name
    from dmuserd.images.lp import slot_suffix
    from dmuserd.snapshot.ota import target_slot

    return f"{name}{slot_suffix(target_slot(slot))}"


def _cow_options(p: argparse.ArgumentParser) -> None:
    _source_options(p)
    p.add_argument("--partitions", metavar="A,B", help="only these partitions (default: all)")
    p.add_argument("--cow-version", type=int, choices=(2, 3), default=None,
                   help="COW format version (default: the payload's cow_version, else 2)")
    p.add_argument("--compression", default=None,
                   help="none, gz, brotli, lz4 or zstd, optionally ',LEVEL' "
                        "(default: the payload's vabc_compression_param, else none)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking each converted partition against new_partition_info.hash, and an OTA "
                        "zip's payload against its FILE_HASH")
    _cert_option(p)


def _cert_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cert", metavar="CERT.pem",
                   help="the signer's X.509 certificate (PEM or DER) or public key: check the payload's "
                        "signatures (without it they are not checked, and the command says so)")


def _check(args, *, whole: bool) -> None:
    """Check the package and signatures; print one line per check."""
    from dmuserd.snapshot.ota import check_payload

    for line in check_payload(args.payload, cert=args.cert, whole=whole):
        print(line, flush=True)


def register(subparsers) -> None:
    ota = subparsers.add_parser(
        "ota", help="Android OTA payloads (payload.bin): inspect, apply as COW files, serve, verify",
        description="Apply Android OTA payloads the way Virtual A/B does: each partition becomes a COW file "
                    "over its old image, served as a snapshot target.",
    )
    sub = ota.add_subparsers(dest="ota_command", metavar="ACTION", required=True)

    p = sub.add_parser("inspect", help="list a payload's partitions, sizes and operation counts")
    p.add_argument("payload", help="the payload.bin or the OTA zip holding it")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("apply", help="write COW_DIR/NAME.cow for each partition")
    p.add_argument("payload", help="the payload.bin or the OTA zip holding it")
    p.add_argument("--cow-dir", required=True, metavar="OUT/", help="where the COW files go")
    _cow_options(p)
    offload_option(p)
    p.set_defaults(func=_apply)

    p = sub.add_parser("serve", help="convert, then serve each new partition as a snapshot target")
    p.add_argument("payload", help="the payload.bin or the OTA zip holding it")
    p.add_argument("--export", action="append", default=[], metavar="KIND:WHERE", required=True,
                   help="fuse:DIR (one file per partition), nbd:SOCKET...; {name} in WHERE becomes the "
                        "partition name (repeatable)")
    p.add_argument("--cow-dir", metavar="OUT/",
                   help="keep the COW files here (default: a temporary directory removed at exit)")
    p.add_argument("--control-socket", metavar="PATH", help="control socket (default: /run/dmuserd/control.sock)")
    _cow_options(p)
    p.set_defaults(func=_serve, service=True)

    p = sub.add_parser("merge", help="merge the update into a super image (a copy or in place), crash-safely",
                       description="Merge each partition's COW file into the sectors of the super image's source "
                                   "slot partition, and write the target slot's LP metadata (system_a's sectors "
                                   "become system_b's, grown from free space where the new build is bigger), as "
                                   "a Virtual A/B device does. Interrupted at any point, the same command resumes.")
    p.add_argument("payload", help="the payload.bin or the OTA zip holding it")
    p.add_argument("--source", required=True, metavar="super.img", help="the old build's super image (raw or sparse)")
    p.add_argument("--slot", required=True, help="the slot the old build is in (a or b); the other one is written")
    into = p.add_mutually_exclusive_group(required=True)
    into.add_argument("--in-place", action="store_true", help="merge into --source itself (a raw image)")
    into.add_argument("--output", metavar="NEW.img", help="merge into a raw copy of --source written here")
    p.add_argument("--cow-dir", metavar="OUT/",
                   help="the COW files (made here unless usable ones are there) and the state of an interrupted "
                        "merge (default: TARGET.ota-merge, removed when done)")
    p.add_argument("--partitions", metavar="A,B", help="only these partitions (default: all)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the hash checks while making the COW files (the merged partitions are always checked)")
    _cert_option(p)
    offload_option(p)
    p.set_defaults(func=_merge)

    p = sub.add_parser("verify", help="check images, served files or COW files against new_partition_info.hash")
    p.add_argument("payload", help="the payload.bin or the OTA zip holding it")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--image-dir", metavar="DIR",
                       help="new images or served files, NAME or NAME.img (a FUSE export's directory), or a "
                            "super image holding them (after `ota merge`: the target slot's partitions)")
    where.add_argument("--cow-dir", metavar="OUT/", help="COW files NAME.cow, rendered over --source")
    _source_options(p)
    p.add_argument("--partitions", metavar="A,B", help="only these partitions (default: all)")
    _cert_option(p)
    offload_option(p)
    p.set_defaults(func=_verify)


@_os_errors
def _inspect(args: argparse.Namespace) -> int:
    import json

    from dmuserd.snapshot.payload import Payload, describe

    with Payload(args.payload) as payload:
        info = describe(payload)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    lines = []
    package = info.get("package")
    if package:
        meta = package["metadata"]
        where = ("decompressed to a temporary file" if package["payload_offset"] is None
                 else f"stored at offset {package['payload_offset']}")
        lines.append(f"OTA package: {package['path']}; payload.bin {package['payload_size']} bytes, {where}")
        for key, label in (("ota-type", "OTA type"), ("pre-build", "Pre-build"), ("post-build", "Post-build"),
                           ("pre-device", "Device"), ("post-timestamp", "Post timestamp")):
            if key in meta:
                lines.append(f"  {label}: {meta[key]}")
        props = package["properties"]
        lines.append("  payload_properties.txt: " + (", ".join(f"{k}={v}" for k, v in props.items()) or "none"))
    lines += [
        f"Payload: {info['path']} ({info['kind']}, version {info['major_version']}, minor {info['minor_version']})",
        f"Block size: {info['block_size']}",
        f"Manifest: {info['manifest_size']} bytes; metadata signature {info['metadata_signature_size']} bytes; "
        f"data {info['data_size']} bytes",
    ]
    if info["vabc"]:
        v = info["vabc"]
        lines.append(f"Virtual A/B compression: {'on' if v['enabled'] else 'off'}, {v['compression'] or 'unset'}, "
                     f"COW version {v['cow_version'] or 'unset'}")
    for part in info["partitions"]:
        old = "none" if part["old_size"] is None else f"{part['old_size']} bytes"
        lines.append(f"Partition {part['name']}: old {old}, new {part['new_size']} bytes, "
                     f"sha256 {part['new_sha256']}")
        ops = ", ".join(f"{k} {v}" for k, v in part["operation_types"].items())
        lines.append(f"  {part['operations']} operations ({ops}); {part['data_bytes']} bytes of data")
        if part["merge_operations"]:
            lines.append("  merge operations: " + ", ".join(f"{k} {v}" for k, v in part["merge_operations"].items()))
        if part["verity"]:
            v = part["verity"]
            lines.append(f"  verity: hash tree {v['hash_tree_algorithm'] or 'none'} ({v['hash_tree_blocks']} blocks), "
                         f"FEC {v['fec_roots'] if v['fec_roots'] is not None else 'none'} roots "
                         f"({v['fec_blocks']} blocks)")
        if part["unsupported"]:
            lines.append("  unsupported by dmuserd: " + ", ".join(part["unsupported"]))
    print("\n".join(lines))
    return 0


def _convert(args, cow_dir, mover=None, *, partitions: list[str] | None = None, checks: bool = True):
    """``apply_payload`` as the options say; ``checks`` False: the hashes are left for ``check_partition``."""
    from dmuserd.snapshot.ota import apply_payload

    return apply_payload(
        args.payload, cow_dir=cow_dir, source_dir=args.source_dir,
        partitions=partitions or _partitions(args.partitions), version=args.cow_version,
        compression=args.compression, verify=checks and not args.no_verify, mover=mover, slot=args.slot,
        check_sources=checks,
    )


def _result_line(result) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items() if k in ("copy", "xor", "replace", "zero"))
    digest = f", sha256 {result.sha256}" if result.sha256 else ""
    resumed = f", resumed at operation {result.resumed_at}" if result.resumed_at is not None else ""
    return f"{result.cow}: {result.name}, {result.size} bytes{digest} ({counts} ops){resumed}"


@_os_errors
def _apply(args: argparse.Namespace) -> int:
    from dmuserd.daemon.cow_commands import mover_line, run_offloaded

    _check(args, whole=not args.no_verify)
    results, stats = run_offloaded(args, _convert, args, args.cow_dir)
    for result in results:
        print(_result_line(result))
    print(mover_line(stats))
    return 0


@_os_errors
def _serve(args: argparse.Namespace) -> int:
    """Serve each partition as soon as its COW file is written; check it (old image, rendered partition) while
    it is served: a partition that fails its check is taken away and the command ends with the error."""
    import contextlib
    import tempfile

    import trio

    from dmuserd.daemon.config import DaemonSpec, default_control_socket, make_target
    from dmuserd.daemon.service import run_until_signal
    from dmuserd.snapshot.payload import Payload

    _check(args, whole=not args.no_verify)
    served_name(".", args.slot)  # a bad --slot is refused before the conversion
    with Payload(args.payload) as payload:
        names = _partitions(args.partitions) or list(payload.partitions)
        for name in names:
            payload.partition(name)  # an unknown partition is refused before the daemon starts
    # the targets to come, their options filled in as each partition is converted (exports checked now)
    planned = [make_target(served_name(n, args.slot), "snapshot", {},
                           [e.replace("{name}", served_name(n, args.slot)) for e in args.export]) for n in names]
    with contextlib.ExitStack() as stack:
        cow_dir = args.cow_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="dmuserd-ota-"))
        then = _ServeAsReady(args, cow_dir, names, planned)
        trio.run(lambda: run_until_signal(DaemonSpec([]), args.control_socket or default_control_socket(),
                                          then=then))
    return 0


class _ServeAsReady:
    """``ota serve``'s work once the daemon runs: partitions converted one after another (worker threads) and
    added as targets as each is ready, each checked in the background unless ``--no-verify``."""

    def __init__(self, args: argparse.Namespace, cow_dir: str, names: list[str], planned: list) -> None:
        self.args, self.cow_dir, self.names, self.planned = args, cow_dir, names, planned

    async def __call__(self, daemon) -> None:
        import dataclasses
        import functools

        import trio

        from dmuserd.daemon.config import DaemonSpec
        from dmuserd.daemon.service import reclaim_dead_fuse_mounts

        # the daemon started with no target, so it reclaimed no dead FUSE mount of a killed run: done here,
        # before the first target mounts
        await reclaim_dead_fuse_mounts(DaemonSpec(self.planned))
        async with trio.open_nursery() as checks:
            for name, planned in zip(self.names, self.planned):
                convert = functools.partial(_convert, self.args, self.cow_dir, partitions=[name], checks=False)
                result = (await trio.to_thread.run_sync(convert))[0]
                options = {"base": result.base, "cow": result.cow, "size": str(result.size)}
                await daemon.add_target(dataclasses.replace(planned, backend_options=options))
                check = "" if self.args.no_verify else "; checking it"
                print(_result_line(result) + f"; served as {planned.name}{check}", flush=True)
                if not self.args.no_verify:
                    checks.start_soon(self._verify, daemon, result)

    async def _verify(self, daemon, result) -> None:
        import trio

        from dmuserd.snapshot.ota import check_partition

        name = served_name(result.name, self.args.slot)
        try:
            digest = await trio.to_thread.run_sync(check_partition, self.args.payload, result)
        except BaseException:
            with trio.CancelScope(shield=True):
                await daemon.remove_target(name)
            raise
        print(f"{name}: checked, the old image and the new partition match the payload (sha256 {digest})",
              flush=True)


@_os_errors
def _merge(args: argparse.Namespace) -> int:
    from dmuserd.snapshot._ota_merge import merge_ota

    _check(args, whole=not args.no_verify)
    results = merge_ota(args.payload, source=args.source, slot=args.slot, output=args.output,
                        cow_dir=args.cow_dir, partitions=_partitions(args.partitions), offload=args.offload,
                        verify=not args.no_verify)
    target = args.output or args.source
    for r in results:
        if not r.total_ops:
            done = "merged already"
        else:
            earlier = f", {r.total_ops - r.merged_now} of them by an earlier run" if r.merged_now < r.total_ops else ""
            done = f"{r.total_ops} ops merged{earlier}"
        print(f"{target}::{r.target}: {r.name}, {r.old_size} -> {r.size} bytes, sha256 {r.sha256} ({done})")
    return 0


@_os_errors
def _verify(args: argparse.Namespace) -> int:
    from dmuserd.daemon.cow_commands import mover_line, run_offloaded

    _check(args, whole=True)
    bad, stats = run_offloaded(args, _verify_all, args)
    print(mover_line(stats))
    return 1 if bad else 0


def _verify_all(args: argparse.Namespace, mover) -> int:
    """Check every partition; prints a line each and returns how many differ."""
    import os

    from dmuserd.snapshot._cow_reader import CowReader
    from dmuserd.snapshot.ota import find_source, progress_bar, render_sha256
    from dmuserd.snapshot.payload import Payload, PayloadError

    bad = 0
    with Payload(args.payload) as payload:
        names = _partitions(args.partitions) or list(payload.partitions)
        parts = [payload.partition(name) for name in names]
        total = sum(part.new_partition_info.size for part in parts)
        with progress_bar(total, None, desc="ota verify", unit="B") as bar:
            for part in parts:
                name = part.partition_name
                size, want = part.new_partition_info.size, part.new_partition_info.hash.hex()
                if args.image_dir:
                    path, got, note = _hash_image(args.image_dir, served_name(name, args.slot), size, bar)
                else:
                    path = os.path.join(args.cow_dir, f"{name}.cow")
                    if not os.path.exists(path):
                        raise PayloadError(f"partition {name!r}: no {path}; run `dmuserd ota apply` first")
                    old = part.HasField("old_partition_info")
                    base = find_source(args.source_dir, name, args.slot) if old else os.devnull
                    with CowReader(path) as reader:
                        got, note = render_sha256(reader, base, size, bar=bar, mover=mover), ""
                if got == want:
                    print(f"{path}: {name} OK (sha256 {got})")
                else:
                    bad += 1
                    print(f"{path}: {name} DIFFERS: sha256 {got}{note}, new_partition_info.hash {want}", flush=True)
    return bad


def _hash_image(image_dir: str, name: str, size: int, bar) -> tuple[str, str, str]:
    import os

    from dmuserd.snapshot.ota import file_sha256
    from dmuserd.snapshot.payload import PayloadError

    if os.path.isfile(image_dir):  # a super image: its partition, through the metadata of the slot NAME names
        candidates = [f"{image_dir}::{name}"]
        path = candidates[0]
    else:
        candidates = [os.path.join(image_dir, name), os.path.join(image_dir, f"{name}.img")]
        path = next((c for c in candidates if os.path.exists(c)), None)
    if path is None:
        raise PayloadError(f"partition {name!r}: no image in {image_dir} (looked for {' and '.join(candidates)})")
    got, read = file_sha256(path, size, bar=bar)
    note = f" (only {read} of {size} bytes)" if read < size else ""
    return path, got, note
