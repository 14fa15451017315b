"""Type stub of the optional C extension built from ``snapshot/_verity_rs.c`` (pyproject.toml ext-modules).

Its functions are untyped here: ``snapshot/_verity.py`` is the one caller and says what they take.
"""

from typing import Any

def __getattr__(name: str) -> Any: ...
