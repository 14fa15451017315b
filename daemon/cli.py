"""The ``dmuserd`` command line.

Each area of the project contributes its own subcommands through a module
with a ``register(subparsers)`` function (listed in ``COMMAND_MODULES``).
Registration only builds parsers; the work, and the heavy imports, happen in
the handler the chosen subcommand sets as ``func``. When the command line
names a known command, only the module providing it is imported and
registered (a ``cow merge`` does not import what ``units`` needs:
subprocess, shutil); ``--help`` and an unknown command register them all.
A module may build fewer parsers still: :func:`to_build` says which of its
commands, or of a command's actions, the command line names (argparse
builds every parser's arguments up front: 2.3 ms for all of ``cow``'s and
``merge``'s, 0.3 ms for ``cow merge``'s alone).

A handler returns the exit status. Errors meant for the user are raised as
a subclass of :class:`dmuserd.errors.DmuserdError` and printed as one line
saying what went wrong and what to do, never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
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


#: the command line's leading words while :func:`build_parser` registers (None: build every parser)
_words: tuple[str, ...] | None = None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser (every command); with ``argv`` naming a known command,
    only that command's module's (and what :func:`to_build` leaves of it)."""
    global _words
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
    words = () if argv is None else _command_words(argv)
    names = [name for name, commands in COMMAND_MODULES.items() if words[:1] and words[0] in commands]
    _words = words if names else None
    try:
        for name in names or COMMAND_MODULES:
            importlib.import_module(name).register(subparsers)
    finally:
        _words = None
    return parser


def to_build(path: tuple[str, ...], names: tuple[str, ...]) -> tuple[str, ...]:
    """Which of ``names``, the commands (``path`` empty) or the actions of
    command ``path`` a module registers, to build parsers for: the one the
    command line being parsed names there, or all of them (it names none of
    them, or :func:`build_parser` is not parsing one: ``--help``, a test)."""
    if _words is None or _words[: len(path)] != path or len(_words) <= len(path) or _words[len(path)] not in names:
        return names
    return (_words[len(path)],)


def _command_words(argv: list[str]) -> tuple[str, ...]:
    """The command and action words ``argv`` starts with: its words that are no
    option nor ``--log-level``'s value, up to the first option after the command."""
    words: list[str] = []
    args = iter(argv)
    for word in args:
        if not word.startswith("-"):
            words.append(word)
        elif words:
            break
        elif word == "--log-level":
            next(args, None)
    return tuple(words)


#: whether :func:`start_up` may pause the collector: :func:`main` is this process's command line
_own_process = False


@contextlib.contextmanager
def start_up():
    """The start-up of a command: parsing its command line, setting up logs, its imports.

    They make objects that last as long as the process (modules, classes,
    functions), so the cyclic collector looks among them in vain: 56 times
    in a ``dmuserd cow merge`` that merges nothing, most of them in trio's
    and structlog's imports, and once more over all of them at exit.
    Inside, the collector is paused; at the end what was made is frozen
    (``gc.freeze``: never traversed again, not even at exit) and the
    collector resumes for the command's work. The garbage start-up leaves
    (some 2,400 objects in ``cow merge``: the parsers, import-time cycles)
    stays. Only when :func:`main` runs
    a process's command line (``argv`` None): called with ``argv`` (a test,
    a program embedding the CLI) it leaves that process's collector alone.
    A handler wraps its own imports in it too (``cow merge``).
    """
    if not _own_process or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    global _own_process
    _own_process = argv is None
    with start_up():
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
