"""Type stub of the optional C extension built from ``protocol/_records.c`` (pyproject.toml ext-modules)."""

from typing import TypeVar

_T = TypeVar("_T", bound=tuple[object, ...])

def new_message(cls: type[_T], /, *fields: object) -> _T: ...
