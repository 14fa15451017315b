"""``rbd``: an image on a Ceph cluster, through librbd.

``--backend rbd:pool=P,image=I[,conf=/etc/ceph/ceph.conf][,id=admin][,create=SIZE][,readonly=1][,timeout=30][,connect_timeout=15]``

* Every request is one of librbd's asynchronous calls (``aio_read``,
  ``aio_write``, ``aio_flush``, ``aio_discard``, ``aio_write_zeroes``).
  librbd runs the completion callback on its own thread; the callback only
  hands the result to trio (``TrioToken.run_sync_soon``), which wakes the
  waiting request: no thread per request, no polling.
* ``timeout`` (seconds, default 30): a request the cluster has not answered
  by then fails with EIO (:class:`RbdTimeout`) and the daemon goes on. The
  request itself stays queued in librbd, which reconnects by itself when the
  monitors and OSDs come back and then completes it (a write that timed out
  may still land then, as on any block device whose request timed out).
  Requests made after the cluster is back succeed again.
* A FUA write is a write followed by a flush; ``flush`` is ``aio_flush``
  (librbd's cache, where enabled, is written back to the OSDs).
* ``connect_timeout`` (seconds, default 15) bounds start-up: reaching the
  monitors, opening the pool and the image; a dead cluster fails start-up.
* ``create=SIZE`` creates the image with that size when it does not exist
  (an existing image is used as it is); ``readonly=1`` opens it read-only.
* ``conf`` is a ceph.conf (default ``/etc/ceph/ceph.conf``), ``id`` the
  client name without ``client.`` (default ``admin``); the keyring is found
  through the conf as by the ``rbd`` command.
* ``dmuserd status`` shows the cluster (fsid and monitors), pool, image,
  requests in flight, timeouts and each operation's latency.

The Python bindings are Debian's ``python3-rados`` and ``python3-rbd``
(``scripts/venv-ceph-bindings`` makes them importable from the project's
venv); ``scripts/ceph-dev start`` runs a local cluster to try it on.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import trio

from dmuserd.backends._api import Backend, BackendError, Op
from dmuserd.backends.options import Options

if TYPE_CHECKING:
    from typing_extensions import Buffer

DEFAULT_CONF = "/etc/ceph/ceph.conf"
DEFAULT_TIMEOUT = 30.0
CONNECT_TIMEOUT = 15  # seconds: reaching the monitors at start-up


class RbdTimeout(OSError):
    """The cluster did not answer a request in time (EIO to the client)."""

    def __init__(self, what: str, timeout: float, target: str) -> None:
        super().__init__(
            errno.EIO,
            f"rbd {target}: {what} not answered within {timeout:g}s; the cluster is unreachable or "
            f"an OSD is down (check `ceph -s`); the request stays queued in librbd and completes "
            f"when the cluster is back",
        )


def _bindings() -> tuple[ModuleType, ModuleType]:
    try:
        import rados
        import rbd
    except ImportError as exc:
        raise BackendError(
            f"backend 'rbd': the Ceph Python bindings do not import ({exc}); install python3-rados "
            f"and python3-rbd (scripts/setup-system) and link them into the venv with "
            f"scripts/venv-ceph-bindings .venv/bin/python"
        ) from None
    return rados, rbd


def _seconds(opts: Options, key: str, default: float) -> float:
    text = opts.str(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise BackendError(f"backend 'rbd': {key}={text} is not a positive number of seconds")
    return value


class _Latency:
    """Count, mean and maximum of one operation's latency."""

    __slots__ = ("count", "total", "max")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def describe(self) -> dict[str, float]:
        mean = self.total / self.count if self.count else 0.0
        return {"count": self.count, "mean_ms": round(mean * 1e3, 3), "max_ms": round(self.max * 1e3, 3)}


