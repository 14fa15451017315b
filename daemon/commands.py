"""Subcommands of the daemon proper: ``serve``, ``demo``, ``status``."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve block devices",
        description="Serve one target from flags, or several from a TOML config file.",
        epilog="example: dmuserd serve --backend memory:size=1G --export fuse:/run/dmuserd/fuse",
    )
    serve.add_argument("--config", metavar="FILE.toml", help="read targets from a TOML file")
    serve.add_argument("--name", default="disk", help="target name (default: disk; the FUSE file's name)")
    serve.add_argument("--backend", metavar="TYPE[:key=value,...]", help="e.g. memory:size=1G, file:path=/srv/a.img")
    serve.add_argument("--export", action="append", default=[], metavar="KIND:WHERE",
                       help="fuse:DIR, nbd:SOCKET, nbd:tcp:HOST:PORT, dm-user:NAME, or any kind registered "
                       "under the dmuserd.exports entry points (repeatable)")
    serve.add_argument("--control-socket", metavar="PATH", help="control socket (default: /run/dmuserd/control.sock)")
    serve.add_argument("--offload", choices=("auto", "dsa", "emulated", "cpu"),
                       help="data mover engine for backends that move blocks (snapshot merges): "
                       "auto = DSA hardware if usable, else CPU")
    serve.set_defaults(func=_serve, service=True)

    demo = subparsers.add_parser(
        "demo",
        help="a 1 GiB RAM disk over FUSE, as loop device, ext4, mounted (root)",
        description="Serve a sparse 1 GiB memory disk over FUSE, attach it as a loop device, "
        "format and mount it, write and read back files, then keep serving until Ctrl-C.",
    )
    demo.add_argument("--size", default="1G", help="disk size (default 1G)")
    demo.add_argument("--dir", default=None, help="working directory (default /run/dmuserd-demo)")
    demo.add_argument("--duration", type=float, default=None,
                      help="stop after this many seconds instead of waiting for Ctrl-C")
    demo.set_defaults(func=_demo, service=True)

    status = subparsers.add_parser("status", help="show what a running daemon serves, with counters")
    status.add_argument("--control-socket", metavar="PATH", help="the daemon's control socket")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(func=_status)


def _spec_from_args(args):
    from dmuserd.daemon.config import ConfigError, DaemonSpec, load_toml, parse_target

    if args.config:
        if args.backend or args.export:
            raise ConfigError("use either --config or --backend/--export, not both")
        return load_toml(args.config)
    if not args.backend:
        raise ConfigError("say what to serve: --backend TYPE:key=value,... --export KIND:WHERE (or --config FILE.toml)")
    return DaemonSpec([parse_target(args.name, args.backend, args.export)])


def _serve(args) -> int:
    import trio

    from dmuserd.daemon.config import default_control_socket
    from dmuserd.daemon.service import run_until_signal

    spec = _spec_from_args(args)
    if args.offload:
        spec.offload = args.offload
    control = args.control_socket or spec.control_socket or default_control_socket()
    trio.run(run_until_signal, spec, control)
    return 0


def _demo(args) -> int:
    import trio

    from dmuserd.daemon.demo import run_demo

    return trio.run(run_demo, args.size, args.dir, args.duration)


def _status(args) -> int:
    from dmuserd.daemon.config import default_control_socket
    from dmuserd.daemon.control import request
    from dmuserd.errors import DmuserdError

    path = args.control_socket or default_control_socket()
    try:
        answer = request(path, {"cmd": "status"})
    except (FileNotFoundError, ConnectionRefusedError):
        raise DmuserdError(f"no daemon answers on {path}: is `dmuserd serve` running? (or pass --control-socket)") from None
    if not answer.get("ok"):
        raise DmuserdError(f"the daemon said: {answer.get('error')}")
    status = answer["status"]
    if args.json:
        json.dump(status, sys.stdout, indent=2)
        print()
        return 0
    print(f"dmuserd pid {status['pid']}, up {status['uptime_s']} s")
    for name, t in status["targets"].items():
        where = ", ".join(f"{k} {v}" for k, v in t["exports"].items())
        print(f"  {name}: {t['backend']} {t['size']} bytes; {where}")
        reqs = ", ".join(f"{k} {v}" for k, v in t["requests"].items() if v)
        print(f"    requests {t['total_requests']} ({reqs or 'none'}); read {t['bytes_read']} B, "
              f"written {t['bytes_written']} B; in flight {t['in_flight']}; errors {t['errors']}, "
              f"unsupported {t['unsupported']}")
        if isinstance(t.get("summary"), str):  # a backend's own line (rbd: cluster, pool, image, latency)
            print(f"    {t['summary']}")
        for kind, details in (t.get("export_status") or {}).items():  # an export's own line (ublk: queues)
            if isinstance(details, dict) and isinstance(details.get("summary"), str):
                print(f"    {kind}: {details['summary']}")
        merge = t.get("merge")
        if isinstance(merge, dict):
            print(f"    merge {merge.get('state')}: {merge.get('percent', 0):.1f}% "
                  f"({merge.get('merged_ops')} of {merge.get('total_ops')} ops)"
                  + (f"; error: {merge['error']}" if merge.get("error") else ""))
    rejected = status.get("rejected_inputs") or {}
    if rejected:
        print("  rejected inputs (see the daemon's log for who sent them):")
        for surface, reasons in rejected.items():
            print(f"    {surface}: " + ", ".join(f"{reason} {count}" for reason, count in reasons.items()))
    return 0
