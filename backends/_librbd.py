"""librados and librbd, Ceph's C client libraries, through ctypes: the calls the ``rbd`` backend makes.

Why not Debian's ``python3-rbd`` binding for the I/O: its completion
callback runs Python on a librbd thread, so every finished request takes
the GIL from the event loop's thread (a hand-off, two context switches,
per request; on a busy machine the dominant cost). Here a completion is no
callback at all: librbd signals an eventfd (``rbd_set_image_notification``)
and the event loop collects the finished requests in batches
(``rbd_poll_io_events``); no Python ever runs on a librbd thread.

Every call returns or raises :class:`CephError` (an :class:`OSError` with
the errno librados/librbd gave and what was being done). The libraries are
``librados.so.2`` and ``librbd.so.1`` (Debian's ``librados2``, ``librbd1``).
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_ssize_t, c_uint64, c_void_p
from typing import Any

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
        "rbd_poll_io_events": (c_int, [c_void_p, _P, c_int]),
        "rbd_aio_create_completion": (c_int, [c_void_p, c_void_p, _P]),
        "rbd_aio_release": (None, [c_void_p]),
        "rbd_aio_get_arg": (c_void_p, [c_void_p]),
        "rbd_aio_get_return_value": (c_ssize_t, [c_void_p]),
        "rbd_aio_read": (c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_void_p]),
        "rbd_aio_write": (c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_void_p]),
        "rbd_aio_flush": (c_int, [c_void_p, c_void_p]),
        "rbd_aio_discard": (c_int, [c_void_p, c_uint64, c_uint64, c_void_p]),
        "rbd_aio_write_zeroes": (c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_int, c_int]),
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

    ``aio_*`` calls take a completion made by :meth:`completion` (its
    argument an integer key) and return librbd's submit result (< 0: not
    submitted). :meth:`reap` returns ``(key, return value)`` of finished ones.
    """

    BATCH = 64  # completions collected per rbd_poll_io_events call

    def __init__(self, lib: Any, handle: c_void_p) -> None:
        self._lib, self.handle = lib, handle
        self.eventfd = -1
        self._events = (c_void_p * self.BATCH)()
        try:
            info = _ImageInfo()
            _check(lib.rbd_stat(handle, byref(info), ctypes.sizeof(info)), "reading the image's size")
            self.size: int = info.size
            self.object_size: int = info.obj_size
            self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            _check(lib.rbd_set_image_notification(handle, self.eventfd, _EVENT_TYPE_EVENTFD), "setting the eventfd")
        except BaseException:
            self.close()
            raise

    # The submits: never called once close() began (the backend drops the image first).

    def aio_read(self, comp: c_void_p, offset: int, length: int, buf: Any) -> int:
        return int(self._lib.rbd_aio_read(self.handle, offset, length, buf, comp))

    def aio_write(self, comp: c_void_p, offset: int, length: int, buf: Any) -> int:
        return int(self._lib.rbd_aio_write(self.handle, offset, length, buf, comp))

    def aio_flush(self, comp: c_void_p) -> int:
        return int(self._lib.rbd_aio_flush(self.handle, comp))

    def aio_discard(self, comp: c_void_p, offset: int, length: int) -> int:
        return int(self._lib.rbd_aio_discard(self.handle, offset, length, comp))

    def aio_write_zeroes(self, comp: c_void_p, offset: int, length: int) -> int:
        return int(self._lib.rbd_aio_write_zeroes(self.handle, offset, length, comp, 0, 0))

    def completion(self, key: int) -> c_void_p:
        comp = c_void_p()
        _check(self._lib.rbd_aio_create_completion(key, None, byref(comp)), "rbd_aio_create_completion")
        return comp

    def release(self, comp: c_void_p) -> None:
        """Free a completion that was not submitted."""
        self._lib.rbd_aio_release(comp)

    def reap(self) -> list[tuple[int, int]]:
        """The finished requests, ``(key, return value)``, their completions released (reset the eventfd first)."""
        lib, events, done = self._lib, self._events, []
        while True:
            n = lib.rbd_poll_io_events(self.handle, events, self.BATCH)
            for comp in events[: max(n, 0)]:
                done.append((lib.rbd_aio_get_arg(comp), lib.rbd_aio_get_return_value(comp)))
                lib.rbd_aio_release(comp)
            if n < self.BATCH:
                return done

    def close(self) -> None:
        """Close the image (blocking: librbd finishes what it holds first), then its eventfd."""
        self._release(self._lib.rbd_close)
        if self.eventfd >= 0:
            os.close(self.eventfd)  # only now: librbd signals it until rbd_close returns
            self.eventfd = -1
