"""dmuserd.protocol is sans I/O: no trio, nothing outside the standard library
(nbdkit's embedded Python loads it without our virtualenv)."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import dmuserd.protocol

PROTOCOL_DIR = pathlib.Path(dmuserd.protocol.__file__).parent


def _imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in {
            "import_module",
            "__import__",
        }:
            names.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return names


def test_source_has_no_trio_import():
    sources = sorted(PROTOCOL_DIR.glob("*.py"))
    assert len(sources) >= 5
    for path in sources:
        for name in _imported_modules(path):
            assert name.split(".")[0] != "trio", f"{path.name} imports {name}"
        assert "import trio" not in path.read_text(), path.name


def test_source_imports_only_stdlib_and_dmuserd():
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    for path in sorted(PROTOCOL_DIR.glob("*.py")):
        for name in _imported_modules(path):
            top = name.split(".")[0]
            assert top in allowed or name in {"dmuserd.errors"} or name.startswith("dmuserd.protocol"), (
                f"{path.name} imports {name}"
            )


def test_import_in_fresh_interpreter_loads_no_trio():
    code = (
        "import json, sys; import dmuserd.protocol; "
        "print(json.dumps(sorted(m for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = json.loads(out.stdout)
    assert "trio" not in modules
    assert not [m for m in modules if m.startswith("trio.")]
    third_party = {
        m.split(".")[0] for m in modules
    } - set(sys.stdlib_module_names) - {"dmuserd", "__main__", "_distutils_hack", "__editable___dmuserd_0_1_0_finder"}
    assert not {m for m in third_party if not m.startswith("_")}, third_party
