"""``dmuserd ublk list`` and ``dmuserd ublk del ID``: the ublk devices of this kernel.

A ``ublk:ID,recovery=1`` export leaves its device behind when its daemon
stops or dies, for the next daemon to take over (see
:mod:`dmuserd.daemon.ublk.export`). These commands show every ublk device
(GET_DEV_INFO: state, queues, depth, its daemon's pid and whether that runs)
and delete one that no running process serves
(:mod:`dmuserd.daemon.ublk.devices`).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    ublk = subparsers.add_parser(
        "ublk",
        help="list ublk devices, or delete one left behind",
        description="A ublk export with recovery=1 keeps its device when its daemon stops or dies, for the next "
        "daemon to take over. List the ublk devices (any server's), or delete one no running process serves.",
    )
    sub = ublk.add_subparsers(dest="ublk_command", metavar="ACTION", required=True)
    show = sub.add_parser("list", help="show each device: state, queues, depth, its daemon's pid and whether it runs")
    show.add_argument("--json", action="store_true", help="print a JSON array, one object per device")
    show.set_defaults(func=_list)
    delete = sub.add_parser("del", help="delete a device no running process serves (I/O waiting on it fails)",
                            epilog="example: dmuserd ublk del 0")
    delete.add_argument("id", type=int, metavar="ID", help="the device number N of /dev/ublkbN")
    delete.set_defaults(func=_del)


def _run(work):
    """Run ``work(control)`` on the control device, or say there is no ublk."""
    import trio

    from dmuserd.daemon.ublk.control import Control
    from dmuserd.daemon.ublk.export import check_kernel

    check_kernel()

    async def main():
        control = Control()
        try:
            return await work(control)
        finally:
            control.close()

    return trio.run(main)


def _list(args: argparse.Namespace) -> int:
    import json

    from dmuserd.daemon.ublk.devices import list_devices

    devices = _run(list_devices)
    if args.json:
        print(json.dumps([device.as_dict() for device in devices], indent=2))
        return 0
    if not devices:
        print("no ublk device")
        return 0
    rows = [("ID", "DEVICE", "STATE", "QUEUES", "DEPTH", "PID", "SERVED BY", "RECOVERY")]
    for d in devices:
        rows.append((str(d.id), d.block or "-", d.state, str(d.queues), str(d.depth),
                     str(d.pid) + ("" if d.pid_alive or d.pid <= 0 else " (gone)") if d.pid > 0 else "-",
                     f"pid {d.served_by}" if d.served_by is not None else "nobody", "yes" if d.recovery else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _del(args: argparse.Namespace) -> int:
    from dmuserd.daemon.ublk.devices import delete

    device = _run(lambda control: delete(control, args.id))
    print(f"deleted ublk device {device.id} ({device.state}"
          + (f", left by pid {device.pid}" if device.pid > 0 else "") + ")")
    return 0
