"""Type stub of the optional C extension built from ``daemon/_fuse_fallocate.c`` (pyproject.toml ext-modules).

Its functions are untyped here: ``daemon/fuse_fallocate.py`` is the one caller and says what they take.
"""

from typing import Any

def __getattr__(name: str) -> Any: ...
