"""``dmuserd cow ...``: inspect, create, render, verify and merge COW files;
``dmuserd merge ...``: the online merge of a served snapshot target.

Registration only builds parsers; each handler imports what it needs.
Errors in a file come out as one line naming the offset and the rule
(``CowFormatError``), through the CLI's usual DmuserdError path.
"""

from __future__ import annotations

import argparse

from dmuserd.daemon.cli import os_errors_as, start_up, to_build


_os_errors = os_errors_as("dmuserd.snapshot.cow:CowError")


def register(subparsers) -> None:
    """Add ``cow`` and ``merge``: only the command (and action) the command
    line names where it names one (:func:`~dmuserd.daemon.cli.to_build`)."""
    for command in to_build((), ("cow", "merge")):
        if command == "cow":
            cow = subparsers.add_parser(
                "cow", help="Android snapshot COW files (v2/v3): inspect, create, render, verify",
                description="Work with Android snapshot COW files (libsnapshot v2/v3).",
            )
            sub = cow.add_subparsers(dest="cow_command", metavar="ACTION", required=True)
            for action in to_build(("cow",), tuple(_COW_ACTIONS)):
                _COW_ACTIONS[action](sub)
        else:
            _add_online_merge(subparsers)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show a COW file's header, op counts, labels and ops")
    p.add_argument("file", help="the COW file")
    p.add_argument("--ops", action="store_true", help="list the ops in file order")
    p.add_argument("--merge-order", action="store_true", help="list the data ops in merge order")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--label", type=int, help="read the file only up to this label (an unfinished file)")
    p.set_defaults(func=_inspect)


def _add_create(sub) -> None:
    p = sub.add_parser("create", help="make a COW file turning a base image into a target image")
    p.add_argument("--base", required=True, help="the old image")
    p.add_argument("--target", required=True, help="the new image")
    p.add_argument("-o", "--output", required=True, help="the COW file to write")
    p.add_argument("--version", type=int, choices=(2, 3), default=2, help="COW format version (default 2)")
    p.add_argument(
        "--compression", default="none",
        help="none, gz, brotli, lz4 or zstd, optionally ',LEVEL' (default none)",
    )
    p.add_argument("--block-size", type=int, default=4096, help="block size in bytes (default 4096)")
    p.add_argument("--compression-factor", type=int, default=None,
                   help="v3: largest Replace chunk in bytes, block size << 0..6 (default one block)")
    p.add_argument("--xor", action="store_true", help="store blocks similar to their base block as Xor ops")
    offload_option(p)
    p.add_argument("--json", action="store_true", help="print the counts and the mover's counters as JSON")
    p.set_defaults(func=_create)


def _add_render(sub) -> None:
    p = sub.add_parser("render", help="write the target image: base + COW")
    p.add_argument("--base", required=True, help="the old image")
    p.add_argument("file", help="the COW file")
    p.add_argument("-o", "--output", required=True, help="the image to write")
    p.add_argument("--size", help="target size (default: the base's); K/M/G suffixes")
    p.add_argument("--label", type=int, help="apply the file only up to this label")
    offload_option(p)
    p.add_argument("--json", action="store_true", help="print the result and the mover's counters as JSON")
    p.set_defaults(func=_render)


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge a COW file into its base image in place (resumes an interrupted merge)",
                       description="Write the COW file's ops into the base image in place, crash-safely, so "
                       "that the base becomes the target. Run it again after an interruption to resume.")
    p.add_argument("--base", required=True, help="the old image (overwritten with the target)")
    p.add_argument("file", help="the COW file (its header records the merge's progress)")
    offload_option(p)
    p.add_argument("--no-verify", action="store_true", help="skip reading back and CRC-checking what was written")
    p.set_defaults(func=_merge)


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check that base + COW equals the target (exit 1 if not)")
    p.add_argument("--base", required=True, help="the old image")
    p.add_argument("--target", required=True, help="the new image")
    p.add_argument("file", help="the COW file")
    offload_option(p)
    p.add_argument("--json", action="store_true", help="print the result and the mover's counters as JSON")
    p.set_defaults(func=_verify)


