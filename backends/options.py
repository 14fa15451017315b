"""Typed parsing of options (``key=value`` from the command line, or a TOML
table), with errors that name the owner, the option and the bad value.

Backends and exports both take their options through :class:`Options`:
a backend's errors read ``backend 'memory' option size: ...`` and are
:class:`~dmuserd.backends.BackendError`; an export passes ``kind="export"``
and its own error class (the daemon's ``ConfigError``), so its errors read
``export 'fuse:/run/dmuserd/fuse,channels=x' option channels: ...``."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar, overload

from dmuserd.backends._api import BackendError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
_SUFFIX = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}
# Options has methods named str, int, float and bool: its annotations use these names.
_Str = str
_Int = int
_Float = float
_Bool = bool
_Number = TypeVar("_Number", int, float)


def parse_size(text: object, *, what: str = "size", error: type[Exception] = BackendError) -> int:
    """``"4096"``, ``"64K"``, ``"1G"``, ``"2GiB"`` → bytes (binary suffixes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise error(f"{what}: must not be negative (got {text})")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise error(f"{what}: {text!r} is not a size (use a number with an optional K/M/G/T suffix)")
    return int(match.group(1)) << _SUFFIX[match.group(2).upper()]


def parse_bool(text: object, *, what: str, error: type[Exception] = BackendError) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise error(f"{what}: {text!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


class Options:
    """Take typed options out of a dict; :meth:`finish` rejects leftovers.

    ::

        opts = Options("memory", options)
        size = opts.size("size")
        opts.finish()

    ``owner`` names what the options belong to (a backend's name, an
    export's spec), ``kind`` what that is; ``error`` is the exception class
    raised (see the module doc).
    """

    def __init__(self, owner: str, options: Mapping[str, object], *, kind: str = "backend",
                 error: type[Exception] = BackendError) -> None:
        self._owner = owner
        self._kind = kind
        self._error = error
        self._options = dict(options)

    def _take(self, key: _Str, default: object, required: _Bool) -> object:
        if key in self._options:
            return self._options.pop(key)
        if required:
            raise self._error(f"{self._kind} {self._owner!r} needs the option {key}=...")
        return default

    def _what(self, key: _Str) -> _Str:
        return f"{self._kind} {self._owner!r} option {key}"

    def has(self, key: str) -> bool:
        """The option was given (and not taken yet)."""
        return key in self._options

    @overload
    def str(self, key: _Str, default: _Str, *, required: _Bool = False) -> _Str: ...
    @overload
    def str(self, key: _Str, *, required: Literal[True]) -> _Str: ...
    @overload
    def str(self, key: _Str, default: None = None, *, required: _Bool = False) -> _Str | None: ...

    def str(self, key: _Str, default: _Str | None = None, *, required: _Bool = False) -> _Str | None:
        """The option as text (``default`` when it was not given)."""
        value = self._take(key, default, required)
        return None if value is None else str(value)

    @overload
    def choice(self, key: _Str, choices: Iterable[_Str], default: _Str, *, required: _Bool = False) -> _Str: ...
    @overload
    def choice(self, key: _Str, choices: Iterable[_Str], *, required: Literal[True]) -> _Str: ...
    @overload
    def choice(self, key: _Str, choices: Iterable[_Str], default: None = None, *,
               required: _Bool = False) -> _Str | None: ...

    def choice(self, key: _Str, choices: Iterable[_Str], default: _Str | None = None, *,
               required: _Bool = False) -> _Str | None:
        """One of ``choices`` (the error lists them)."""
        value = self._take(key, default, required)
        choices = tuple(choices)
        if value is not None and str(value) not in choices:
            raise self._error(f"{self._what(key)}: {value!r} is not one of {', '.join(choices)}")
        return None if value is None else str(value)

    @overload
    def size(self, key: _Str, default: _Int | _Str, *, required: _Bool = False) -> _Int: ...
    @overload
    def size(self, key: _Str, *, required: Literal[True]) -> _Int: ...
    @overload
    def size(self, key: _Str, default: None = None, *, required: _Bool = False) -> _Int | None: ...

    def size(self, key: _Str, default: _Int | _Str | None = None, *, required: _Bool = False) -> _Int | None:
        """A size in bytes (``64K``, ``1G``: see :func:`parse_size`)."""
        value = self._take(key, default, required)
        return None if value is None else parse_size(value, what=self._what(key), error=self._error)

    @overload
    def int(self, key: _Str, default: _Int, *, required: _Bool = False, min: _Int | None = None,  # noqa: A002
            max: _Int | None = None) -> _Int: ...
    @overload
    def int(self, key: _Str, *, required: Literal[True], min: _Int | None = None,  # noqa: A002
            max: _Int | None = None) -> _Int: ...
    @overload
    def int(self, key: _Str, default: None = None, *, required: _Bool = False, min: _Int | None = None,  # noqa: A002
            max: _Int | None = None) -> _Int | None: ...

    def int(self, key: _Str, default: _Int | None = None, *, required: _Bool = False,
            min: _Int | None = None, max: _Int | None = None) -> _Int | None:  # noqa: A002
        """An integer, within ``min``..``max`` (inclusive) where given."""
        return self._number(key, default, required, int, "an integer", min, max)

    @overload
    def float(self, key: _Str, default: _Float, *, required: _Bool = False, min: _Float | None = None,  # noqa: A002
              max: _Float | None = None) -> _Float: ...
    @overload
    def float(self, key: _Str, *, required: Literal[True], min: _Float | None = None,  # noqa: A002
              max: _Float | None = None) -> _Float: ...
    @overload
    def float(self, key: _Str, default: None = None, *, required: _Bool = False,  # noqa: A002
              min: _Float | None = None, max: _Float | None = None) -> _Float | None: ...

    def float(self, key: _Str, default: _Float | None = None, *, required: _Bool = False,
              min: _Float | None = None, max: _Float | None = None) -> _Float | None:  # noqa: A002
        """A number, within ``min``..``max`` (inclusive) where given."""
        return self._number(key, default, required, float, "a number", min, max)

    def _number(self, key: _Str, default: _Number | None, required: _Bool, convert: Callable[[Any], _Number],
                noun: _Str, low: _Number | None, high: _Number | None) -> _Number | None:
        value = self._take(key, default, required)
        if value is None:
            return None
        try:
            number = convert(value)
        except (TypeError, ValueError):
            raise self._error(f"{self._what(key)}: {value!r} is not {noun}") from None
        if number != number or (low is not None and number < low) or (high is not None and number > high):
            bounds = f"{low if low is not None else '...'} to {high if high is not None else '...'}"
            raise self._error(f"{self._what(key)}: {value!r} is out of range (use {bounds})")
        return number

    def bool(self, key: _Str, default: _Bool = False) -> _Bool:
        value = self._take(key, default, False)
        return parse_bool(value, what=self._what(key), error=self._error)

    def finish(self, known: _Str = "") -> None:
        """Refuse options nobody took; ``known`` (e.g. ``"channels=N, create=1"``) is added to the error."""
        if self._options:
            hint = f" (known: {known})" if known else ""
            raise self._error(f"{self._kind} {self._owner!r}: unknown option(s) {', '.join(sorted(self._options))}{hint}")


def size_and_block_size(backend: str, options: Mapping[str, object]) -> tuple[int, int]:
    """The ``size=`` (required) and ``block_size=`` (default 512) options,
    all a RAM-like backend takes."""
    opts = Options(backend, options)
    size = opts.size("size", required=True)
    block_size = opts.size("block_size", 512)
    opts.finish()
    return size, block_size
