"""Type stub of the optional C extension built from ``snapshot/_cow_native.c`` (pyproject.toml ext-modules).

``snapshot/_cow_reader.py`` (CowReader._plain_v2) is the one caller; the C file says what it takes and returns.
"""

from typing import Any

def plain_v2(buf: bytes, count: int, data_pos: int, data_start: int, file_size: int, compression: int,
             valid_compression: bytes, xor: int, replace: int, source_mask: int, /) -> Any: ...
