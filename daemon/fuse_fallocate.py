"""FUSE ``fallocate`` for pyfuse3, which does not implement it.

Why
---
pyfuse3 (3.5) registers no ``fallocate`` operation with libfuse, so libfuse
answers every ``FUSE_FALLOCATE`` with ENOSYS and the kernel then stops asking
for the whole mount (every ``fallocate(2)`` on it fails with EOPNOTSUPP). A
loop device on a FUSE file needs it: the loop driver turns discard into
``fallocate(PUNCH_HOLE|KEEP_SIZE)`` and write-zeroes into
``fallocate(ZERO_RANGE|KEEP_SIZE)`` (``PUNCH_HOLE`` when unmapping is allowed).

How
---
The C extension :mod:`dmuserd.daemon._fuse_fallocate` defines
``fuse_session_new`` (and ``fuse_session_destroy``) itself. :func:`install`
loads it with ``RTLD_GLOBAL``, which must happen *before* ``import pyfuse3``:
when pyfuse3's extension is then loaded, the dynamic linker looks in the global
scope before pyfuse3's own libfuse3, so pyfuse3's ``fuse_session_new`` binds to
ours. Ours copies pyfuse3's operation table, adds a C ``fallocate`` handler and
calls libfuse's real ``fuse_session_new``. Our ``fuse_session_destroy`` answers
EIO to any request still outstanding, then calls libfuse's.

The C handler runs inside pyfuse3's request processing (a trio task, GIL held)
and calls the function given to :func:`set_handler` as
``fn(req, ino, mode, offset, length)``. That function must not block: it starts
the work (``nursery.start_soon``) and the work answers with
:func:`reply` ``(req, errno)``, 0 for success. Usage::

    from dmuserd.daemon import fuse_fallocate
    have_fallocate = fuse_fallocate.install()   # before the first `import pyfuse3`
    import pyfuse3
    ...
    pyfuse3.init(ops, mountpoint, options)
    async with trio.open_nursery() as nursery:
        def on_fallocate(req, ino, mode, offset, length):
            nursery.start_soon(do_fallocate, req, ino, mode, offset, length)

        async def do_fallocate(req, ino, mode, offset, length):
            ...                                  # the work
            fuse_fallocate.reply(req, 0)         # or an errno

        if have_fallocate:
            fuse_fallocate.set_handler(on_fallocate)
        nursery.start_soon(pyfuse3.main)

Without a handler, or when the handler raises, the request is answered at once
(EOPNOTSUPP, resp. EIO). Requests left unanswered when the session is
destroyed (``pyfuse3.close()``) are answered EIO; a later :func:`reply` for
them returns False.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Callable

import structlog

log = structlog.get_logger("dmuserd.fuse_fallocate")

# fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01  #: do not change the file size
FALLOC_FL_PUNCH_HOLE = 0x02  #: deallocate (reads return zeros); needs KEEP_SIZE
FALLOC_FL_NO_HIDE_STALE = 0x04  #: reserved
FALLOC_FL_COLLAPSE_RANGE = 0x08  #: remove a range, shifting the rest down
FALLOC_FL_ZERO_RANGE = 0x10  #: zero a range (may stay allocated)
FALLOC_FL_INSERT_RANGE = 0x20  #: insert a hole, shifting the rest up
FALLOC_FL_UNSHARE_RANGE = 0x40  #: unshare shared (reflinked) blocks
FALLOC_FL_WRITE_ZEROES = 0x80  #: zero a range with real zeroed blocks (Linux 6.17)

Handler = Callable[[int, int, int, int, int], object]


class FallocateShimError(RuntimeError):
    """The fallocate shim cannot be put in front of pyfuse3."""


class PyFuse3AlreadyImported(FallocateShimError):
    """pyfuse3 was imported before :func:`install`: it is bound to libfuse's
    ``fuse_session_new`` for good, so this process cannot get fallocate."""


_ext = None  # the C module once it is in the global scope
_unavailable: str | None = None  # why install() failed, once it has


def install(*, strict: bool = False) -> bool:
    """Put the fallocate shim in front of pyfuse3; True when fallocate is available.

    Call it before anything imports pyfuse3. Idempotent: later calls return
    the first answer (also after pyfuse3 has been imported). It returns False,
    logging why, when the extension was not built (no libfuse3-dev or
    compiler at install time) or when pyfuse3 was imported first; with
    ``strict=True`` the latter raises :class:`PyFuse3AlreadyImported` and the
    former :class:`FallocateShimError`.
    """
    global _ext, _unavailable
    if _ext is not None:
        return True
    if _unavailable is None:
        _unavailable = _load()
        if _unavailable is not None:
            log.warning("fuse fallocate unavailable: discard and write-zeroes on FUSE files will fail",
                        reason=_unavailable)
    if _unavailable is not None and strict:
        cls = PyFuse3AlreadyImported if "imported before" in _unavailable else FallocateShimError
        raise cls(_unavailable)
    return _ext is not None


def _load() -> str | None:
    global _ext
    if "pyfuse3" in sys.modules:
        return ("pyfuse3 was imported before fuse_fallocate.install(); "
                "call install() before the first `import pyfuse3`")
    try:
        from dmuserd.daemon import _fuse_fallocate as ext
    except ImportError as exc:
        return f"the _fuse_fallocate extension is not available ({exc})"
    try:
        # Promote the already loaded extension to the global scope (RTLD_NOLOAD:
        # the same object, no second copy), ahead of libfuse3 itself.
        ctypes.CDLL(ext.__file__, mode=os.RTLD_NOW | os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    except OSError as exc:
        return f"could not make the _fuse_fallocate extension global ({exc})"
    _ext = ext
    return None


def unavailable_reason() -> str | None:
    """Why :func:`install` returned False (None if it has not, or succeeded)."""
    return _unavailable


def _require():
    if _ext is None:
        raise FallocateShimError("fuse_fallocate.install() has not succeeded")
    return _ext


def set_handler(fn: Handler | None) -> None:
    """Register ``fn(req, ino, mode, offset, length)`` for fallocate requests.

    ``fn`` is called synchronously from pyfuse3's request processing: it must
    not block or await; it schedules the work, which later calls
    :func:`reply`. If ``fn`` raises, the exception is logged and the request
    answered EIO (unless ``fn`` already answered it). ``None`` removes the
    handler; requests then get EOPNOTSUPP.
    """
    ext = _require()
    if fn is None:
        ext.set_handler(None)
        return
    if not callable(fn):
        raise TypeError(f"handler must be callable, not {type(fn).__name__}")

    def guarded(req: int, ino: int, mode: int, offset: int, length: int) -> None:
        try:
            fn(req, ino, mode, offset, length)
        except Exception:
            log.warning("fuse fallocate handler raised; answering EIO", exc_info=True, inode=ino, mode=mode,
                        offset=offset, length=length)
            ext.reply(req, errno.EIO)  # no-op if fn answered before raising

    ext.set_handler(guarded)


def reply(req: int, err: int = 0) -> bool:
    """Answer fallocate request ``req``: ``err`` 0 for success, else a positive errno.

    Returns False (sending nothing) when ``req`` is not outstanding: already
    answered, or answered EIO because the session was destroyed. May be
    called from any thread.
    """
    return _require().reply(req, err)


def pending() -> int:
    """Number of fallocate requests handed to the handler and not answered yet."""
    return _require().pending()


def sessions() -> int:
    """FUSE sessions created with our handler; 0 after ``pyfuse3.init()`` means
    pyfuse3 did not bind to the shim."""
    return _require().sessions()
