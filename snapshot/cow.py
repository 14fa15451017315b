"""Android snapshot COW files (libsnapshot), versions 2 and 3: the public API.

Read a file with :class:`CowReader` (validated; typed errors naming the
offset and the rule), write one with :class:`CowWriter` (byte-compatible
with AOSP's writers; resumable at labels), and get the order a merge
applies ops in with :meth:`CowReader.merge_order` / :func:`merge_order`.
The format itself: ``../shared/specs/android-cow.md``.
"""

from dmuserd.snapshot._compression import Compressor, decompress
from dmuserd.snapshot._cow_format import (
    DEFAULT_BUFFER_SIZE,
    MAGIC,
    Compression,
    CowError,
    CowFormatError,
    CowHeader,
    CowOp,
    CowWriterError,
    OpType,
)
from dmuserd.snapshot._cow_order import SequenceData, check_unique_blocks, merge_order
from dmuserd.snapshot._cow_reader import CowReader
from dmuserd.snapshot._cow_writer import CowWriter, xor_bytes

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "MAGIC",
    "Compression",
    "Compressor",
    "CowError",
    "CowFormatError",
    "CowHeader",
    "CowOp",
    "CowReader",
    "CowWriter",
    "CowWriterError",
    "OpType",
    "SequenceData",
    "check_unique_blocks",
    "decompress",
    "merge_order",
    "xor_bytes",
]
