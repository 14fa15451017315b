"""nbdkit python plugin: the *kernel side* of dm-user, talking to dmuserd.

nbdkit runs this file in its own embedded interpreter (Debian's python3,
not dmuserd's virtualenv), so it imports only the standard library and
dmuserd's pure-Python ``protocol`` package, loaded by path from the tree
this file lives in (see :func:`_load_protocol`).

What it does: every NBD request becomes one dm-user message on a Unix
socket to the daemon (a *channel*), its header packed with the protocol's
own codec (``protocol.HEADER_STRUCT``). Each channel carries one request at
a time and belongs to one nbdkit worker thread while that request runs;
idle channels wait in a list, so there are as many channels as requests
ever ran at once (at most nbdkit's ``--threads`` per client connection).
With one request per channel the answer to read is always ours.

The data moves one of two ways:

* through shared memory (``shm=PATH``, the daemon's slotted channel
  socket; see :mod:`dmuserd.protocol._shm`): the daemon announces a pool
  (a memfd, passed with ``SCM_RIGHTS``) when a channel connects, the
  plugin maps it once per daemon, and each READ or WRITE takes a free slot
  of it: a WRITE's data is copied once from nbdkit's buffer into the slot,
  the daemon's backend answers a READ into the slot and the plugin copies
  it once into nbdkit's buffer. Only headers (and the slot word) cross the
  socket. A request longer than a slot, or one that finds every slot
  taken, travels on the socket as below, on the same channel;
* on the socket (the plain dm-user wire format: the fallback when there is
  no ``shm=``, the slotted socket is not there, or the pool cannot be
  mapped): READ: one ``recvmsg_into([header, buf])`` lands the answer
  header in the channel's header buffer and the data straight into
  nbdkit's buffer; WRITE: one ``sendmsg([header, buf])`` sends nbdkit's
  buffer as is.

(Pipelining several requests on one channel was measured against this: the
daemon's CPU per request stayed the same, and nbdkit would pay a thread
hand-off per request to deliver answers, so more channels it is.)

The GIL. nbdkit takes it to run each callback, and this plugin gives it up
once per request to wait for the answer; taking it back while nbdkit's
other threads want it too is what a request costs here beyond the python
plugin's (futex calls, a context switch). So the wait releases it once for
everything that needs no Python: the C helper ``daemon/_nbd_exchange.c``
copies a WRITE's data into its slot, sends the frame, receives the answer
header and copies a READ's data out of its slot in one call (:func:`_load_exchange`; the same steps in Python
where it is not built), and the daemon starts nbdkit with few threads
(``threads=``, default 8 in :mod:`dmuserd.daemon.nbd`), fewer contenders.

Mapping: pread → READ, pwrite → WRITE (FUA → FUA), flush → FLUSH, trim →
DISCARD, zero → WRITE_ZEROES (NOUNMAP unless may-trim), cache → emulated by
nbdkit as a read (a read-ahead into the daemon's backend). Answers: SUCCESS
→ done, ERROR → EIO, UNSUPPORTED → EOPNOTSUPP (for zero, nbdkit then falls
back to writing zeros, unless the client asked for a fast zero).

Daemon restarts: when no daemon answers (nothing listens on the channel
socket, or a channel breaks mid-request), the request waits for one, up to
the daemon timeout (``timeout=``, default dm-user's 4 s), reconnecting
every few milliseconds, and is then sent (again) to the daemon that
answers; when the timeout runs out it fails with EIO. A request in flight
when its daemon died is re-sent whole: READ, WRITE, WRITE_ZEROES, DISCARD
and FLUSH are idempotent at block level, and a client only counts a write
as done when its answer came back, so no acknowledged write is lost.

Ending by itself. nbdkit outlives its daemon on purpose, but not its
purpose: a watch thread (started in ``after_fork``, nbdkit's place for
threads) holds one idle connection to the daemon's channel socket, so the
daemon counts as *attached* until that connection ends, and counts the
clients (``open``/``close``). While no daemon is attached, nbdkit shuts
itself down (``nbdkit.shutdown()``) when

* its NBD socket is gone: the path no longer names the socket it was
  started on (unlinked, its directory deleted, another socket bound
  there). Only for a socket the daemon bound (``nbd_socket=``): a socket
  systemd passed is systemd's, which removes and re-creates its file itself
  (``RemoveOnStop=``) and keeps it listening for the next daemon, and whose
  path nbdkit may not even see (``PrivateTmp=``);
* ``nbdkit.json`` no longer names it: no daemon can find it any more, and
  the next one starts an nbdkit of its own;
* no client has been connected either for ``idle_exit`` seconds.

While a daemon is attached none of this applies: that daemon supervises
nbdkit and would start a new one. On the way out the watch removes, in this
order, the NBD socket (if it still is this nbdkit's), ``nbdkit.json`` and the
registry record: up to the second a starting daemon re-attaches (and should
nbdkit go under it, starts a new one as after any nbdkit exit); after it a
starting daemon starts a new nbdkit and finds the path free. ``cleanup``
(nbdkit exits for any other reason, e.g. SIGTERM from ``dmuserd nbd stop``)
removes them too, the socket only if no daemon is attached: an attached
daemon starts a new nbdkit on that same socket.

The registry record (``REGISTRY/PID.json``, for ``dmuserd nbd list`` and
``stop``) says which export this nbdkit serves, since when, whether a daemon
is attached, how many clients are connected and since when it is idle; the
watch rewrites it when that changes.

Parameters (``nbdkit python nbdkit_plugin.py KEY=VALUE ...``; the daemon
passes them, see :mod:`dmuserd.daemon.nbd`): ``channel`` (the daemon's
channel socket), ``shm`` (optional: its slotted channel socket), ``size``, ``block_size``, ``caps`` (comma-separated
backend operations: read, write, flush, discard, write_zeroes),
``timeout`` (seconds); for the watch (each optional): ``state`` (the
export's ``nbdkit.json``), ``nbd_socket`` (the NBD socket's path, when the
daemon bound it), ``idle_exit`` (seconds, default 0: never), ``registry``
(the directory of records) and ``export`` (the export's address, for the
record).
"""

from __future__ import annotations

import errno
import io
import json
import mmap
import os
import select
import socket
import stat
import sys
import threading
import time

import nbdkit  # provided by nbdkit's python plugin

API_VERSION = 2

#: Largest request in bytes (the NBD maximum block size we advertise).
MAX_REQUEST = 32 * 1024 * 1024
#: Preferred request size advertised to clients.
PREFERRED_BLOCK = 4096
#: How often a request waiting for a daemon tries to connect again.
RECONNECT_INTERVAL = 0.02
#: Socket buffer size asked for on each channel (large READ/WRITE payloads).
SOCKET_BUFFER = 4 * 1024 * 1024
#: How often the watch looks for a daemon, at the clients and at the NBD socket.
WATCH_INTERVAL = 1.0
#: How long a slotted channel waits for the daemon's pool announcement.
ANNOUNCE_TIMEOUT = 5.0


def _load_protocol():
    """Import ``dmuserd.protocol`` from the tree this file belongs to.

    The package root is the parent of ``daemon/``. If ``dmuserd`` is
    importable already (tests, an installed package) that copy is used only
    if it is this very tree; otherwise the package is loaded by path.
    """
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    existing = sys.modules.get("dmuserd")
    if existing is None or os.path.dirname(os.path.abspath(existing.__file__ or "")) != root:
        spec = importlib.util.spec_from_file_location(
            "dmuserd", os.path.join(root, "__init__.py"), submodule_search_locations=[root]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["dmuserd"] = module
        spec.loader.exec_module(module)
    import dmuserd.protocol as protocol

    return protocol


protocol = _load_protocol()
HEADER_SIZE = protocol.HEADER_SIZE
SECTOR_SIZE = protocol.SECTOR_SIZE
RequestType = protocol.RequestType
ResponseType = protocol.ResponseType
Flag = protocol.Flag
_HEADER = protocol.HEADER_STRUCT  # packed here without a Header object per request
_SLOT = protocol.SLOT_STRUCT
_NO_SLOT = protocol.NO_SLOT
#: Bytes before a payload on a slotted channel: the header and the slot word.
_SLOTTED_FRAME = HEADER_SIZE + _SLOT.size

_READ = int(RequestType.READ)
_WRITE = int(RequestType.WRITE)
_FLUSH = int(RequestType.FLUSH)
_DISCARD = int(RequestType.DISCARD)
_WRITE_ZEROES = int(RequestType.WRITE_ZEROES)
_FUA = int(Flag.FUA)
_NOUNMAP = int(Flag.NOUNMAP)
_SUCCESS = int(ResponseType.SUCCESS)
_UNSUPPORTED = int(ResponseType.UNSUPPORTED)


class _Config:
    channel = ""
    shm = ""  # the slotted channel socket; "" (or a pool that cannot be mapped): plain channels only
    size = -1
    block_size = 512
    caps: frozenset = frozenset()
    timeout = protocol.DEFAULT_DAEMON_TIMEOUT_MS / 1000
    state = ""
    nbd_socket = ""
    idle_exit = 0.0
    registry = ""
    export = ""


cfg = _Config()


class _Fail(Exception):
    """A request failed; ``errno`` is what the client sees."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class _Broken(Exception):
    """The channel broke (daemon gone): reconnect and re-send."""


# -- nbdkit callbacks: configuration --------------------------------------------


def config(key, value):
    if key in ("channel", "shm"):
        setattr(cfg, key, value)
    elif key == "size":
        cfg.size = int(value)
    elif key == "block_size":
        cfg.block_size = int(value)
    elif key == "caps":
        cfg.caps = frozenset(c for c in value.split(",") if c)
    elif key == "timeout":
        cfg.timeout = float(value)
    elif key == "idle_exit":
        cfg.idle_exit = float(value)
    elif key in ("state", "nbd_socket", "registry", "export"):
        setattr(cfg, key, value)
    else:
        raise ValueError(f"dmuserd plugin: unknown parameter {key}={value!r} (known: channel, shm, size, "
                         "block_size, caps, timeout, state, nbd_socket, idle_exit, registry, export)")


def config_complete():
    if not cfg.channel or cfg.size < 0:
        raise ValueError("dmuserd plugin: channel=PATH and size=BYTES are required "
                         "(dmuserd serve --export nbd:... passes them)")
    if cfg.block_size < SECTOR_SIZE or cfg.block_size & (cfg.block_size - 1):
        raise ValueError(f"dmuserd plugin: block_size={cfg.block_size} is not a power of two >= 512")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):  # noqa: A001 - nbdkit's callback name
    with _watch.lock:
        _watch.clients += 1
    return 1  # every connection shares the channel pool


def close(h):
    with _watch.lock:
        _watch.clients -= 1


def get_size(h):
    return cfg.size


def block_size(h):
    return (cfg.block_size, max(PREFERRED_BLOCK, cfg.block_size), MAX_REQUEST)


def is_rotational(h):
    return False


def can_write(h):
    return "write" in cfg.caps


def can_flush(h):
    return "flush" in cfg.caps


def can_trim(h):
    return "discard" in cfg.caps


def can_zero(h):
    return "write_zeroes" in cfg.caps


def can_fast_zero(h):
    # Honest: a backend with write_zeroes zeroes without writing data; without
    # it nbdkit would emulate with pwrite, which is not fast, so say no.
    return "write_zeroes" in cfg.caps


def can_fua(h):
    return nbdkit.FUA_NATIVE if "flush" in cfg.caps else nbdkit.FUA_NONE


def can_multi_conn(h):
    # One backend behind every channel, and the daemon's FLUSH covers every
    # write completed before it, whichever connection sent it.
    return True


def can_cache(h):
    return nbdkit.CACHE_EMULATE  # nbdkit reads the range through pread: a read-ahead


# -- the channels -------------------------------------------------------------------

# send(2) through ctypes.PyDLL: the call keeps the GIL. Sending a 40-byte
# header never blocks on an idle channel (MSG_DONTWAIT makes sure), and
# socket.sendmsg would drop and retake the GIL around it: with 32 nbdkit
# threads contending, each retake is a futex wait and a context switch, and
# this way a READ takes the GIL twice (the call, the answer) instead of three
# times. Where ctypes or send() are unavailable, socket.sendmsg does it.
try:
    import ctypes

    _libc = ctypes.PyDLL(None, use_errno=True)
    _c_send = _libc.send
    _c_send.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _c_send.restype = ctypes.c_ssize_t
except (ImportError, OSError, AttributeError):  # pragma: no cover - not glibc
    ctypes = _c_send = None
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
#: READ data from a slot from this size up is copied by ctypes.memmove, which releases the GIL
#: (a slice assignment holds it: with nbdkit's threads reading at once, their copies would take turns).
_BIG_COPY = 64 * 1024
_memmove = None if ctypes is None else ctypes.memmove
_MSG_WAITALL = socket.MSG_WAITALL
_pack_into = _HEADER.pack_into
_unpack_from = _HEADER.unpack_from
_pack_slot_into = _SLOT.pack_into


def _load_exchange():
    """``exchange`` of the C helper ``daemon/_nbd_exchange`` built for this Python, or None.

    One call copies a WRITE's data into its slot, sends a channel's request
    frame, waits for the answer and copies a READ's data out of its slot
    with the GIL released once
    (see its source for why that matters here). Loaded by path: this file
    does not import the daemon's package. Without it (not built, another
    Python), :func:`_exchange` does the same steps in Python.
    """
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_nbd_exchange" + suffix)
        if os.path.exists(path):
            try:
                loader = importlib.machinery.ExtensionFileLoader("_nbd_exchange", path)
                module = importlib.util.module_from_spec(importlib.util.spec_from_loader("_nbd_exchange", loader))
                loader.exec_module(module)
            except ImportError as exc:
                _say(f"cannot load {path} ({exc}): requests on slotted channels run in Python")
                return None
            return module.exchange
    return None


class _Pool:
    """One daemon's pool, mapped: its slots' views and which are free.

    A daemon announces the same pool on every slotted channel; ``key`` (the
    memfd's device and inode) tells a new pool (a new daemon) from the one
    mapped already. A pool is unmapped when the last channel using it goes.
    """

    __slots__ = ("addr", "base", "free", "give", "key", "map", "slot_size", "take", "views")

    def __init__(self, fd, st, layout) -> None:
        if st.st_size < layout.size:
            raise OSError(errno.EINVAL, f"the pool's memfd holds {st.st_size} bytes, its layout {layout.size}")
        self.key = (st.st_dev, st.st_ino)
        self.map = mmap.mmap(fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        view = memoryview(self.map)
        size = self.slot_size = layout.slot_size
        self.views = [view[i * size:(i + 1) * size] for i in range(layout.slots)]
        # Each slot's address, for the large copies that release the GIL (_copy_out).
        self.base = None if ctypes is None else ctypes.c_char.from_buffer(self.map)
        self.addr = [0 if self.base is None else ctypes.addressof(self.base) + i * size for i in range(layout.slots)]
        # list.pop/append are atomic under the GIL; last freed, first taken (its pages are warm).
        self.free = list(range(layout.slots - 1, -1, -1))
        self.take = self.free.pop
        self.give = self.free.append


_pools = {}  # key -> the latest daemon's pool (earlier ones live on in their channels until they close)
_pools_lock = threading.Lock()


def _pool_for(fd, layout):
    """The mapped pool of memfd ``fd`` (closed here): the one mapped already, or a new mapping."""
    try:
        st = os.fstat(fd)
        with _pools_lock:
            pool = _pools.get((st.st_dev, st.st_ino))
            if pool is None:
                pool = _Pool(fd, st, layout)
                _pools.clear()
                _pools[pool.key] = pool
            return pool
    finally:
        os.close(fd)


class _Channel:
    """One connected channel and its frame buffer (reused by every request).

    ``header`` is a ctypes array so that :func:`_send_header` can pass its
    address to send(2): the request header, and on a slotted channel
    (``pool`` set) the slot word after it. ``fview`` is the frame a request
    starts with, ``hview`` the answer header's place.
    """

    __slots__ = ("fd", "frame", "fview", "haddr", "header", "hview", "pool", "recv_into", "recvmsg_into", "sock")

    def __init__(self, sock, pool=None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pool = pool
        self.frame = HEADER_SIZE if pool is None else _SLOTTED_FRAME
        if ctypes is not None:
            self.header = (ctypes.c_char * _SLOTTED_FRAME)()
            self.haddr = ctypes.addressof(self.header)
        else:  # pragma: no cover
            self.header, self.haddr = bytearray(_SLOTTED_FRAME), None
        view = memoryview(self.header).cast("B")
        self.fview = view[:self.frame]
        self.hview = view[:HEADER_SIZE]
        self.recvmsg_into = sock.recvmsg_into
        self.recv_into = sock.recv_into


# Idle connected channels. list.append/pop are atomic under the GIL.
_pool: list = []
_pop = _pool.pop
_push = _pool.append
_next_seq = iter(range(1 << 63)).__next__  # next() on a range iterator is atomic under the GIL


def _socket(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # Big enough that a 32 MiB WRITE goes out in a few large pieces.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def _connect(plain=False):
    """A new channel to the daemon: slotted if ``shm=`` names a daemon that announces a pool, else plain.

    Raises OSError when no daemon listens. A pool that cannot be used (an
    announcement this plugin does not know, a mapping that fails) turns
    the shared-memory path off for good, with a line in nbdkit's log.
    """
    if cfg.shm and not plain:
        try:
            sock = _socket(cfg.shm)
        except OSError:
            pass  # no daemon, or one without slotted channels: the plain socket says which
        else:
            try:
                return _Channel(sock, _receive_pool(sock))
            except protocol.ProtocolError as exc:
                sock.close()
                _say(f"shared-memory data plane off: {exc}")
                cfg.shm = ""
            except OSError as exc:
                sock.close()
                if exc.errno in (errno.ENOMEM, errno.EINVAL, errno.EACCES, errno.EPERM, errno.ENODEV):
                    _say(f"shared-memory data plane off: cannot map the pool ({exc})")
                    cfg.shm = ""
                # Else no pool this time (the daemon could not make one, or is going): this
                # channel is a plain one, the next one tries the pool again.
    return _Channel(_socket(cfg.channel))


def _receive_pool(sock):
    """Read the daemon's pool announcement and its memfd; the mapped pool."""
    size = protocol.ANNOUNCEMENT_SIZE
    sock.settimeout(ANNOUNCE_TIMEOUT)
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, size, 1, socket.MSG_WAITALL | socket.MSG_CMSG_CLOEXEC)
    except TimeoutError:
        raise OSError(errno.ETIMEDOUT, "the daemon did not announce its pool") from None
    finally:
        sock.settimeout(None)
    try:
        if len(data) < size:
            raise OSError(errno.ECONNRESET, "the daemon closed the channel in its pool announcement")
        layout = protocol.PoolLayout.decode(data)
        if len(fds) != 1:
            raise protocol.ProtocolError("pool", len(fds), "the announcement came without the pool's descriptor")
        fd = fds.pop()
    finally:
        for extra in fds:
            os.close(extra)
    return _pool_for(fd, layout)


def _channel(deadline):
    """An idle channel, or a new one; waits for a daemon until ``deadline``."""
    try:
        return _pop(), deadline
    except IndexError:
        pass
    while True:
        try:
            return _connect(), deadline
        except OSError as exc:
            now = time.monotonic()
            if deadline is None:
                deadline = now + cfg.timeout
                nbdkit.debug(f"dmuserd: no daemon on {cfg.channel} ({exc.strerror}); waiting up to {cfg.timeout} s")
            if now >= deadline:
                raise _Fail(errno.EIO, f"no dmuserd daemon answered on {cfg.channel} within {cfg.timeout} s") from None
            time.sleep(RECONNECT_INTERVAL)


def _send_header(chan):
    """Send the request frame in ``chan.header``, keeping the GIL when the socket takes it at once."""
    sent = 0
    frame = chan.frame
    if _c_send is not None:
        sent = _c_send(chan.fd, chan.haddr, frame, _SEND_FLAGS)
        if sent == frame:
            return
        if sent < 0:
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                raise OSError(err, os.strerror(err))
            sent = 0
    chan.sock.sendall(chan.fview[sent:])


def _send_rest(sock, buffers, sent):
    """Continue a ``sendmsg`` of ``buffers`` that sent only ``sent`` bytes."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if views:
            views[0] = views[0][sent:]
            sent = sock.sendmsg(views)


def _receive(chan, data):
    """Receive one answer: its header into ``chan.hview``, a READ's data on the socket into ``data``.

    The first ``recvmsg`` usually brings the whole answer (the daemon sends
    header and data in one go); what is missing of a large READ is then
    received in one more call with ``MSG_WAITALL``, straight into ``data``.
    """
    hview = chan.hview
    got = chan.recv_into(hview) if data is None else chan.recvmsg_into([hview, data])[0]
    if got == 0:
        raise _Broken("the daemon closed the channel")
    if got < HEADER_SIZE:
        rest = chan.recv_into(hview[got:], 0, _MSG_WAITALL)
        if rest != HEADER_SIZE - got:
            raise _Broken("the daemon closed the channel in an answer header")
        got = HEADER_SIZE
    answer = _unpack_from(hview)
    if data is None or answer[1] != _SUCCESS:
        if got > HEADER_SIZE:
            raise _Fail(errno.EIO, "the daemon sent data after an error answer")
        return answer
    got -= HEADER_SIZE
    length = len(data)
    if got < length:
        view = memoryview(data).cast("B")  # slices of it are views, never copies
        while got < length:
            n = chan.recv_into(view[got:], 0, _MSG_WAITALL)
            if not n:
                raise _Broken("the daemon closed the channel in a READ answer")
            got += n
    return answer


def _exchange(chan, seq, kind, flags, sector, length, payload, into):
    """One request on ``chan`` and its answer; a READ's data lands in ``into`` either way."""
    header = chan.header
    _pack_into(header, 0, seq, kind, flags, sector, length)
    pool = chan.pool
    if pool is not None:
        slot = _NO_SLOT
        if (payload is not None or into is not None) and length <= pool.slot_size:
            try:
                slot = pool.take()
            except IndexError:
                pass  # every slot is taken: this one goes on the socket
        _pack_slot_into(header, HEADER_SIZE, slot)
        if slot != _NO_SLOT:
            view = pool.views[slot]
            try:
                if _c_exchange is not None:
                    if payload is not None:
                        return _c_exchange(chan.fd, chan.fview, chan.hview, payload, view[:length], True)
                    return _c_exchange(chan.fd, chan.fview, chan.hview, view[:length], into)
                if payload is not None:
                    view[:length] = payload
                _send_header(chan)
                answer = _receive(chan, None)
                if into is not None and answer[1] == _SUCCESS:
                    if length >= _BIG_COPY and _memmove is not None:
                        # Without the GIL: other threads' requests go on meanwhile (as during a recv).
                        _memmove((ctypes.c_char * length).from_buffer(into), pool.addr[slot], length)
                    else:
                        into[:] = view[:length]
                return answer
            finally:
                pool.give(slot)
    if payload is None:
        if into is None and _c_exchange is not None:  # no data on the socket either way
            return _c_exchange(chan.fd, chan.fview, chan.hview, None, None)
        _send_header(chan)
    else:
        buffers = [chan.fview, payload]
        sent = chan.sock.sendmsg(buffers)
        if sent != chan.frame + length:
            _send_rest(chan.sock, buffers, sent)
    return _receive(chan, into)


def _request(kind, offset, length, flags, payload=None, into=None):
    """Send one dm-user request and wait for its answer; re-send after a daemon restart."""
    if offset % SECTOR_SIZE or length % SECTOR_SIZE:
        raise _Fail(errno.EINVAL, f"offset {offset} / length {length} not aligned to {SECTOR_SIZE} bytes")
    sector = offset // SECTOR_SIZE
    deadline = None
    while True:
        chan, deadline = _channel(deadline)
        seq = _next_seq()
        try:
            answer = _exchange(chan, seq, kind, flags, sector, length, payload, into)
        except (OSError, _Broken) as exc:
            chan.sock.close()
            if deadline is None:
                deadline = time.monotonic() + cfg.timeout
            nbdkit.debug(f"dmuserd: channel broke ({exc}); re-sending seq {seq} to the next daemon")
            continue
        except _Fail:
            chan.sock.close()
            raise
        if answer[0] != seq:
            chan.sock.close()
            raise _Fail(errno.EIO, f"the daemon answered seq {answer[0]}, expected {seq}")
        _push(chan)
        if answer[1] == _SUCCESS:
            return
        if answer[1] == _UNSUPPORTED:
            raise _Fail(errno.EOPNOTSUPP, f"the backend does not support request type {kind}")
        raise _Fail(errno.EIO, f"the daemon answered ERROR to request type {kind} at {offset}+{length}")


def _run(kind, offset, length, flags, payload=None, into=None):
    try:
        _request(kind, offset, length, flags, payload, into)
    except _Fail as exc:
        nbdkit.set_error(exc.errno)
        raise RuntimeError(str(exc)) from None


# -- nbdkit callbacks: data ------------------------------------------------------------


def pread(h, buf, offset, flags):
    _run(_READ, offset, len(buf), 0, into=buf)


def pwrite(h, buf, offset, flags):
    _run(_WRITE, offset, len(buf), _FUA if flags & nbdkit.FLAG_FUA else 0, payload=buf)


def flush(h, flags):
    _run(_FLUSH, 0, 0, 0)


def trim(h, count, offset, flags):
    _run(_DISCARD, offset, count, _FUA if flags & nbdkit.FLAG_FUA else 0)


def zero(h, count, offset, flags):
    if flags & nbdkit.FLAG_FAST_ZERO and "write_zeroes" not in cfg.caps:
        nbdkit.set_error(errno.ENOTSUP)
        raise RuntimeError("fast zero: the backend cannot zero without writing")
    dm_flags = 0 if flags & nbdkit.FLAG_MAY_TRIM else _NOUNMAP
    if flags & nbdkit.FLAG_FUA:
        dm_flags |= _FUA
    _run(_WRITE_ZEROES, offset, count, dm_flags)


