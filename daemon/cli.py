"""The ``dmuserd`` command line.

Each area of the project contributes its own subcommands through a module
with a ``register(subparsers)`` function (listed in ``COMMAND_MODULES``).
Registration only builds parsers; the work, and the heavy imports, happen in
the handler the chosen subcommand sets as ``func``. When the command line
names a known command, only the module providing it is imported and
registered (a ``cow merge`` does not import what ``units`` needs:
subprocess, shutil); ``--help`` and an unknown command register them all.

A handler returns the exit status. Errors meant for the user are raised as
a subclass of :class:`dmuserd.errors.DmuserdError` and printed as one line
saying what went wrong and what to do, never as a traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys

from dmuserd import __version__
from dmuserd.daemon import logs

#: module -> the top-level commands its ``register`` adds (a test checks they agree)
COMMAND_MODULES = {
    "dmuserd.daemon.commands": ("serve", "demo", "status"),
    "dmuserd.daemon.dm_commands": ("dm",),
    "dmuserd.daemon.nbd_commands": ("nbd",),
    "dmuserd.daemon.ublk_commands": ("ublk",),
    "dmuserd.dsa_offload.commands": ("dsa",),
    "dmuserd.daemon.cow_commands": ("cow", "merge"),
    "dmuserd.daemon.ota_commands": ("ota",),
    "dmuserd.daemon.image_commands": ("image", "super"),
    "dmuserd.daemon.units_commands": ("install-units",),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser (every command); with ``argv`` naming a known command,
    only that command's module's."""
    parser = argparse.ArgumentParser(
        prog="dmuserd",
        description="User-space block devices: serve a backend over dm-user, FUSE or NBD.",
    )
    parser.add_argument("--version", action="version", version=f"dmuserd {__version__}")
    parser.add_argument(
        "--log-level",
        choices=logs.LEVELS,
        default=None,
        help="log level (default: $DMUSERD_LOG_LEVEL or info)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None if argv is None else _command_word(argv)
    names = [name for name, commands in COMMAND_MODULES.items() if wanted in commands] or COMMAND_MODULES
    for name in names:
        importlib.import_module(name).register(subparsers)
    return parser


def _command_word(argv: list[str]) -> str | None:
    """The command ``argv`` names (its first word that is no option nor ``--log-level``'s value)."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        # A service (serve, demo, ota serve) logs to stdout, journald's stream under systemd;
        # every other command keeps stdout for its result (text or --json) and logs to stderr.
        logs.configure(args.log_level, stream=sys.stdout if getattr(args, "service", False) else sys.stderr)
    except ValueError as exc:
        print(f"dmuserd: {exc}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place errors meet the user
        from dmuserd.errors import DmuserdError

        leaves = list(_leaves(exc))
        if all(isinstance(e, DmuserdError) for e in leaves):
            for leaf in leaves:
                print(f"dmuserd: error: {leaf}", file=sys.stderr)
            return 1
        import structlog

        structlog.get_logger().exception("unexpected error", error=repr(exc))
        print(
            f"dmuserd: internal error: {exc!r} (this is a bug; the log above has the details)",
            file=sys.stderr,
        )
        return 70


def os_errors_as(error: str):
    """Decorate a command handler: an ``OSError`` on a user's file becomes one line.

    ``error`` names the :class:`~dmuserd.errors.DmuserdError` subclass to
    raise as ``"module:Class"``; it is imported only when needed, so that
    building the parser stays cheap.
    """

    def decorate(handler):
        @functools.wraps(handler)
        def wrapper(args):
            try:
                return handler(args)
            except OSError as exc:
                module, _, name = error.partition(":")
                error_class = getattr(importlib.import_module(module), name)
                where = exc.filename or "file"
                raise error_class(f"{where}: {exc.strerror or exc}; check the path and its permissions") from None

        return wrapper

    return decorate


def _leaves(exc: BaseException):
    """The exceptions inside (nested) exception groups, or ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc
