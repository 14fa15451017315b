"""Type stub of the optional C extension built from ``snapshot/_merge_io.c`` (pyproject.toml ext-modules).

A run is ``(offset, [buffer, ...])``; ``snapshot/_merge_engine.py`` (MergeIO) is the one caller.
"""

from typing import Any

def pwritev_runs(fd: int, runs: list[tuple[int, list[Any]]], /) -> None: ...
def preadv_runs(fd: int, runs: list[tuple[int, list[Any]]], /) -> int: ...