# -- the watch: a kept nbdkit ends once it has outlived its purpose -----------------------


class _Watch:
    """What the watch thread and the callbacks share (see the module docstring)."""

    lock = threading.Lock()
    clients = 0  # NBD connections open now (changed under ``lock``)
    daemon = None  # our idle connection to the attached daemon, if one is
    socket_id = None  # (st_dev, st_ino) of ``cfg.nbd_socket`` when the watch started
    started = 0.0  # wall clock
    starttime = 0  # clock ticks since boot (/proc/self/stat), which tells this process from a later one of the same pid
    thread = None
    wake_r = wake_w = -1  # ``cleanup`` writes to wake_w to end the thread's wait


_watch = _Watch()


def after_fork():
    """Start the watch thread, when it has something to do (the daemon always gives it work)."""
    if not (cfg.state or cfg.nbd_socket or cfg.idle_exit or cfg.registry):
        return
    _watch.started = time.time()
    with io.open("/proc/self/stat") as f:
        _watch.starttime = int(f.read().rpartition(")")[2].split()[19])
    _watch.socket_id = _socket_id()
    _watch.wake_r, _watch.wake_w = os.pipe2(os.O_CLOEXEC)
    _watch.thread = threading.Thread(target=_watch_loop, name="dmuserd-watch", daemon=True)
    _watch.thread.start()


