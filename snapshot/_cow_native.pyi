"""Type stub of the optional C extension built from ``snapshot/_cow_native.c`` (pyproject.toml ext-modules).

``snapshot/_cow_reader.py`` (CowReader._walk_v2) and ``snapshot/_cow_order.py`` (check_unique_rows,
merge_order_rows) and ``snapshot/_cow_table.py`` (OpTable.largest, data_rows) are the callers; the C file says what each
function takes and returns.
"""

from array import array
from typing import Any

from _typeshed import ReadableBuffer

def walk_v2(fd: int, pos: int, data_pos: int, cluster_ops: int, data_start: int, file_size: int, compression: int,
            columns: tuple[Any, ...], valid_compression: bytes, copy: int, replace: int, zero: int, xor: int,
            cluster: int, source_mask: int, /) -> tuple[int, int, int, int]: ...
def rank_rows(types: ReadableBuffer, new_blocks: ReadableBuffer, factors: ReadableBuffer, rows: ReadableBuffer,
              meta: bytes, ranked: array[int], /) -> bool: ...
def order_rows(types: ReadableBuffer, new_blocks: ReadableBuffer, sources: ReadableBuffer, rows: ReadableBuffer,
               ranked: ReadableBuffer, sequence: ReadableBuffer, file_order_rest: bool, block_size: int,
               ordered: bytes, copy_type: int, order: array[int], /) -> bool: ...
def column_max(values: ReadableBuffer, signed: bool, types: ReadableBuffer, wanted: bytes, plus: ReadableBuffer,
               /) -> int | None: ...
def rows_of(types: ReadableBuffer, wanted: bytes, rows: array[int], /) -> None: ...
