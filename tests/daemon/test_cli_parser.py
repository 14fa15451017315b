"""The command line builds only the parsers a command line uses, and they
parse it as the full parser does.

``build_parser(argv)`` registers only the module of the command named, and
``cli.to_build`` lets a module build only the command and action named
(``dmuserd cow merge`` builds no parser for ``cow inspect`` nor for the
online ``merge``). Whatever was left out, the command line must come out
the same: same values, same handler, same help and errors.
"""

from __future__ import annotations

import contextlib
import io

import pytest

from dmuserd.daemon import cli

LINES = [
    ["cow", "merge", "--base", "b.img", "t.cow"],
    ["--log-level", "debug", "cow", "merge", "--base", "b.img", "t.cow", "--offload", "cpu", "--no-verify"],
    ["cow", "inspect", "t.cow", "--ops", "--json"],
    ["cow", "create", "--base", "a", "--target", "b", "-o", "c", "--xor"],
    ["cow", "verify", "--base", "a", "--target", "b", "t.cow"],
    ["merge", "status", "system_b", "--json"],
    ["merge", "start", "--wait", "system_b"],
]


def _outcome(parser, argv):
    """What ``parser`` makes of ``argv``: its values, or its exit status and output (help, errors)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return ("parsed", vars(parser.parse_args(argv)))
        except SystemExit as exc:
            return ("exit", exc.code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("argv", LINES + [line[:2] + ["--help"] for line in LINES] +
                         [["cow", "merge", "--base"], ["cow", "mrege", "t.cow"], ["cow"], ["merge", "start"]])
def test_the_parser_built_for_a_command_line_parses_it_as_the_full_one(argv):
    assert _outcome(cli.build_parser(argv), argv) == _outcome(cli.build_parser(None), argv)


def test_cow_merge_builds_no_other_parser():
    parser = cli.build_parser(["cow", "merge", "--base", "b.img", "t.cow"])
    for other in (["cow", "inspect", "t.cow"], ["merge", "status", "system_b"], ["serve", "--help"]):
        assert _outcome(parser, other)[:2] == ("exit", 2), other  # an invalid choice here
    assert cli._words is None  # nothing left for a later build


def test_to_build_outside_build_parser_is_everything():
    assert cli.to_build(("cow",), ("inspect", "merge")) == ("inspect", "merge")
