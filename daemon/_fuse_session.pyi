"""A libfuse low-level session handing each FUSE request to Python as one event (daemon/_fuse_session.c)."""

from collections.abc import Sequence

from typing_extensions import Buffer

LOOKUP: int
GETATTR: int
SETATTR: int
OPEN: int
READ: int
WRITE: int
FSYNC: int
OPENDIR: int
READDIR: int
STATFS: int
FALLOCATE: int
#: SETATTR's ``to_set`` bit for a new size
SET_ATTR_SIZE: int

#: (ino, mode, nlink, size, uid, gid, blksize, blocks, time_ns)
Attr = tuple[int, int, int, int, int, int, int, int, int]

class Request:
    """One FUSE request, answered once by one of its methods (EIO if dropped unanswered).

    Each method returns True when the answer was sent, False when the request
    was answered already or its session is closed.
    """

    @property
    def answered(self) -> bool: ...
    def error(self, errno: int, /) -> bool: ...
    def data(self, data: Buffer | Sequence[Buffer], /) -> bool: ...
    def written(self, count: int, /) -> bool: ...
    def attr(self, attr: Attr, timeout: float, /) -> bool: ...
    def entry(self, attr: Attr, timeout: float, /) -> bool: ...
    def open(self, fh: int, direct_io: bool, /) -> bool: ...
    def statfs(self, bsize: int, blocks: int, files: int, namemax: int, /) -> bool: ...
    def dirents(self, size: int, entries: list[tuple[bytes, int, int, int]], /) -> bool: ...

class Session:
    """Session(mountpoint, options): a mounted libfuse low-level session."""

    def __init__(self, mountpoint: str, options: str) -> None: ...
    @property
    def fd(self) -> int: ...
    @property
    def outstanding(self) -> int: ...
    def next(self) -> tuple | None: ...
    def close(self) -> None: ...
