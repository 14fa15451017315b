"""librados and librbd, Ceph's C client libraries, through ctypes: the calls the ``rbd`` backend makes.

Why not Debian's ``python3-rbd`` binding for the I/O: its completion
callback runs Python on a librbd thread, so every finished request takes
the GIL from the event loop's thread (a hand-off, two context switches,
per request; on a busy machine the dominant cost). Here a completion is no
callback at all: librbd signals an eventfd (``rbd_set_image_notification``)
and the event loop collects the finished requests in batches
(``rbd_poll_io_events``); no Python ever runs on a librbd thread.

The requests themselves (submits and collecting completions) go through
the C extension ``_rbd_native`` (:attr:`Image.io`), one C call each
instead of two to five ctypes calls: measured in process, 4 KiB reads at
QD32 on the local cluster, the ctypes calls were about a third of the
backend's CPU per request.

Every call returns or raises :class:`CephError` (an :class:`OSError` with
the errno librados/librbd gave and what was being done). The libraries are
``librados.so.2`` and ``librbd.so.1`` (Debian's ``librados2``, ``librbd1``).
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_uint64, c_void_p
from typing import Any

try:
    from dmuserd.backends._rbd_native import Queue as Queue  # re-exported: backends/rbd.py names its methods
except ImportError:  # the optional extension was not built (no C compiler when installed): Image says so
    Queue = None  # type: ignore[assignment,misc]

#: ``rbd_set_image_notification``'s type for an eventfd (librbd.h: EVENT_TYPE_EVENTFD)
_EVENT_TYPE_EVENTFD = 2

_P = POINTER(c_void_p)
_SIGNATURES: dict[str, dict[str, tuple[Any, list[Any]]]] = {
    "librados.so.2": {
        "rados_create": (c_int, [_P, c_char_p]),
        "rados_conf_read_file": (c_int, [c_void_p, c_char_p]),
        "rados_conf_set": (c_int, [c_void_p, c_char_p, c_char_p]),
        "rados_conf_get": (c_int, [c_void_p, c_char_p, c_char_p, c_size_t]),
        "rados_connect": (c_int, [c_void_p]),
        "rados_cluster_fsid": (c_int, [c_void_p, c_char_p, c_size_t]),
        "rados_pool_list": (c_int, [c_void_p, c_char_p, c_size_t]),
        "rados_ioctx_create": (c_int, [c_void_p, c_char_p, _P]),
        "rados_ioctx_destroy": (None, [c_void_p]),
        "rados_shutdown": (None, [c_void_p]),
    },
    "librbd.so.1": {
        "rbd_create": (c_int, [c_void_p, c_char_p, c_uint64, POINTER(c_int)]),
        "rbd_open": (c_int, [c_void_p, c_char_p, _P, c_char_p]),
        "rbd_open_read_only": (c_int, [c_void_p, c_char_p, _P, c_char_p]),
        "rbd_close": (c_int, [c_void_p]),
        "rbd_stat": (c_int, [c_void_p, c_void_p, c_size_t]),
        "rbd_set_image_notification": (c_int, [c_void_p, c_int, c_int]),
    },
}


class _ImageInfo(ctypes.Structure):
    """librbd.h's ``rbd_image_info_t``."""

    _fields_ = [("size", c_uint64), ("obj_size", c_uint64), ("num_objs", c_uint64), ("order", c_int),
                ("block_name_prefix", ctypes.c_char * 24), ("parent_pool", ctypes.c_int64),
                ("parent_name", ctypes.c_char * 96)]


class CephError(OSError):
    """A librados/librbd call failed: ``errno`` is what it returned, the message says what was done."""

    def __init__(self, ret: int, what: str) -> None:
        super().__init__(-ret, f"{what}: {os.strerror(-ret)}")


class _Libs:
    """The two libraries with their functions typed (loaded once)."""

    def __init__(self) -> None:
        for soname, functions in _SIGNATURES.items():
            lib = ctypes.CDLL(soname)
            for name, (restype, argtypes) in functions.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
                setattr(self, name, fn)


_LIBS: _Libs | None = None


def libs() -> Any:
    """The loaded libraries; :class:`OSError` (naming the packages) when they are not installed."""
    global _LIBS
    if _LIBS is None:
        try:
            _LIBS = _Libs()
        except (OSError, AttributeError) as exc:
            raise OSError(f"Ceph's client libraries do not load ({exc}); install librados2 and librbd1 "
                          "(scripts/system-packages.txt, scripts/setup-system)") from None
    return _LIBS


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise CephError(ret, what)
    return ret