class RbdBackend(Backend):
    name = "rbd"

    def __init__(
        self,
        pool: str,
        image: str,
        *,
        conf: str = DEFAULT_CONF,
        client_id: str = "admin",
        create: int | None = None,
        readonly: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        rados, rbd = _bindings()
        self._rados_mod, self._rbd_mod = rados, rbd
        self.pool, self.image_name, self.conf, self.client_id = pool, image, conf, client_id
        self.readonly, self.timeout, self.connect_timeout = readonly, timeout, connect_timeout
        self.target = f"{pool}/{image}"
        if not os.path.exists(conf):
            raise BackendError(f"backend 'rbd': no Ceph configuration at {conf}; pass conf=PATH (scripts/ceph-dev start prints one)")
        # librados/librbd objects (the bindings have no type information)
        self._cluster: Any = None
        self._ioctx: Any = None
        self._image: Any = None
        try:
            size = self._open(create)
            if size % 512:
                raise BackendError(f"backend 'rbd': image {self.target} is {size} bytes, not a multiple of 512; resize it (rbd resize)")
            disabled: set[Op] = {Op.WRITE, Op.DISCARD, Op.WRITE_ZEROES} if readonly else set()
            super().__init__(size=size, block_size=512, disabled_ops=disabled)
        except BaseException:
            self._close_sync()
            raise
        self._latency = {op: _Latency() for op in ("read", "write", "flush", "discard", "write_zeroes")}
        self._in_flight = 0
        self._timeouts = 0
        self._late = 0  # timed-out requests librbd has not completed yet

    def _open(self, create: int | None) -> int:
        """Connect, open the pool and the image (created first with ``create`` bytes); returns its size."""
        rados, rbd = self._rados_mod, self._rbd_mod
        try:
            self._cluster = rados.Rados(conffile=self.conf, rados_id=self.client_id)
            # Bound every blocking set-up call: a dead cluster fails start-up instead of hanging it.
            # Ceph takes these in whole seconds ("2.5" and even "5.0" are refused).
            whole = str(max(1, round(self.connect_timeout)))
            self._cluster.conf_set("client_mount_timeout", whole)
            self._cluster.conf_set("rados_mon_op_timeout", whole)
            self._cluster.connect(timeout=int(whole))
        except rados.Error as exc:
            raise BackendError(
                f"backend 'rbd': cannot connect to the cluster of {self.conf} as client.{self.client_id} "
                f"within {self.connect_timeout:g}s ({exc}); is it running (ceph --conf {self.conf} -s)?"
            ) from None
        try:
            self._ioctx = self._cluster.open_ioctx(self.pool)
        except rados.ObjectNotFound:
            pools = ", ".join(self._cluster.list_pools()) or "none"
            raise BackendError(
                f"backend 'rbd': no pool {self.pool!r} in the cluster of {self.conf} (pools: {pools}); "
                f"create it: ceph osd pool create {self.pool} && rbd pool init {self.pool}"
            ) from None
        except rados.Error as exc:
            raise BackendError(f"backend 'rbd': cannot open pool {self.pool!r}: {exc}") from None
        if create is not None and not self.readonly:
            try:
                rbd.RBD().create(self._ioctx, self.image_name, create, old_format=False)
            except rbd.ImageExists:
                pass
            except rbd.Error as exc:
                raise BackendError(f"backend 'rbd': cannot create image {self.target} of {create} bytes: {exc}") from None
        try:
            self._image = rbd.Image(self._ioctx, self.image_name, read_only=self.readonly)
        except rbd.ImageNotFound:
            raise BackendError(
                f"backend 'rbd': no image {self.image_name!r} in pool {self.pool!r}; create it "
                f"(rbd create --size 1G {self.target}) or pass create=SIZE"
            ) from None
        except rbd.Error as exc:
            raise BackendError(f"backend 'rbd': cannot open image {self.target}: {exc}") from None
        self.fsid = self._cluster.get_fsid()
        self.mon_host = self._cluster.conf_get("mon_host")
        return int(self._image.size())

    @classmethod
    def from_options(cls, options: dict[str, str]) -> RbdBackend:
        opts = Options(cls.name, options)
        pool = opts.str("pool", required=True)
        image = opts.str("image", required=True)
        conf = opts.str("conf", DEFAULT_CONF)
        client_id = opts.str("id", "admin")
        create = opts.size("create")
        readonly = opts.bool("readonly")
        timeout = _seconds(opts, "timeout", DEFAULT_TIMEOUT)
        connect_timeout = _seconds(opts, "connect_timeout", CONNECT_TIMEOUT)
        opts.finish()
        if client_id.startswith("client."):
            client_id = client_id[len("client."):]
        return cls(pool, image, conf=conf, client_id=client_id, create=create, readonly=readonly, timeout=timeout,
                   connect_timeout=connect_timeout)

    # -- one asynchronous librbd call ------------------------------------------

    async def _aio(self, what: str, start: Callable[[Callable[..., None]], object]) -> Any:
        """Run ``start(callback)`` (an ``aio_*`` call) and wait for its completion.

        The callback runs on a librbd thread and only schedules the wake-up in
        trio. Returns the callback's extra argument (the data of a read).
        """
        if self._image is None:
            raise OSError(errno.EIO, f"rbd {self.target}: the image is closed")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[tuple[int, Any]] = []
        state = {"abandoned": False}

        def finish() -> None:
            if state["abandoned"]:
                self._late -= 1
            done.set()

        def callback(completion: Any, *data: Any) -> None:
            result.append((completion.get_return_value(), data[0] if data else None))
            try:
                token.run_sync_soon(finish)
            except trio.RunFinishedError:
                pass

        began = time.monotonic()
        self._in_flight += 1
        try:
            start(callback)
            with trio.move_on_after(self.timeout) as scope:
                await done.wait()
        finally:
            self._in_flight -= 1
        if scope.cancelled_caught and not done.is_set():
            state["abandoned"] = True
            self._late += 1
            self._timeouts += 1
            raise RbdTimeout(what, self.timeout, self.target)
        self._latency[what].add(time.monotonic() - began)
        ret, data = result[0]
        if ret < 0:
            raise OSError(-ret, f"rbd {self.target}: {what}: {os.strerror(-ret)}")
        return data

    # -- block operations ----------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        data = await self._aio("read", lambda cb: self._image.aio_read(offset, length, cb))
        if data is None or len(data) != length:
            got = 0 if data is None else len(data)
            raise OSError(errno.EIO, f"rbd {self.target}: read of {length} bytes at {offset} returned {got}")
        return bytes(data)

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        payload = bytes(data)  # the binding wants bytes, and keeps them until librbd is done
        await self._aio("write", lambda cb: self._image.aio_write(payload, offset, cb))
        if fua:
            await self.flush()

    async def flush(self) -> None:
        await self._aio("flush", lambda cb: self._image.aio_flush(cb))

    async def discard(self, offset: int, length: int) -> None:
        await self._aio("discard", lambda cb: self._image.aio_discard(offset, length, cb))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        # librbd deallocates whole objects it zeroes unless told otherwise;
        # either way the range reads back as zeros.
        await self._aio("write_zeroes", lambda cb: self._image.aio_write_zeroes(offset, length, cb))

    async def close(self) -> None:
        image, self._image = self._image, None
        if image is None:
            return
        # close() waits for what librbd still holds; with the cluster gone it
        # may never return, so it runs in a thread we can abandon.
        with trio.move_on_after(self.timeout):
            await trio.to_thread.run_sync(self._shutdown, image, abandon_on_cancel=True)

    def _shutdown(self, image: Any) -> None:
        try:
            image.close()
        finally:
            self._close_sync()

    def _close_sync(self) -> None:
        for obj in (self._image, self._ioctx):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass
        self._image = self._ioctx = None
        if self._cluster is not None:
            cluster, self._cluster = self._cluster, None
            try:
                cluster.shutdown()
            except Exception:
                pass

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "cluster": {"fsid": getattr(self, "fsid", None), "mon_host": getattr(self, "mon_host", None), "conf": self.conf},
            "pool": self.pool,
            "image": self.image_name,
            "client": f"client.{self.client_id}",
            "readonly": self.readonly,
            "timeout_s": self.timeout,
            "librbd_in_flight": self._in_flight,
            "timeouts": self._timeouts,
            "timed_out_still_queued": self._late,
            "latency": {op: lat.describe() for op, lat in self._latency.items() if lat.count},
            "summary": self._summary(),
        }

    def _summary(self) -> str:
        """One line for ``dmuserd status``."""
        lat = ", ".join(
            f"{op} {lat.describe()['mean_ms']}/{lat.describe()['max_ms']} ms" for op, lat in self._latency.items() if lat.count
        )
        return (f"rbd {self.target} on cluster {getattr(self, 'fsid', '?')} ({getattr(self, 'mon_host', '?')}); "
                f"timeouts {self._timeouts}; latency mean/max: {lat or 'no requests yet'}")
