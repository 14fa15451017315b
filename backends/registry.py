"""The backend registry: names → backend classes.

Built-ins and plug-ins are found the same way, through the entry-point group
``dmuserd.backends``: a package that declares::

    [project.entry-points."dmuserd.backends"]
    my-backend = "my_pkg.module:MyBackend"

makes ``--backend my-backend:key=value,...`` work once installed. A spec may
also name a class directly as ``module.path:Class`` followed by ``:options``
(``--backend my_pkg.mod:MyBackend:size=1G``) for backends not packaged yet.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from dmuserd.backends._api import Backend, BackendError

GROUP = "dmuserd.backends"


def available() -> dict[str, str]:
    """Registered backend names → ``module:attr``."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def backend_class(name: str) -> type[Backend]:
    """Look a backend class up by registry name or ``module.path:Class``."""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    try:
        if found:
            cls = found[0].load()
        elif ":" in name or "." in name:
            module, _, attr = name.partition(":")
            cls = getattr(importlib.import_module(module), attr)
        else:
            known = ", ".join(sorted(available())) or "none"
            raise BackendError(f"unknown backend {name!r} (known: {known})")
    except (ImportError, AttributeError) as exc:
        raise BackendError(f"backend {name!r} could not be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendError(f"backend {name!r} is {cls!r}, not a dmuserd Backend subclass")
    return cls


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"memory:size=1G"`` → ``("memory", {"size": "1G"})``.

    ``"pkg.mod:Class:a=1"`` → ``("pkg.mod:Class", {"a": "1"})``.
    """
    name, _, rest = spec.partition(":")
    head, _, tail = rest.partition(":")
    if "." in name and head and "=" not in head and "," not in head:
        # module.path:Class form (a dotted module): the class is the second field.
        name, rest = f"{name}:{head}", tail
    options: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise BackendError(f"backend option {item!r} in {spec!r} is not key=value")
        options[key.strip()] = value.strip()
    return name, options


def create(name: str, options: dict[str, str] | None = None) -> Backend:
    """Instantiate a backend by name with its options."""
    return backend_class(name).from_options(dict(options or {}))


def from_spec(spec: str) -> Backend:
    """Instantiate a backend from a command-line spec (``memory:size=1G``)."""
    name, options = parse_spec(spec)
    return create(name, options)
