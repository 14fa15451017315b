"""Type stub of the optional C extension built from ``snapshot/_merge_io.c`` (pyproject.toml ext-modules).

A run is ``(offset, [buffer, ...])``; ``xor_into(span, delta)`` XORs delta into span; ``snapshot/_merge_engine.py`` (MergeIO) is the one caller.
"""

from typing import Any

def pwritev_runs(fd: int, runs: list[tuple[int, list[Any]]], /) -> None: ...
def preadv_runs(fd: int, runs: list[tuple[int, list[Any]]], /) -> int: ...
def xor_into(span: Any, delta: Any, /) -> None: ...