def cleanup():
    """nbdkit exits (SIGTERM, or the watch's own shutdown): end the watch, forget this nbdkit."""
    if _watch.thread is None:
        return
    if _watch.thread is not threading.current_thread():
        os.write(_watch.wake_w, b"x")
        _watch.thread.join(2 * WATCH_INTERVAL)
    _forget(unlink_socket=_watch.daemon is None)


def _watch_loop():
    idle_since = None  # monotonic time since when no daemon is attached and no client connected
    recorded = None
    while True:
        if _watch.daemon is None:
            _watch.daemon = _attach()
        now = time.monotonic()
        clients = _watch.clients
        if _watch.daemon is not None or clients:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        reason = None if _watch.daemon is not None else _purpose_gone(idle_since, now)
        if reason is not None:
            _say(f"exiting: {reason}")
            _forget(unlink_socket=True)
            nbdkit.shutdown()
            return
        state = (_watch.daemon is not None, clients, idle_since)
        if state != recorded:
            _write_record(*state, now)
            recorded = state
        if not _wait():
            return


def _attach():
    """A connection to the daemon listening on the channel socket (kept idle), or None if none listens."""
    try:
        return _connect(plain=True).sock  # the plain socket: any daemon, of any version, has it
    except OSError:
        return None


def _wait():
    """Wait one interval, or until the attached daemon leaves; False when ``cleanup`` ends the watch."""
    poller = select.poll()
    poller.register(_watch.wake_r, select.POLLIN)
    if _watch.daemon is not None:
        poller.register(_watch.daemon, select.POLLIN)  # the daemon never speaks first: EOF, it left
    for fd, _ in poller.poll(WATCH_INTERVAL * 1000):
        if fd == _watch.wake_r:
            return False
        _watch.daemon.close()
        _watch.daemon = None
    return True


