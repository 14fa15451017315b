"""The command line's start-up pauses the cyclic collector and freezes what it made
(:func:`dmuserd.daemon.cli.start_up`), only where ``main`` runs the process's own
command line; the collector is always on again for the command's work."""

from __future__ import annotations

import gc
import subprocess
import sys

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


PROBE = """
import atexit, gc, sys
atexit.register(lambda: print(f"\\nGC enabled={gc.isenabled()} frozen={gc.get_freeze_count()}"))
sys.argv = ["dmuserd", *sys.argv[1:]]
from dmuserd.daemon.cli import main
sys.exit(main())
"""


def test_cow_merge_process_freezes_its_start_up_and_collects_after(tmp_path):
    base, cow = tmp_path / "base.img", tmp_path / "t.cow"
    base.write_bytes(bytes(4 << 12))
    with CowWriter(cow) as w:
        w.add_copy(1, 3)
        w.add_replace(2, b"r" * 4096)
        w.finalize()
    proc = subprocess.run([sys.executable, "-c", PROBE, "cow", "merge", "--base", str(base), str(cow)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out, _, state = proc.stdout.rpartition("\nGC ")
    assert "merged 2 ops" in out
    assert base.read_bytes()[4096:12288] == bytes(4096) + b"r" * 4096  # copy of zeros, then the replace
    enabled, frozen = (part.split("=")[1] for part in state.split())
    assert enabled == "True"
    assert int(frozen) > 10_000  # trio's, structlog's and the merge's modules
