"""``dmuserd cow merge`` imports only what the merge uses (its start-up is
issue #22's figure): the CLI registers the one command module that provides
the command named, and what each module of ``COMMAND_MODULES`` declares is
what it registers. Module names only, no times (performance is in bench/).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

from dmuserd.daemon.cli import COMMAND_MODULES
from dmuserd.dsa_offload import discover
from dmuserd.snapshot.cow import CowWriter

RUNNER = """
import atexit, sys
atexit.register(lambda: print("\\nMODULES " + " ".join(sorted(sys.modules))))
from dmuserd.daemon.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_each_module_registers_the_commands_it_declares():
    for name, commands in COMMAND_MODULES.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(name).register(sub)
        assert tuple(sub.choices) == commands, name


def test_cow_merge_imports_no_other_command_module(tmp_path):
    base, cow = tmp_path / "base.img", tmp_path / "t.cow"
    base.write_bytes(bytes(4 << 12))
    with CowWriter(cow) as w:
        w.add_copy(1, 3)
        w.add_replace(2, b"r" * 4096)
        w.finalize()
    proc = subprocess.run([sys.executable, "-c", RUNNER, "cow", "merge", "--base", str(base), str(cow)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    out, _, names = proc.stdout.rpartition("\nMODULES ")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "merged 2 ops" in out
    modules = set(names.split())
    assert "dmuserd.daemon.cow_commands" in modules
    others = {name for name in COMMAND_MODULES if name != "dmuserd.daemon.cow_commands"}
    assert not modules & others, sorted(modules & others)
    assert "tqdm" not in modules  # no terminal here: no progress bar
    assert base.read_bytes()[8192:12288] == b"r" * 4096
    # the auto mover looked for DSA queues: the class of one is defined only where there is one
    assert ("dmuserd.dsa_offload._workqueue" in modules) == bool(discover())
