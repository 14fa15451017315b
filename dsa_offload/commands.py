"""``dmuserd dsa info``: what DSA offload can do on this machine, and why not.

Reports whether the C extension is built (and so which code runs the
mover's small copies and fills), the CPU's submission instructions,
every work queue sysfs shows with the reasons it is or is not usable, what
was read about it (gen_cap, op_cap, op_config, block_on_fault) and what
that implies (which operations are offloaded, batches, cache control, why
``write()`` is used), and the engine ``open_mover("auto")`` would pick.
"""

from __future__ import annotations

import json


def register(subparsers) -> None:
    dsa = subparsers.add_parser("dsa", help="Intel DSA offload: what is available here")
    sub = dsa.add_subparsers(dest="dsa_command", metavar="SUBCOMMAND", required=True)
    info = sub.add_parser("info", help="extension, CPU features, work queues, and the engine auto picks")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--sysfs", help="sysfs root of the dsa bus (default: $DMUSERD_DSA_SYSFS or /sys/bus/dsa/devices)")
    info.add_argument("--devdir", help="work-queue device directory (default: $DMUSERD_DSA_DEVDIR or /dev/dsa)")
    info.set_defaults(func=info_command)


def gather(sysfs: str | None = None, devdir: str | None = None) -> dict:
    from dmuserd.dsa_offload import _discovery, _native

    ext = _native.extension()
    queues = _discovery.discover(sysfs, devdir)
    engine, reason = _discovery.auto_choice(queues)
    return {
        "extension": {
            "available": ext is not None,
            "path": getattr(ext, "__file__", None),
            "error": _native.load_error(),
        },
        # Which code runs the mover's small copies and fills (every engine's).
        "inline": ("C (_dsa.Inline: copy and fill below the inline limit in one call)" if ext else
                   "Python (the extension is not built: copy and fill run as async Python methods)"),
        "cpu": ext.cpu_features() if ext else None,
        "sysfs": _discovery.roots(sysfs, devdir)[0],
        "queues": [q.as_dict() for q in queues],
        "auto": {"engine": engine, "reason": reason},
        "engines": ["dsa", "emulated", "cpu"] if ext else ["cpu"],
    }


def info_command(args) -> int:
    report = gather(args.sysfs, args.devdir)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    ext = report["extension"]
    print(f"extension: {'built (' + ext['path'] + ')' if ext['available'] else 'not available: ' + str(ext['error'])}")
    print(f"inline copy/fill: {report['inline']}")
    if report["cpu"]:
        print("cpu: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in report["cpu"].items()))
    if not report["queues"]:
        print(f"work queues: none under {report['sysfs']}")
    for q in report["queues"]:
        verdict = f"usable via {q['submission']}" if q["usable"] else "unusable: " + "; ".join(q["reasons"])
        print(f"{q['name']} ({q['device']}, {q['mode']}, {q['type']}, {q['state']}, size {q['size']}): {verdict}")
        caps = q["capabilities"]
        print(f"  read: gen_cap {caps['gen_cap']}, op_cap {caps['op_cap']}, op_config {caps['op_config'] or 'absent'}, "
              f"block_on_fault {q['block_on_fault']}")
        print(f"  offloadable: {', '.join(caps['operations']) or 'nothing'}; batch {'yes' if caps['batch'] else 'no'}, "
              f"cache control {'yes' if caps['cache_control'] else 'no'}, "
              f"block on fault {'yes' if caps['block_on_fault'] else 'no'}")
        for line in q["implications"]:
            print(f"  - {line}")
    print(f"auto engine: {report['auto']['engine']} ({report['auto']['reason']})")
    return 0
