"""The async backend API, the built-in backends and the plug-in registry.

Write a backend by subclassing :class:`Backend`; register it through the
``dmuserd.backends`` entry-point group (see :mod:`dmuserd.backends.registry`);
check it against the contract with :mod:`dmuserd.backends.testing` (a
conformance suite run by pytest).
"""

from dmuserd.backends._api import Backend, BackendError, Extent, Op, Unsupported
from dmuserd.backends.options import Options, parse_bool, parse_size
from dmuserd.backends.registry import backend_class, create, from_spec, parse_spec

__all__ = [
    "Backend",
    "BackendError",
    "Extent",
    "Op",
    "Options",
    "Unsupported",
    "backend_class",
    "create",
    "from_spec",
    "parse_bool",
    "parse_size",
    "parse_spec",
]
