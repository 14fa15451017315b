"""The command line's start-up pauses the cyclic collector and freezes what it made
(:func:`dmuserd.daemon.cli.start_up`), only where ``main`` runs the process's own
command line; the collector is always on again for the command's work. A whole
``cow merge`` process: tests/snapshot/test_merge_cli_imports.py."""

from __future__ import annotations

import gc

from dmuserd.daemon import cli
from dmuserd.snapshot.cow import CowWriter


def test_start_up_pauses_and_freezes_only_for_the_process_command_line(monkeypatch):
    frozen = gc.get_freeze_count()
    with cli.start_up():  # a test calling the CLI: the collector is left alone
        assert gc.isenabled()
    assert gc.get_freeze_count() == frozen
    monkeypatch.setattr(cli, "_own_process", True)
    made = []
    try:
        with cli.start_up():
            assert not gc.isenabled()
            made.append(object.__new__(type("Made", (), {})))  # a class: tracked by the collector
        assert gc.isenabled() and gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()  # this process is pytest's: let its collector see everything again
    try:
        with cli.start_up():
            raise KeyError("a failing start-up")
    except KeyError:
        pass
    finally:
        gc.unfreeze()
    assert gc.isenabled()  # resumed even when the start-up failed


def test_main_with_argv_leaves_the_collector_alone(tmp_path, capsys):
    with CowWriter(tmp_path / "t.cow") as w:
        w.add_zero(0, 1)
        w.finalize()
    frozen = gc.get_freeze_count()
    assert cli.main(["cow", "inspect", str(tmp_path / "t.cow")]) == 0
    assert "Merge ops: 0" in capsys.readouterr().out
    assert gc.isenabled() and gc.get_freeze_count() == frozen

