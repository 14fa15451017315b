"""``dmuserd cow merge`` imports only what the merge uses (its start-up is
issue #22's figure): the CLI registers the one command module that provides
the command named, and what each module of ``COMMAND_MODULES`` declares is
what it registers. Module names only, no times (performance is in bench/).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

from dmuserd.daemon.cli import COMMAND_MODULES
from dmuserd.dsa_offload import discover, extension
from dmuserd.snapshot.cow import CowWriter

# as `python -m dmuserd` runs it: main() reads the process's own command line
RUNNER = """
import atexit, gc, sys
atexit.register(lambda: print(f"\\nGC {gc.isenabled()} {gc.get_freeze_count()}\\nMODULES " + " ".join(sorted(sys.modules))))
sys.argv = ["dmuserd", *sys.argv[1:]]
from dmuserd.daemon.cli import main
sys.exit(main())
"""


def test_each_module_registers_the_commands_it_declares():
    for name, commands in COMMAND_MODULES.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(name).register(sub)
        assert tuple(sub.choices) == commands, name


def _merge_modules(tmp_path, env=None, gc_state: list | None = None) -> set[str]:
    """Run ``dmuserd cow merge`` of a small COW in a fresh interpreter: the modules it ended with
    (``gc_state`` gets whether its collector was on at the end, and how many objects were frozen)."""
    base, cow = tmp_path / "base.img", tmp_path / "t.cow"
    base.write_bytes(bytes(4 << 12))
    with CowWriter(cow) as w:
        w.add_copy(1, 3)
        w.add_replace(2, b"r" * 4096)
        w.finalize()
    proc = subprocess.run([sys.executable, "-c", RUNNER, "cow", "merge", "--base", str(base), str(cow)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, env=env)
    out, _, names = proc.stdout.rpartition("\nMODULES ")
    out, _, state = out.rpartition("\nGC ")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if gc_state is not None:
        enabled, frozen = state.split()
        gc_state += [enabled == "True", int(frozen)]
    assert "merged 2 ops" in out
    assert base.read_bytes()[8192:12288] == b"r" * 4096
    return set(names.split())


def test_cow_merge_imports_no_other_command_module(tmp_path):
    modules = _merge_modules(tmp_path)
    assert "dmuserd.daemon.cow_commands" in modules
    others = {name for name in COMMAND_MODULES if name != "dmuserd.daemon.cow_commands"}
    assert not modules & others, sorted(modules & others)
    assert "tqdm" not in modules  # no terminal here: no progress bar
    # the auto mover looked for DSA queues: the class of one is defined only where there is one
    assert ("dmuserd.dsa_offload._workqueue" in modules) == bool(discover())


def test_cow_merge_without_dsa_loads_only_the_cpu_mover(tmp_path):
    """A machine without DSA (an empty sysfs tree stands for one): the auto mover is the CPU's, and the
    merge loads no device side of the offload (queue, capabilities, completions, descriptor flags as
    enum classes) and no image class or format module (it only asks whether the base is sparse)."""
    (tmp_path / "sysfs").mkdir()
    modules = _merge_modules(tmp_path, env={**os.environ, "DMUSERD_DSA_SYSFS": str(tmp_path / "sysfs")})
    dsa = {m for m in modules if m.startswith("dmuserd.dsa_offload")}
    cpu_path = {"dmuserd.dsa_offload", "dmuserd.dsa_offload._native", "dmuserd.dsa_offload._discovery",
                "dmuserd.dsa_offload._errors", "dmuserd.dsa_offload._open", "dmuserd.dsa_offload._mover",
                "dmuserd.dsa_offload._ops", "dmuserd.dsa_offload._cpu", "dmuserd.dsa_offload._spec"}
    if extension() is not None:
        cpu_path.add("dmuserd.dsa_offload._dsa")  # the C inline path and the CRC
    assert dsa == cpu_path, sorted(dsa ^ cpu_path)
    assert {m for m in modules if m.startswith("dmuserd.images")} == {"dmuserd.images"}


def test_cow_merge_freezes_its_start_up_and_collects_after(tmp_path):
    """The start-up (parsing, logs, the merge's imports) ran with the collector paused and was frozen
    (:func:`dmuserd.daemon.cli.start_up`); the merge itself ran with the collector on."""
    state: list = []
    _merge_modules(tmp_path, gc_state=state)
    enabled, frozen = state
    assert enabled
    assert frozen > 10_000  # trio's, structlog's and the merge's modules
