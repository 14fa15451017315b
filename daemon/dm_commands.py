"""``dmuserd dm create NAME --size S``, ``dm remove NAME``, ``dm snapuserd``.

Create or remove a dm-user device-mapper table without serving it, so a
daemon (``--export dm-user:NAME``) can attach to it later, be restarted, or
be replaced while the block device stays.
"""

from __future__ import annotations


def register(subparsers) -> None:
    dm = subparsers.add_parser(
        "dm",
        help="create or remove dm-user device-mapper tables (root, dm-user kernel)",
        description="Manage dm-user tables: /dev/mapper/NAME (the block device) fed by /dev/dm-user/NAME "
        "(what `dmuserd serve --export dm-user:NAME` serves).",
    )
    sub = dm.add_subparsers(dest="dm_command", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create a dm-user table",
                            epilog="example: dmuserd dm create disk --size 256M")
    create.add_argument("name", help="the table's name: /dev/mapper/NAME and /dev/dm-user/NAME")
    create.add_argument("--size", required=True, help="size in bytes (K/M/G/T suffixes), a multiple of 512")
    create.set_defaults(func=_create)
    remove = sub.add_parser("remove", help="remove a dm-user table (a serving daemon's channels end)")
    remove.add_argument("name")
    remove.set_defaults(func=_remove)
    snap = sub.add_parser(
        "snapuserd", help="serve no device yet: wait for snapuserd commands on the control socket",
        description="A daemon with no targets whose control socket speaks snapuserd's protocol "
        "(init, start, initiate_merge, ...) as well as JSON: Android tooling sets devices up through it.")
    snap.add_argument("--socket", default="/run/dmuserd/snapuserd",
                      help="the control socket (default /run/dmuserd/snapuserd)")
    snap.add_argument("--merge-threads", type=int, default=2, metavar="N",
                      help="merges running at once, the others wait (snapuserd's "
                      "ro.virtual_ab.num_merge_threads; default 2)")
    snap.set_defaults(func=_snapuserd)


def _create(args) -> int:
    from dmuserd.backends.options import parse_size
    from dmuserd.daemon.dmsetup import create_user_target, mapper_path, misc_path

    create_user_target(args.name, parse_size(args.size, what="--size"))
    print(f"{mapper_path(args.name)} (served through {misc_path(args.name)})")
    return 0


def _remove(args) -> int:
    from dmuserd.daemon.dmsetup import remove_target

    remove_target(args.name)
    return 0


def _snapuserd(args) -> int:
    import trio

    if args.merge_threads < 1:
        raise SystemExit("dmuserd dm snapuserd: --merge-threads must be at least 1")
    trio.run(_run_snapuserd, args.socket, args.merge_threads)
    return 0


async def _run_snapuserd(socket_path: str, merge_threads: int = 2) -> None:
    """Serve until SIGINT/SIGTERM or snapuserd's ``stop`` request, then stop in order."""
    import signal

    import trio

    from dmuserd.daemon.config import DaemonSpec
    from dmuserd.daemon.runtime import Daemon

    from dmuserd.daemon.snapuserd import state_of

    daemon = Daemon(DaemonSpec([]), control_socket=socket_path)
    state_of(daemon).merge_threads = merge_threads
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _signum in signals:
                    await daemon.stop()
                    return

            nursery.start_soon(stop_on_signal)
            await daemon.run()  # returns once stopped, whoever asked
            nursery.cancel_scope.cancel()
