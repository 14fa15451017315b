"""The command line imports only what the chosen command uses.

Each case runs ``dmuserd`` in a fresh interpreter and looks at
``sys.modules`` when it is done (not at times: performance lives in
``bench/``): building the parser must not pull in structlog (which imports
asyncio and structlog.dev), trio, crc32c or the data mover, and an offline
merge without a terminal must not import tqdm. The log lines keep their
format: JSON objects when stdout is not a terminal, readable lines on one.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

#: prints the command's sorted module names on the line after a marker, whatever the exit
RUNNER = """
import atexit, sys
atexit.register(lambda: print("\\nMODULES " + " ".join(sorted(sys.modules))))
from dmuserd.daemon.cli import main
sys.exit(main(sys.argv[1:]))
"""

HEAVY = ("structlog", "structlog.dev", "structlog.stdlib", "asyncio", "trio", "crc32c", "tqdm",
         "dmuserd.dsa_offload._mover", "dmuserd.snapshot.merge")


def modules_after(*args: str, cwd=None) -> tuple[set[str], str, str]:
    """(modules imported, stdout, stderr) of a dmuserd command."""
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, cwd=cwd,
                          stdin=subprocess.DEVNULL, timeout=120)
    out, _, names = proc.stdout.rpartition("\nMODULES ")
    assert names, proc.stdout + proc.stderr
    return set(names.split()), out, proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["cow", "merge", "--help"], ["cow", "--help"],
                                  ["merge", "start", "--help"], ["serve", "--help"], ["ota", "--help"]])
def test_help_imports_nothing_heavy(args):
    modules, out, _err = modules_after(*args)
    assert "usage: dmuserd" in out
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_dsa_offload_names_load_on_first_use():
    code = ("import sys, dmuserd.dsa_offload as d; assert 'trio' not in sys.modules; "
            "assert 'open_mover' in dir(d) and 'open_mover' in d.__all__; "
            "from dmuserd.dsa_offload import open_mover, MOVER, Status; "
            "import dmuserd.dsa_offload._open as o; assert open_mover is o.open_mover; "
            "assert 'trio' in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import dmuserd.dsa_offload as d; d.no_such_name"],
                          capture_output=True, text=True, timeout=120)
    assert "AttributeError" in proc.stderr and "no_such_name" in proc.stderr


@pytest.fixture
def merge_case(tmp_path):
    """A small base image and a COW file with copies and replaces, made with the CLI."""
    block = 4096
    base = bytearray(os.urandom(64 * block))
    target = bytearray(base)
    for i in range(0, 16, 2):
        target[(i + 32) * block:(i + 33) * block] = base[i * block:(i + 1) * block]
    target[5 * block:6 * block] = os.urandom(block)
    (tmp_path / "base.img").write_bytes(base)
    (tmp_path / "target.img").write_bytes(target)
    subprocess.run([sys.executable, "-m", "dmuserd", "cow", "create", "--base", "base.img", "--target",
                    "target.img", "-o", "t.cow", "--offload", "cpu"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=120)
    return tmp_path, bytes(target)


def test_offline_merge_without_terminal_logs_json_and_skips_tqdm(merge_case):
    tmp, target = merge_case
    modules, out, err = modules_after("cow", "merge", "--base", "base.img", "t.cow", "--offload", "cpu", cwd=tmp)
    assert (tmp / "base.img").read_bytes() == target
    assert "tqdm" not in modules
    assert "structlog" in modules and "trio" in modules  # what the merge does use
    assert not [line for line in out.splitlines() if line.startswith("{")]  # stdout is the result only
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events if e["event"].startswith("merge")] == ["merge", "merged"]
    assert all({"level", "timestamp"} <= set(e) for e in events)
    assert "t.cow: merged" in out


def test_terminal_gets_readable_lines(merge_case):
    """On a terminal (a pty) the same merge logs structlog's console lines, not JSON."""
    tmp, target = merge_case
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the pty
        os.chdir(tmp)
        os.execv(sys.executable, [sys.executable, "-m", "dmuserd", "cow", "merge", "--base", "base.img",
                                  "t.cow", "--offload", "cpu"])
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the pty
            break
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert (tmp / "base.img").read_bytes() == target
    lines = [line for line in text.splitlines() if "merged" in line and "this_run" in line]
    assert lines, text
    assert not lines[0].lstrip().startswith("{")
    assert "[info" in lines[0] or "info" in lines[0]
