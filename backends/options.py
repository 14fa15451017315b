"""Typed parsing of backend options (``key=value`` from the command line,
or a TOML table), with errors that name the option and the bad value."""

from __future__ import annotations

import re

from dmuserd.backends._api import BackendError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
_SUFFIX = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


def parse_size(text, *, what: str = "size") -> int:
    """``"4096"``, ``"64K"``, ``"1G"``, ``"2GiB"`` → bytes (binary suffixes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise BackendError(f"{what}: must not be negative (got {text})")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise BackendError(f"{what}: {text!r} is not a size (use a number with an optional K/M/G/T suffix)")
    return int(match.group(1)) << _SUFFIX[match.group(2).upper()]


def parse_bool(text, *, what: str) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise BackendError(f"{what}: {text!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


class Options:
    """Take typed options out of a dict; :meth:`finish` rejects leftovers.

    ::

        opts = Options("memory", options)
        size = opts.size("size")
        opts.finish()
    """

    def __init__(self, backend: str, options: dict) -> None:
        self._backend = backend
        self._options = dict(options)

    def _take(self, key, default, required):
        if key in self._options:
            return self._options.pop(key)
        if required:
            raise BackendError(f"backend {self._backend!r} needs the option {key}=...")
        return default

    def _what(self, key):
        return f"backend {self._backend!r} option {key}"

    def str(self, key: str, default=None, *, required: bool = False):
        value = self._take(key, default, required)
        return None if value is None else str(value)

    def size(self, key: str, default=None, *, required: bool = False):
        value = self._take(key, default, required)
        return None if value is None else parse_size(value, what=self._what(key))

    def int(self, key: str, default=None, *, required: bool = False):
        value = self._take(key, default, required)
        if value is None:
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise BackendError(f"{self._what(key)}: {value!r} is not an integer") from None

    def bool(self, key: str, default: bool = False):
        value = self._take(key, default, False)
        return parse_bool(value, what=self._what(key))

    def finish(self) -> None:
        if self._options:
            raise BackendError(
                f"backend {self._backend!r} does not know the option(s) {', '.join(sorted(self._options))}"
            )


def size_and_block_size(backend: str, options: dict) -> tuple[int, int]:
    """The ``size=`` (required) and ``block_size=`` (default 512) options,
    all a RAM-like backend takes."""
    opts = Options(backend, options)
    size = opts.size("size", required=True)
    block_size = opts.size("block_size", 512)
    opts.finish()
    return size, block_size