def _string(fn: Any, *args: Any) -> str:
    """A string a ``fn(*args, buf, len)`` call writes (the buffer grown while it says -ERANGE)."""
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        ret = fn(*args, buf, size)
        if ret not in (-34, -36):  # ERANGE, ENAMETOOLONG: the buffer is too small
            _check(ret, fn.__name__)
            return buf.value.decode()
        size *= 4


class _Handle:
    """A librados/librbd handle, released once by :meth:`close`."""

    handle: c_void_p
    _lib: Any

    def _release(self, free: Any) -> None:
        if self.handle:
            handle, self.handle = self.handle, c_void_p()
            free(handle)


class Cluster(_Handle):
    """A connection to a cluster (``rados_t``) as ``client.<client_id>``, set up from ``conf``.

    ``defaults`` are settings the conf file may override; ``timeout`` (whole
    seconds) bounds connecting and every monitor call.
    """

    def __init__(self, conf: str, client_id: str, timeout: int, defaults: dict[str, str] | None = None) -> None:
        lib = self._lib = libs()
        self.handle = c_void_p()
        _check(lib.rados_create(byref(self.handle), client_id.encode()), "rados_create")
        try:
            for option, value in (defaults or {}).items():
                _check(lib.rados_conf_set(self.handle, option.encode(), value.encode()), f"setting {option}")
            _check(lib.rados_conf_read_file(self.handle, conf.encode()), f"reading {conf}")
            for option in ("client_mount_timeout", "rados_mon_op_timeout"):
                _check(lib.rados_conf_set(self.handle, option.encode(), str(timeout).encode()), f"setting {option}")
            _check(lib.rados_connect(self.handle), "connecting")
        except BaseException:
            self.close()
            raise

    @property
    def fsid(self) -> str:
        return _string(self._lib.rados_cluster_fsid, self.handle)

    def conf_get(self, option: str) -> str:
        return _string(self._lib.rados_conf_get, self.handle, option.encode())

    def pools(self) -> list[str]:
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            need = _check(self._lib.rados_pool_list(self.handle, buf, size), "listing pools")
            if need <= size:
                return [name.decode() for name in buf.raw[:need].split(b"\0") if name]
            size = need

    def open_pool(self, name: str) -> "Pool":
        ioctx = c_void_p()
        _check(self._lib.rados_ioctx_create(self.handle, name.encode(), byref(ioctx)), f"opening pool {name!r}")
        return Pool(self._lib, ioctx)

    def close(self) -> None:
        self._release(self._lib.rados_shutdown)


class Pool(_Handle):
    """An open pool (``rados_ioctx_t``)."""

    def __init__(self, lib: Any, handle: c_void_p) -> None:
        self._lib, self.handle = lib, handle

    def create_image(self, name: str, size: int) -> None:
        """Create image ``name`` (the cluster's default format and features); EEXIST when it exists."""
        order = c_int(0)  # the default object size
        _check(self._lib.rbd_create(self.handle, name.encode(), size, byref(order)), f"creating image {name!r}")

    def open_image(self, name: str, *, readonly: bool) -> "Image":
        handle = c_void_p()
        opener = self._lib.rbd_open_read_only if readonly else self._lib.rbd_open
        _check(opener(self.handle, name.encode(), byref(handle), None), f"opening image {name!r}")
        return Image(self._lib, handle)

    def close(self) -> None:
        self._release(self._lib.rados_ioctx_destroy)


class Image(_Handle):
    """An open image (``rbd_image_t``) whose completions signal an eventfd; see the module doc.

    Its requests go through :attr:`io` (a :class:`Queue` of ``_rbd_native``): each submit
    takes an integer key and returns 0 or librbd's -errno (not submitted);
    ``io.reap()`` returns ``(key, return value)`` of the finished ones.
    """

    def __init__(self, lib: Any, handle: c_void_p) -> None:
        self._lib, self.handle = lib, handle
        self.eventfd = -1
        try:
            if Queue is None:
                raise OSError("the rbd backend's C extension dmuserd.backends._rbd_native is not built (it needs a C "
                              "compiler and Python's headers when dmuserd is installed: pip install -e .)")
            info = _ImageInfo()
            _check(lib.rbd_stat(handle, byref(info), ctypes.sizeof(info)), "reading the image's size")
            self.size: int = info.size
            self.object_size: int = info.obj_size
            self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            _check(lib.rbd_set_image_notification(handle, self.eventfd, _EVENT_TYPE_EVENTFD), "setting the eventfd")
            self.io = Queue(handle.value or 0, self.eventfd)  # never used once close() began
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the image (blocking: librbd finishes what it holds first), then its eventfd."""
        self._release(self._lib.rbd_close)
        if self.eventfd >= 0:
            os.close(self.eventfd)  # only now: librbd signals it until rbd_close returns
            self.eventfd = -1