def _purpose_gone(idle_since, now):
    """Why this nbdkit, with no daemon attached, should end now (see the module docstring), or None."""
    if cfg.state and not _names_us(cfg.state):
        return f"{cfg.state} does not name this nbdkit (pid {os.getpid()}): no daemon can re-attach to it"
    if cfg.nbd_socket and _watch.socket_id is not None and _socket_id() != _watch.socket_id:
        return f"its NBD socket {cfg.nbd_socket} is gone (removed, or replaced)"
    if cfg.idle_exit and idle_since is not None and now - idle_since >= cfg.idle_exit:
        return f"no daemon attached and no client connected for {cfg.idle_exit:g} s (idle-exit)"
    return None


def _socket_id():
    """(st_dev, st_ino) of the socket at ``cfg.nbd_socket``, or None if no socket is there."""
    try:
        st = os.stat(cfg.nbd_socket)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def _names_us(path):
    """Whether the JSON file at ``path`` (``nbdkit.json``) names this process."""
    try:
        with io.open(path) as f:
            return json.load(f).get("pid") == os.getpid()
    except (OSError, ValueError, AttributeError):
        return False


def _record_path():
    return os.path.join(cfg.registry, f"{os.getpid()}.json")


def _write_record(attached, clients, idle_since, now):
    """(Re)write this nbdkit's registry record, atomically (``dmuserd nbd list`` reads it)."""
    if not cfg.registry:
        return
    record = {
        "pid": os.getpid(), "starttime": _watch.starttime, "export": cfg.export, "started": _watch.started,
        "state_dir": os.path.dirname(cfg.channel), "socket": cfg.nbd_socket or None, "idle_exit": cfg.idle_exit,
        "daemon_attached": attached, "clients": clients,
        "idle_since": None if idle_since is None else time.time() - (now - idle_since),
    }
    path = _record_path()
    try:
        os.makedirs(cfg.registry, mode=0o700, exist_ok=True)
        with io.open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
    except OSError as exc:
        _say(f"cannot write the registry record {path} ({exc}); `dmuserd nbd list` will not show this nbdkit")


def _forget(unlink_socket):
    """Remove what names this nbdkit: its NBD socket (if asked and still ours), nbdkit.json, the record.

    The order matters, see the module docstring.
    """
    paths = []
    if unlink_socket and cfg.nbd_socket and _watch.socket_id is not None and _socket_id() == _watch.socket_id:
        paths.append(cfg.nbd_socket)
    if cfg.state and _names_us(cfg.state):
        paths.append(cfg.state)
    if cfg.registry:
        paths.append(_record_path())
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            _say(f"cannot remove {path}: {exc}")


def _say(message):
    """A line in nbdkit's stderr: the export's ``nbdkit.log``."""
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(f"{when} dmuserd plugin (pid {os.getpid()}): {message}", file=sys.stderr, flush=True)


#: The C helper's exchange, or None (loaded last: a failure is logged with :func:`_say`).
_c_exchange = _load_exchange()