#: ``dmuserd cow`` action -> what adds its parser, in the order ``--help`` lists them
_COW_ACTIONS = {"inspect": _add_inspect, "create": _add_create, "render": _add_render, "merge": _add_merge,
                "verify": _add_verify}


def _add_online_merge(subparsers) -> None:
    merge = subparsers.add_parser(
        "merge", help="merge a served snapshot target into its base while it is served",
        description="Control the online merge of a snapshot target of a running daemon.",
    )
    msub = merge.add_subparsers(dest="merge_command", metavar="ACTION", required=True)
    for action, text in (("start", "start merging in the background"), ("pause", "pause at the next step"),
                         ("resume", "continue a paused merge"), ("status", "show the merge's state and progress")):
        p = msub.add_parser(action, help=text)
        p.add_argument("target", help="the target's name (see `dmuserd status`)")
        p.add_argument("--control-socket", metavar="PATH", help="the daemon's control socket")
        p.add_argument("--json", action="store_true", help="print the answer as JSON")
        p.add_argument("--wait", action="store_true",
                       help="wait until the merge is no longer running (merged, paused or failed)")
        p.set_defaults(func=_online_merge, action=action)


def offload_option(parser) -> None:
    """``--offload``: the data mover engine (cow and ota commands share it)."""
    parser.add_argument("--offload", choices=("auto", "dsa", "emulated", "cpu"), default="auto",
                        help="data mover engine for block copies, zero fills, compares and CRCs "
                        "(auto: DSA when usable, else the CPU)")


def run_offloaded(args: argparse.Namespace, fn, *fn_args, **fn_kwargs):
    """Run blocking tool ``fn`` with the ``--offload`` mover passed as ``mover=``;
    returns ``(its result, the mover's counters)``."""
    from dmuserd.dsa_offload import MOVER, run_with_mover

    return run_with_mover(args.offload, fn, *fn_args, mover=MOVER, **fn_kwargs)


def mover_line(stats: dict) -> str:
    """One line of what the mover did, for a command's summary."""
    offloaded = stats.get("offloaded_bytes", 0)
    line = (f"mover: {stats['engine']}, {stats['offloaded_ops']} ops offloaded ({offloaded} bytes), "
            f"{stats['cpu_ops']} on the CPU ({stats['cpu_bytes']} bytes)")
    if stats["fallbacks"]:
        line += "; CPU because: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["fallbacks"].items()))
    return line


def _report(args: argparse.Namespace, text: str, result: dict, stats: dict) -> None:
    import json

    if args.json:
        print(json.dumps({**result, "mover": stats}))
    else:
        print(text)
        print(mover_line(stats))


@_os_errors
def _inspect(args: argparse.Namespace) -> int:
    import json

    from dmuserd.snapshot.cow import CowReader

    with CowReader(args.file, label=args.label) as reader:
        info = {
            "path": args.file,
            "version": f"{reader.header.major}.{reader.header.minor}",
            "header": reader.header.as_dict(),
            "compression": reader.compression.name.lower(),
            "block_size": reader.block_size,
            "num_merge_ops": reader.num_merge_ops,
            "counts": reader.counts(),
            "data_ops": len(reader.data_ops),
            "labels": reader.labels,
            "sequence_length": len(reader.sequence),
            "footer": reader.footer,
        }
        if args.ops:
            info["ops"] = [op.as_dict() for op in reader.ops]
        if args.merge_order:
            info["merge_order"] = [
                {**op.as_dict(), "merged": i < reader.num_merge_ops} for i, op in enumerate(reader.merge_order())
            ]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    lines = [
        f"Version: {info['version']}",
        f"Header size: {reader.header.header_size}",
        f"Block size: {reader.block_size}",
        f"Compression: {info['compression']}",
        f"Merge ops: {reader.num_merge_ops}",
        f"Scratch buffer: {reader.header.buffer_size} bytes",
    ]
    if reader.footer:
        lines.append(f"Footer: {reader.footer['num_ops']} ops, {reader.footer['ops_size']} bytes")
    lines.append("Labels: " + (", ".join(map(str, reader.labels)) or "none"))
    lines.append(f"Sequence entries: {info['sequence_length']}")
    lines.append("Ops: " + ", ".join(f"{k} {v}" for k, v in info["counts"].items() if v) + f" ({info['data_ops']} data ops)")
    for key, title in (("ops", "Ops in file order"), ("merge_order", "Ops in merge order")):
        if key in info:
            lines.append(f"{title}:")
            lines.extend("  " + _op_line(op) for op in info[key])
    print("\n".join(lines))
    return 0


