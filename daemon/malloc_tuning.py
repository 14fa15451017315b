"""Keep glibc from handing every large I/O buffer back to the kernel.

A 1 MiB READ allocates a few 1 MiB buffers (the BIO's pages, the backend's
data). By default glibc serves blocks that size with ``mmap`` and returns
them with ``munmap`` on free, so each request pays ~256 page faults per
buffer, and the heap is trimmed back to the kernel just as often: measured
here, 1 MiB reads ran at a third of the speed. Serving them from the heap,
with a trim threshold of a few dozen MiB, keeps the pages mapped and warm.

NBD requests go up to 32 MiB, and a WRITE that size passes through a
receive buffer and its payload: two 32 MiB blocks, which glibc would always
``mmap`` (its threshold cannot exceed 32 MiB, and a block needs a few bytes
more than its data). Fresh pages cost ~3.5 µs each to fault in here, so a
32 MiB WRITE spent 35 ms of its ~40 ms in the kernel zeroing pages. So mmap
is off for the heap (``M_MMAP_MAX`` 0) and the trim threshold leaves room
for two such blocks.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import structlog

log = structlog.get_logger("dmuserd.daemon")

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

#: Buffers below this come from the heap (glibc's ceiling for the setting is 32 MiB).
MMAP_THRESHOLD = 32 << 20
#: Blocks served by mmap at once: none, so that 32 MiB blocks come from the heap too.
MMAP_MAX = 0
#: Free heap memory kept before it is returned to the kernel (two 32 MiB WRITEs' worth).
TRIM_THRESHOLD = 160 << 20

_done = False


def keep_large_buffers() -> bool:
    """Apply the settings once per process; False where the C library is not glibc."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = (bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_MMAP_MAX, MMAP_MAX))
          and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    if not ok:
        log.debug("mallopt refused the buffer settings; large I/O will be slower")
    _done = ok
    return ok
