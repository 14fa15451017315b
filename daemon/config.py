"""What to serve: targets, their backend and exports, from flags or TOML.

The command-line contract (other tools and users' scripts rely on it)::

    dmuserd serve [--name NAME] --backend TYPE[:key=value,...] \\
                  --export KIND:WHERE [--export ...]

``KIND:WHERE`` is ``fuse:/run/dmuserd/fuse`` (the file inside is named after
the target), ``nbd:/run/dmuserd/disk.sock`` or ``nbd:tcp:HOST:PORT``, and
``dm-user:NAME``; options follow after commas (``dm-user:disk,channels=8``).
KIND is any export registered under the ``dmuserd.exports`` entry points
(:mod:`dmuserd.daemon.export`), or a class named ``package.module:Class``
(then ``package.module:Class:WHERE``).

A TOML file says the same, one table per target::

    [daemon]
    control_socket = "/run/dmuserd/control.sock"   # optional
    offload = "auto"          # optional: data mover engine (auto, dsa, emulated, cpu)

    [targets.disk]
    backend = "memory:size=1G"            # or { type = "memory", size = "1G" }
    exports = ["fuse:/run/dmuserd/fuse"]
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field

from dmuserd.backends import parse_spec
from dmuserd.errors import DmuserdError

class ConfigError(DmuserdError):
    """A target, backend or export description that cannot be used."""


@dataclass
class ExportSpec:
    kind: str
    where: str
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = "".join(f",{k}={v}" for k, v in self.options.items())
        return f"{self.kind}:{self.where}{opts}"


@dataclass
class TargetSpec:
    name: str
    backend: str
    backend_options: dict[str, str]
    exports: list[ExportSpec]


@dataclass
class DaemonSpec:
    targets: list[TargetSpec]
    control_socket: str | None = None
    #: data mover engine (auto, dsa, emulated, cpu) for backends that move data
    offload: str | None = None


def default_control_socket() -> str:
    """``/run/dmuserd/control.sock`` for root, else under ``$XDG_RUNTIME_DIR``."""
    if os.geteuid() == 0:
        return "/run/dmuserd/control.sock"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/dmuserd-{os.getuid()}"
    return os.path.join(base, "dmuserd", "control.sock")


def parse_export(text: str) -> ExportSpec:
    """``KIND:WHERE[,key=value...]``; KIND a registered export kind or ``module.path:Class``.

    A kind whose class has a ``where_default`` may leave WHERE out: ``ublk``, ``ublk,queues=2``.
    """
    from dmuserd.daemon.export import available, export_class

    kind, sep, rest = text.partition(":")
    bare, comma, options = text.partition(",")
    if ":" not in bare and bare in available():  # KIND alone, or KIND,key=value...: WHERE left out
        kind, sep, rest = bare, ":", comma + options
    if "." in kind and sep:  # a class by module path: module.path:Class:WHERE
        name, sep, rest = rest.partition(":")
        kind = f"{kind}:{name}"
    elif kind not in available():
        sep = ""
    where, *items = rest.split(",")
    if sep and not where:
        where = export_class(kind).where_default or ""
    if not sep or not where:
        raise ConfigError(f"export {text!r}: use KIND:WHERE with KIND one of {', '.join(sorted(available()))} "
                          "or package.module:Class (e.g. fuse:/run/dmuserd/fuse, nbd:/run/dmuserd/disk.sock, "
                          "dm-user:disk)")
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"export {text!r}: option {item!r} is not key=value")
        options[key] = value
    return ExportSpec(kind, where, options)


def make_target(name: str, backend: str, options: dict, exports: list[str]) -> TargetSpec:
    if not name or "/" in name or name.startswith(".") or "," in name:
        raise ConfigError(f"target name {name!r}: use a plain file name (letters, digits, - and _)")
    if not exports:
        raise ConfigError(f"target {name!r} has no export: add --export fuse:/run/dmuserd/fuse (or nbd:..., dm-user:...)")
    return TargetSpec(name, backend, {k: str(v) for k, v in options.items()}, [parse_export(e) for e in exports])


def parse_target(name: str, backend: str, exports: list[str]) -> TargetSpec:
    """A target from command-line words: ``--backend`` spec and ``--export``s."""
    backend_name, options = parse_spec(backend)
    return make_target(name, backend_name, options, exports)


def load_toml(path: str) -> DaemonSpec:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from None
    daemon = doc.get("daemon", {})
    targets = []
    for name, table in (doc.get("targets") or {}).items():
        if not isinstance(table, dict):
            raise ConfigError(f"config {path}: [targets.{name}] must be a table")
        backend = table.get("backend")
        if isinstance(backend, dict):
            options = dict(backend)
            kind = options.pop("type", None)
            if not kind:
                raise ConfigError(f"config {path}: targets.{name}.backend needs type = \"...\"")
        elif isinstance(backend, str):
            kind, options = parse_spec(backend)
        else:
            raise ConfigError(f"config {path}: targets.{name} needs backend = \"TYPE:key=value,...\"")
        exports = table.get("exports") or []
        if isinstance(exports, str):
            exports = [exports]
        targets.append(make_target(name, kind, options, exports))
    if not targets:
        raise ConfigError(f"config {path}: no [targets.NAME] table")
    offload = daemon.get("offload")
    if offload is not None:
        check_offload(offload, f"config {path}: [daemon] offload")
    return DaemonSpec(targets, daemon.get("control_socket"), offload)


def check_offload(value, where: str) -> str:
    from dmuserd.dsa_offload import ENGINES

    if value not in ENGINES:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(ENGINES)}")
    return value
