"""Loading the optional C extension, remembering why it failed if it did.

Everything else asks :func:`extension` and treats ``None`` as "CPU engine
only"; ``dmuserd dsa info`` shows :func:`load_error`.
"""

from __future__ import annotations

import functools


@functools.cache
def _load():
    try:
        from dmuserd.dsa_offload import _dsa
    except ImportError as exc:  # not built (no compiler) or not loadable
        return None, f"{type(exc).__name__}: {exc}"
    return _dsa, None


def extension():
    """The ``_dsa`` module, or None when it was not built."""
    return _load()[0]


def load_error() -> str | None:
    """Why the extension could not be imported (None when it was)."""
    return _load()[1]
