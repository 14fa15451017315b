"""The merge journal: a scratch window in a file beside a COW file that has no scratch space.

A COW file written with ``buffer_size`` 0 (AOSP writes them for test
devices) has nowhere to keep a Copy/Xor window's new contents while the
base is overwritten. snapuserd merges it with anonymous memory as its
read-ahead buffer, so a crash inside such a window loses blocks for good.
dmuserd keeps the window in ``<cow>.merge-journal`` instead (next to the
COW file: the same file system, and a name a later run finds again) and
merges with the same protocol as the scratch area
(:mod:`._merge_engine`), so an interrupted merge resumes to the exact
target.

Layout: a 64-byte header, then a :class:`~._merge_scratch.ScratchLayout`
of :data:`JOURNAL_BUFFER` bytes whose ``header_size`` is 64 (state byte at
64, entries, our CRC tag, data)::

    0   magic  b"DMUSRJNL"
    8   u32    version (1)
    12  u32    block size
    16  u64    the COW file's size
    24  u32    CRC-32 of the COW header, num_merge_ops zeroed
    56  u64    first: the merge-order index of the window's first op
    64  u8     state: 0 none, 1 in progress, 2 the window is complete and durable

The one difference from the scratch area: the commit (``num_merge_ops`` in
the COW header) and the state byte are in two files, so they cannot be
written at once. ``first`` and the state byte are written together (one
sector) when a window becomes durable; at resume a window is replayed only
when ``first`` is the COW's ``num_merge_ops``. ``first`` below it is a window
already committed (its state byte reset not yet written), ignored; above
it, damage. The journal is removed when the merge completes.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from dmuserd.snapshot._merge_errors import MergeResumeError, MergeUnsafeError
from dmuserd.snapshot._merge_scratch import ScratchLayout

MAGIC = b"DMUSRJNL"
VERSION = 1
HEADER_SIZE = 64
#: the window's bytes in the journal (snapuserd's default scratch size: 510 blocks of 4 KiB)
JOURNAL_BUFFER = 2 << 20
FIRST_OFFSET = 56
_HEAD = struct.Struct("<8sIIQI")


def journal_path(cow) -> str:
    """Where the journal of ``cow`` lies."""
    return os.fspath(cow) + ".merge-journal"


def journal_layout(block_size: int) -> ScratchLayout:
    return ScratchLayout(HEADER_SIZE, JOURNAL_BUFFER, block_size)


def cow_identity(cow_fd: int, header_size: int) -> tuple[int, int]:
    """(size, CRC-32 of the header with num_merge_ops zeroed) of the open COW file."""
    size = os.fstat(cow_fd).st_size
    head = bytearray(os.pread(cow_fd, header_size, 0))
    head[26:34] = bytes(8)  # num_merge_ops changes as the merge goes
    return size, zlib.crc32(head)


def state_bytes(first: int, state: int) -> bytes:
    """``first`` and the state byte, written together at :data:`FIRST_OFFSET`."""
    return struct.pack("<QB", first, state)


@dataclass
class JournalHead:
    first: int
    state: int
    mine: bool  # the header names this COW file


def read_head(raw: bytes, identity: tuple[int, int], block_size: int) -> JournalHead:
    """Parse the first 65 bytes of a journal (a short or foreign one is not ``mine``)."""
    if len(raw) < HEADER_SIZE + 1:
        return JournalHead(0, 0, False)
    magic, version, bs, size, crc = _HEAD.unpack_from(raw)
    first, state = struct.unpack_from("<QB", raw, FIRST_OFFSET)
    mine = magic == MAGIC and version == VERSION and bs == block_size and (size, crc) == identity
    return JournalHead(first, state, mine)


def open_journal(cow, cow_fd: int, header_size: int, block_size: int) -> int:
    """Open (or create, durably) the journal of ``cow``; its file descriptor.

    A journal that names another COW file (or none) is started afresh,
    unless it holds a durable window (state 2): that is refused, it may be
    the only copy of blocks of another merge. Raises
    :class:`MergeUnsafeError` saying where it looked when no journal can
    be written there.
    """
    path = journal_path(cow)
    identity = cow_identity(cow_fd, header_size)
    fd = _open_or_refuse(cow, path)
    try:
        head = read_head(os.pread(fd, HEADER_SIZE + 1, 0), identity, block_size)
        if head.mine:
            return fd
        if head.state == 2 and os.fstat(fd).st_size > HEADER_SIZE:
            raise MergeResumeError(f"{path} holds a durable merge window of another COW file (or a damaged "
                                   f"header); it may be the only copy of blocks of that merge: move it away "
                                   f"once that merge is resolved")
        os.ftruncate(fd, 0)
        os.pwrite(fd, _HEAD.pack(MAGIC, VERSION, block_size, *identity).ljust(FIRST_OFFSET, b"\0")
                  + state_bytes(0, 0), 0)
        os.ftruncate(fd, HEADER_SIZE + JOURNAL_BUFFER)
        os.fsync(fd)
        _sync_dir(os.path.dirname(os.path.abspath(path)))
        return fd
    except OSError as exc:
        os.close(fd)
        raise MergeUnsafeError(
            f"{cow} has no scratch space (buffer_size 0) and the merge journal {path} cannot be written "
            f"({exc.strerror}); the base is untouched") from None
    except BaseException:
        os.close(fd)
        raise


def _open_or_refuse(cow, path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise MergeUnsafeError(
            f"{cow} cannot be merged in place: it has no scratch space (buffer_size 0) and no merge journal "
            f"can be written at {path} ({exc.strerror}), so an interrupted merge could not be recovered; "
            "the base is untouched. Make that place writable, regenerate the COW file with scratch space, "
            "or write the target with `dmuserd cow render`") from None


def probe_journal(cow) -> None:
    """Refuse up front (:class:`MergeUnsafeError`, saying where) when the journal of ``cow`` cannot be opened."""
    os.close(_open_or_refuse(cow, journal_path(cow)))


def open_journal_readonly(cow) -> int | None:
    """The journal of ``cow`` opened to read (an online merge's first look), or None when there is none."""
    import stat

    try:
        fd = os.open(journal_path(cow), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None  # none, or none readable: the merge's start says what is wrong with it
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def remove_journal(cow) -> None:
    """The merge is complete: its journal goes (a leftover one is harmless: it is stale)."""
    try:
        os.unlink(journal_path(cow))
    except FileNotFoundError:
        pass


def _sync_dir(path: str) -> None:
    """Make a new directory entry durable (the journal must survive a power cut as a name too)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
