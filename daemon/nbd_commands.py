"""``dmuserd nbd list`` and ``dmuserd nbd stop``: the nbdkit processes of NBD exports.

An ``nbd:`` export's nbdkit outlives its daemon (``on-stop=keep``) so that a
restart never breaks its clients, and ends by itself once no daemon can use
it (see :mod:`dmuserd.daemon.nbd`). Each registers itself under
:func:`~dmuserd.daemon.nbd.registry_dir`; these commands read that registry
to show them, and end them by hand.
"""

from __future__ import annotations

import argparse

from dmuserd.daemon.cli import os_errors_as


def register(subparsers) -> None:
    nbd = subparsers.add_parser(
        "nbd",
        help="list or stop the nbdkit processes of NBD exports",
        description="The nbdkit of an nbd: export is kept running when its daemon stops (on-stop=keep), for "
        "the next daemon; it exits by itself after idle-exit seconds without a daemon or a client, or when its "
        "socket is removed. List them, or stop them now.",
    )
    sub = nbd.add_subparsers(dest="nbd_command", metavar="ACTION", required=True)
    show = sub.add_parser("list", help="show each nbdkit: its export, pid, daemon, clients, time left")
    show.add_argument("--json", action="store_true", help="print a JSON array, one object per nbdkit")
    show.set_defaults(func=_list)
    stop = sub.add_parser(
        "stop", help="stop kept nbdkit processes (their clients are disconnected)",
        epilog="examples: dmuserd nbd stop /run/dmuserd/disk.sock; dmuserd nbd stop tcp:127.0.0.1:10809; "
        "dmuserd nbd stop --all")
    which = stop.add_mutually_exclusive_group(required=True)
    which.add_argument("socket", nargs="?", metavar="SOCKET",
                       help="the export's socket path, or tcp:HOST:PORT (as `dmuserd nbd list` shows it)")
    which.add_argument("--all", action="store_true", help="every nbdkit no daemon is attached to")
    stop.set_defaults(func=_stop)


@os_errors_as("dmuserd.daemon.nbd:NbdError")
def _list(args: argparse.Namespace) -> int:
    import json
    import time

    from dmuserd.daemon.nbd import read_registry, registry_dir

    now = time.time()
    views = [_view(record, now) for record in read_registry()]
    if args.json:
        print(json.dumps(views, indent=2))
        return 0
    if not views:
        print(f"no nbdkit runs for an NBD export (registry: {registry_dir()})")
        return 0
    rows = [("EXPORT", "PID", "SINCE", "DAEMON", "CLIENTS", "EXITS IN")]
    for view in views:
        rows.append((view["export"], str(view["pid"]), view["since"].replace("T", " ")[:19],
                     "attached" if view["daemon_attached"] else "none", str(view["clients"]), _exits_in(view)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _view(record: dict, now: float) -> dict:
    """What ``nbd list`` says of one registry record (``idle_exit_in``: seconds, None if not idle or never)."""
    from datetime import datetime

    idle_since = record.get("idle_since")
    idle_exit = record.get("idle_exit") or 0
    left = None
    if idle_exit and idle_since is not None:
        left = max(0.0, round(idle_exit - (now - idle_since), 1))
    return {
        "export": record.get("export"),
        "pid": record["pid"],
        "since": datetime.fromtimestamp(record.get("started", 0)).astimezone().isoformat(timespec="seconds"),
        "daemon_attached": bool(record.get("daemon_attached")),
        "clients": record.get("clients", 0),
        "idle_exit": idle_exit,
        "idle_exit_in": left,
        "state_dir": record.get("state_dir"),
    }


def _exits_in(view: dict) -> str:
    if not view["idle_exit"]:
        return "never (idle-exit=0)"
    if view["idle_exit_in"] is None:
        return "not idle"
    minutes, seconds = divmod(int(view["idle_exit_in"]), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


@os_errors_as("dmuserd.daemon.nbd:NbdError")
def _stop(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    import trio

    from dmuserd.daemon import nbd

    records = nbd.read_registry()
    if args.all:
        chosen = records
    else:
        where = nbd.export_address(args.socket.removeprefix("nbd:"))
        chosen = [r for r in records if r.get("export") == where]
        running = nbd.read_running(nbd.state_dir_for(where))  # an nbdkit started before the registry, too
        if running is not None and running.pid not in {r["pid"] for r in chosen}:
            chosen.append({"pid": running.pid, "export": where, "state_dir": str(nbd.state_dir_for(where))})
        if not chosen:
            raise nbd.NbdError(f"no nbdkit serves {where} (`dmuserd nbd list` shows those that run)")
    served = [r for r in chosen if nbd._in_use(str(Path(r["state_dir"]) / nbd.CHANNEL_NAME))]
    for record in served:
        message = (f"nbdkit {record['pid']} ({record['export']}) has a daemon attached, which would start a new "
                   "one: stop that daemon first (or serve with on-stop=stop)")
        if not args.all:
            raise nbd.NbdError(message)
        print(f"dmuserd: left running: {message}", file=sys.stderr)
    chosen = [r for r in chosen if r not in served]

    async def stop_all() -> None:
        async with trio.open_nursery() as nursery:
            for record in chosen:
                nursery.start_soon(nbd.stop_nbdkit, record["pid"])

    trio.run(stop_all)
    for record in chosen:
        # nbdkit forgets itself when it exits; not if it had to be killed.
        (nbd.registry_dir() / f"{record['pid']}.json").unlink(missing_ok=True)
        state_dir = Path(record["state_dir"])
        if nbd.read_running(state_dir) is None:
            (state_dir / nbd.STATE_NAME).unlink(missing_ok=True)
        print(f"stopped nbdkit {record['pid']} ({record['export']})")
    if args.all and not chosen and not served:
        print("no nbdkit runs for an NBD export")
    return 0
