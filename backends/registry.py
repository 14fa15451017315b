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
from typing import TypeVar

from dmuserd.backends._api import Backend, BackendError

GROUP = "dmuserd.backends"

T = TypeVar("T")


def available(group: str = GROUP) -> dict[str, str]:
    """Registered names in an entry-point group (backends by default) → ``module:attr``."""
    return {ep.name: ep.value for ep in entry_points(group=group)}


def registered_class(group: str, name: str, base: type[T], error: type[Exception], what: str) -> type[T]:
    """The subclass of ``base`` registered as ``name`` in ``group``, or named ``module.path:Class``.

    The one lookup of plug-in classes: backends here, exports
    (:mod:`dmuserd.daemon.export`) through it too. Failures raise ``error``
    saying ``what`` was asked for and, for an unknown name, the known ones.
    """
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    try:
        if found:
            cls = found[0].load()
        elif ":" in name:
            module, _, attr = name.partition(":")
            cls = getattr(importlib.import_module(module), attr)
        else:
            known = ", ".join(sorted(available(group))) or "none"
            raise error(f"unknown {what} {name!r} (known: {known})")
    except (ImportError, AttributeError, ValueError) as exc:
        raise error(f"{what} {name!r} could not be loaded: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise error(f"{what} {name!r} is {cls!r}, not a dmuserd {base.__name__} subclass")
    return cls


def backend_class(name: str) -> type[Backend]:
    """Look a backend class up by registry name or ``module.path:Class``."""
    return registered_class(GROUP, name, Backend, BackendError, "backend")


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
