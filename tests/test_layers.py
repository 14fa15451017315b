"""Lower layers never import upper ones.

``protocol/`` is a sans-IO leaf: it imports nothing of dmuserd but itself
and the root error class (``dmuserd.errors``, itself a leaf importing
nothing).
``backends/``, ``snapshot/``, ``dsa_offload/`` and ``images/`` never import
``daemon/`` (the command line and control glue of those areas live in
``daemon/``). Checked on the source with :mod:`ast`, every import
statement wherever it is (a function-level import counts too), and the
import strings handed to ``importlib`` (a ``"dmuserd.daemon..."`` literal).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOWER = ("protocol", "backends", "snapshot", "dsa_offload", "images")


def imported_names(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) for each import in ``source`` (a module of ``package``),
    and each string naming a dmuserd module."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("dmuserd."):
            found.append((node.lineno, node.value.partition(":")[0]))
    return found


def package_of(path: Path) -> str:
    return ".".join(("dmuserd", *path.relative_to(ROOT).parts[:-1]))


def sources(area: str) -> list[Path]:
    return sorted(p for p in (ROOT / area).rglob("*.py") if "__pycache__" not in p.parts)


def violations(area: str, allowed) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}: {name}"
            for path in sources(area) for line, name in imported_names(path.read_text(), package_of(path))
            if (name == "dmuserd" or name.startswith("dmuserd.")) and not allowed(name)]


@pytest.mark.parametrize("area", LOWER)
def test_lower_layers_do_not_import_the_daemon(area):
    assert sources(area), f"no Python files under {area}/"
    bad = violations(area, lambda name: name != "dmuserd.daemon" and not name.startswith("dmuserd.daemon."))
    assert not bad, f"{area}/ imports daemon/:\n" + "\n".join(bad)


def test_protocol_imports_only_itself():
    def allowed(name: str) -> bool:
        return name.startswith(("dmuserd.protocol.", "dmuserd.errors")) or name == "dmuserd.protocol"

    bad = violations("protocol", allowed)
    assert not bad, "protocol/ imports other parts of dmuserd:\n" + "\n".join(bad)


def test_the_root_error_module_is_a_leaf():
    path = ROOT / "errors.py"
    assert not [name for _, name in imported_names(path.read_text(), "dmuserd") if name.startswith("dmuserd")]


def test_the_check_sees_imports():
    """The scanner finds absolute, relative, function-level and string imports (so the tests above can fail)."""
    sample = ("from ..daemon import cli\n"
              "def f():\n    import dmuserd.daemon.control\n"
              "X = 'dmuserd.daemon.config:make_target'\n")
    names = {name for _, name in imported_names(sample, "dmuserd.snapshot")}
    assert {"dmuserd.daemon", "dmuserd.daemon.cli", "dmuserd.daemon.control", "dmuserd.daemon.config"} <= names