def _op_line(op: dict) -> str:
    fields = " ".join(f"{k}={v}" for k, v in op.items() if k not in ("index", "type"))
    return f"#{op['index']} {op['type']} {fields}"


@_os_errors
def _create(args: argparse.Namespace) -> int:
    from dmuserd.snapshot._compression import parse_spec
    from dmuserd.snapshot._cow_tools import create_cow

    algorithm, level = parse_spec(args.compression)
    stats, mover = run_offloaded(
        args, create_cow, args.base, args.target, args.output, version=args.version, compression=algorithm,
        compression_level=level, block_size=args.block_size, xor=args.xor,
        compression_factor=args.compression_factor,
    )
    parts = ", ".join(f"{k} {stats[k]}" for k in ("copy", "xor", "zero", "replace", "unchanged"))
    broken = f"; {stats['cycles_broken']} copy cycles broken into replace" if stats["cycles_broken"] else ""
    _report(args, f"{args.output}: {parts} blocks{broken}", {"output": args.output, **stats}, mover)
    return 0


@_os_errors
def _render(args: argparse.Namespace) -> int:
    from dmuserd.backends import parse_size
    from dmuserd.snapshot._cow_tools import render_cow

    size = None if args.size is None else parse_size(args.size, what="--size")
    written, mover = run_offloaded(args, render_cow, args.base, args.file, args.output, size=size, label=args.label)
    _report(args, f"{args.output}: {written} bytes", {"output": args.output, "bytes": written}, mover)
    return 0


@_os_errors
def _merge(args: argparse.Namespace) -> int:
    with start_up():
        from dmuserd.snapshot.merge import merge_cow_offline

    result = merge_cow_offline(args.base, args.file, offload=args.offload, verify=not args.no_verify)
    if not result.merged_now and not result.resumed_window:
        print(f"{args.file}: already merged into {args.base} ({result.total_ops} ops)")
        return 0
    resumed = f", resumed after {result.merged_before} ops" if result.merged_before or result.resumed_window else ""
    print(f"{args.file}: merged {result.total_ops} ops ({result.total_blocks} blocks) into {args.base}{resumed}")
    return 0


def _online_merge(args: argparse.Namespace) -> int:
    import json
    import time

    from dmuserd.daemon.config import default_control_socket
    from dmuserd.daemon.control import request
    from dmuserd.snapshot.merge import MergeError

    path = args.control_socket or default_control_socket()

    def ask(action: str) -> dict:
        try:
            answer = request(path, {"cmd": "merge", "action": action, "target": args.target})
        except (FileNotFoundError, ConnectionRefusedError):
            raise MergeError(f"no daemon answers on {path}: is `dmuserd serve` running? "
                             "(or pass --control-socket)") from None
        if not answer.get("ok"):
            raise MergeError(f"the daemon said: {answer.get('error')}")
        return answer

    answer = ask(args.action)
    while args.wait and answer["state"] == "merging":
        time.sleep(0.2)
        answer = ask("status")
    if args.json:
        print(json.dumps({k: v for k, v in answer.items() if k != "ok"}))
    else:
        line = f"{answer['target']}: {answer['state']}, {answer['percent']:.1f}% ({answer['merged_ops']}/{answer['total_ops']} ops)"
        print(line + (f"; error: {answer['error']}" if answer.get("error") else ""))
    return 1 if answer["state"] == "failed" else 0


@_os_errors
def _verify(args: argparse.Namespace) -> int:
    from dmuserd.snapshot._cow_tools import verify_cow

    block, mover = run_offloaded(args, verify_cow, args.base, args.target, args.file)
    if block is None:
        text = f"{args.file}: base + COW equals {args.target}"
    else:
        text = f"{args.file}: base + COW differs from {args.target} at block {block}"
    _report(args, text, {"equal": block is None, "first_different_block": block}, mover)
    return 0 if block is None else 1
