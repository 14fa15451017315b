"""The NBD export: nbdkit with dmuserd's python plugin, kept across daemon restarts.

(This is ``server=nbdkit``, the default. ``--export nbd:WHERE,server=dmuserd``
builds :class:`~dmuserd.daemon.nbd_server.NbdServerExport` instead: the
daemon speaks NBD itself, no nbdkit; faster, but a daemon restart drops its
clients. Both bind WHERE with :func:`bind_nbd_socket`.)

``dmuserd serve --export nbd:SOCKET`` (or ``nbd:tcp:HOST:PORT``) runs::

    NBD client ──► nbdkit + daemon/nbdkit_plugin.py ══ dm-user channels ══► this daemon

nbdkit is the *kernel side*: its plugin turns each NBD request into a dm-user
message on a private Unix socket (the *channel socket*); the daemon serves
every accepted channel with :func:`~dmuserd.daemon.channels.serve_channel`,
as it would serve ``/dev/dm-user/NAME``.

Files (the *state directory*, 0700, owned by the daemon's user):

* ``SOCKET``'s directory holds ``.SOCKETNAME.dmuserd/`` for a Unix export;
  a TCP export uses ``/run/dmuserd/nbd-tcp-HOST-PORT/`` (root) or the same
  under ``$XDG_RUNTIME_DIR``;
* ``ch.sock`` the channel socket (0600); every channel's peer must be the
  daemon's own uid or root (``SO_PEERCRED``), others are refused and logged;
* ``shm.sock`` the slotted channel socket (0600, same peers): a channel
  accepted there is first sent the export's shared pool
  (:mod:`~dmuserd.daemon.nbd_shm`), then speaks the slotted framing
  (:mod:`dmuserd.protocol._shm`): READ and WRITE data moves through the
  pool, the socket carries the headers. The daemon always listens on both;
  the plugin uses ``shm.sock`` when it was started with ``data=shm``
  (``ch.sock`` if that fails), and ``ch.sock`` for its watch;
* ``nbdkit.json`` which nbdkit serves this export (pid, start time, the
  parameters it was started with), ``nbdkit.log`` its stderr.

Each nbdkit also keeps a record of itself in the *registry*,
``/run/dmuserd/nbd/PID.json`` (:func:`registry_dir`; ``$XDG_RUNTIME_DIR/dmuserd/nbd``
for other users, ``$DMUSERD_NBD_REGISTRY`` if set), through which
``dmuserd nbd list`` and ``dmuserd nbd stop`` (:mod:`~dmuserd.daemon.nbd_commands`)
find the state directories, wherever their sockets are. Records of exited
processes are ignored and removed.

The NBD socket itself is bound by the daemon (or taken over from systemd,
:func:`~dmuserd.daemon.activation.inherited_socket`) and handed to nbdkit by
socket activation (``LISTEN_FDS``), so it accepts clients before nbdkit even
runs and outlives any one nbdkit process.

Restarts. nbdkit runs in its own session and does not die with the daemon.
While no daemon is attached, the plugin holds each request up to the daemon
timeout (``timeout=SECONDS``, default 4, dm-user's default) and re-sends the
requests that were in flight when the channel broke (see the plugin's
docstring). A daemon started with the same ``--export`` finds the live
nbdkit through ``nbdkit.json`` and re-attaches: it listens on the channel
socket again and supervises that nbdkit instead of starting one.

Stop. A graceful stop (SIGTERM/SIGINT, so also ``systemctl restart``) keeps
nbdkit running by default (``on-stop=keep``): clients stay connected and the
next daemon serves them; requests made in between wait up to the timeout.
``on-stop=stop`` makes a stop also stop nbdkit (clients are disconnected)
and remove the NBD socket. Under systemd, nbdkit is started in its own scope
(``systemd-run --scope``) so that stopping the unit's cgroup does not take it
along.

A kept nbdkit ends by itself once it has outlived its purpose (the plugin's
watch thread; details in its docstring). While no daemon is attached to its
channel socket, it exits

* when its NBD socket's path is gone (unlinked, its directory deleted) -- only
  for a socket the daemon bound: systemd's socket (``systemd_socket``) is
  left to systemd, which removes and re-creates the file itself and keeps
  the socket listening for the next daemon;
* when ``nbdkit.json`` no longer names it (no daemon could re-attach);
* after ``idle-exit`` seconds (default :data:`DEFAULT_IDLE_EXIT`, 10 minutes)
  without a daemon and without a client: a restart takes seconds, a daemon
  stopped for good leaves nothing behind for long.

It then removes its socket (unless systemd's), ``nbdkit.json`` and its
record, so the next daemon starts a new nbdkit. A daemon that re-attached at that very moment
sees nbdkit exit and starts a new one, as after any nbdkit exit.
``dmuserd nbd stop SOCKET|--all`` ends kept ones at once (not one a daemon is
attached to: that daemon would start another).

Why not :class:`~dmuserd.protocol.KernelTarget` in the plugin: the model
reproduces what the kernel does when its daemon goes away (in-flight
messages fail with EIO, new ones fail at once once the daemon terminated);
issue #4 asks for the opposite here: wait for the next daemon and re-send.
The plugin shares the protocol's constants and header layout, and its
timeout default is the model's (``DEFAULT_DAEMON_TIMEOUT_MS``).

Options (``nbd:SOCKET,key=value``): ``timeout`` (seconds), ``threads``
(nbdkit worker threads per client connection, default 8: see :data:`DEFAULT_THREADS`), ``on-stop``
(``keep`` or ``stop``), ``idle-exit`` (seconds a kept nbdkit waits for a
daemon, default 600; 0: never), ``data`` (``shm``, the default: data through
the shared pool; ``socket``: every byte on the channel sockets). Like the
others, ``data`` is the running nbdkit's: a daemon re-attaching keeps the
mode that nbdkit was started with.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import trio

from dmuserd.backends.options import Options
from dmuserd.daemon.activation import bind_private_unix, inherited_socket
from dmuserd.daemon.channels import RECEIVE_SIZE, serve_channel
from dmuserd.daemon.config import ConfigError, default_control_socket
from dmuserd.daemon.export import Export

if TYPE_CHECKING:
    from dmuserd.daemon.runtime import Target
from dmuserd.daemon.guard import Peer
from dmuserd.daemon.nbd_shm import SharedPool
from dmuserd.protocol import DEFAULT_DAEMON_TIMEOUT_MS

log = structlog.get_logger("dmuserd.nbd")

PLUGIN = Path(__file__).resolve().parent / "nbdkit_plugin.py"
CHANNEL_NAME = "ch.sock"
#: The slotted channel socket: channels whose data moves through a shared pool (:mod:`~dmuserd.daemon.nbd_shm`).
SHM_CHANNEL_NAME = "shm.sock"
STATE_NAME = "nbdkit.json"
LOG_NAME = "nbdkit.log"
PID_NAME = "nbdkit.pid"
#: nbdkit worker threads per client connection (``threads=``). Each runs one
#: request in the plugin at a time, and every one of them contends for the
#: GIL of nbdkit's embedded Python when its answer comes back. Measured
#: (issue #20, 4 KiB randread QD32, memory backend): 4 to 12 threads give
#: the same CPU per request, 16 and 32 cost nbdkit 25-50 % more per request
#: (and the daemon some too) for no more IOPS; 8 keeps requests in flight
#: for backends that block (a file's cache misses, rbd) at that low cost.
DEFAULT_THREADS = 8
#: How long nbdkit may take to come up before the export fails.
START_TIMEOUT = 30.0
#: How long a stopping nbdkit gets after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0
#: Restarts of a crashing nbdkit allowed in a row before the export gives up.
MAX_RESTARTS = 5
#: How long a kept nbdkit waits for a daemon (with no client connected) before it
#: exits (``idle-exit=``). A restart, even by hand, takes seconds; an ad-hoc
#: ``serve`` stopped with Ctrl-C should not leave an nbdkit for more than minutes.
DEFAULT_IDLE_EXIT = 600.0
#: Overrides where nbdkit processes register themselves (:func:`registry_dir`).
REGISTRY_ENV = "DMUSERD_NBD_REGISTRY"
SOCKET_BUFFER = 4 * 1024 * 1024
#: Channels served at once per export (each holds a receive buffer of RECEIVE_SIZE).
MAX_CHANNELS = 256
#: accept() errors that pass: out of descriptors or memory, or a peer gone before we took it.
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.ECONNABORTED})
#: The input surface of the channel socket (:mod:`dmuserd.daemon.guard`).
SURFACE = "nbd-channel"


class NbdError(ConfigError):
    """The NBD export cannot start (nbdkit missing, socket in use, a mismatch)."""


@dataclass(frozen=True)
class Settings:
    """What an nbdkit process was started with (kept in ``nbdkit.json``)."""

    where: str
    size: int
    block_size: int
    caps: str
    timeout: float
    threads: int
    # A default, so that the nbdkit.json of an nbdkit started before this field still reads.
    idle_exit: float = DEFAULT_IDLE_EXIT
    # How the plugin moves data (``data=``); an nbdkit.json from before this field: on the socket.
    data: str = "socket"


@dataclass
class Running:
    pid: int
    starttime: int
    settings: Settings


# -- paths and options -------------------------------------------------------------


def parse_where(where: str) -> tuple[str, str | tuple[str, int]]:
    """``("unix", "/abs/path")`` or ``("tcp", (host, port))``."""
    if where.startswith("tcp:"):
        host, sep, port = where[4:].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise NbdError(f"export nbd:{where}: use nbd:tcp:HOST:PORT (e.g. nbd:tcp:127.0.0.1:10809)")
        return "tcp", (host.strip("[]"), int(port))
    if not where:
        raise NbdError("export nbd: needs a socket path (nbd:/run/dmuserd/disk.sock)")
    return "unix", os.path.abspath(where)


def nbd_uri(where: str) -> str:
    """The NBD URI clients use to reach the export at ``where``."""
    kind, address = parse_where(where)
    if kind == "unix":
        return f"nbd+unix:///?socket={address}"
    host, port = address
    return f"nbd://[{host}]:{port}/" if ":" in host else f"nbd://{host}:{port}/"


def state_dir_for(where: str) -> Path:
    """The private directory of the export at ``where`` (see the module docstring)."""
    kind, address = parse_where(where)
    if kind == "unix":
        path = Path(address)
        return path.parent / f".{path.name}.dmuserd"
    host, port = address
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in host)
    return Path(default_control_socket()).parent / f"nbd-tcp-{safe}-{port}"


def export_address(where: str) -> str:
    """``where`` as ``dmuserd nbd list`` shows it and ``nbd stop`` takes it: an absolute path or tcp:HOST:PORT."""
    kind, address = parse_where(where)
    if kind == "unix":
        return address
    host, port = address
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def registry_dir() -> Path:
    """Where every nbdkit of an export keeps its record (``PID.json``, written by the plugin).

    ``nbd/`` beside the default control socket (``/run/dmuserd/nbd`` for root),
    or ``$DMUSERD_NBD_REGISTRY``. The state directories live next to each
    export's socket, anywhere: this is how ``dmuserd nbd list`` finds them.
    """
    return Path(os.environ.get(REGISTRY_ENV) or Path(default_control_socket()).parent / "nbd")


def read_registry(registry: Path | None = None) -> list[dict]:
    """The records of the nbdkit processes that run; the records of exited ones are removed."""
    registry = registry_dir() if registry is None else registry
    records = []
    for path in sorted(registry.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            alive = _starttime(int(record["pid"])) == int(record["starttime"])
        except FileNotFoundError:
            continue  # it exited just now
        except (ValueError, KeyError, TypeError):
            alive = False  # names no process
        if alive:
            records.append(record)
        else:
            path.unlink(missing_ok=True)
    return records


@dataclass(frozen=True)
class NbdOptions:
    """The ``nbd:`` export's options (see the module doc)."""

    timeout: float
    threads: int
    on_stop: str
    idle_exit: float
    data: str = "shm"  # shm: through the shared pool; socket: on the channel sockets only


def parse_options(export) -> NbdOptions:
    """The export's options, typed; :class:`NbdError` names the export and the option."""
    opts = Options(str(export), export.options, kind="export", error=NbdError)
    timeout = opts.float("timeout", DEFAULT_DAEMON_TIMEOUT_MS / 1000, min=0, max=3600)
    threads = opts.int("threads", DEFAULT_THREADS, min=1, max=128)
    on_stop = opts.choice("on-stop", ("keep", "stop"), "keep")
    idle_exit = opts.float("idle-exit", DEFAULT_IDLE_EXIT, min=0, max=sys.float_info.max)  # (0: never)
    data = opts.choice("data", ("shm", "socket"), "shm")
    opts.choice("server", ("nbdkit", "dmuserd"), "nbdkit")  # dmuserd: see from_spec
    opts.finish("timeout=SECONDS, threads=N, on-stop=keep|stop, idle-exit=SECONDS, data=shm|socket, "
                "server=nbdkit|dmuserd")
    return NbdOptions(timeout, threads, on_stop, idle_exit, data)


def settings_for(target, export, options: NbdOptions | None = None) -> Settings:
    """What nbdkit is started with for ``target``'s ``export``."""
    options = options if options is not None else parse_options(export)
    backend = target.backend
    caps = ",".join(sorted(op.value for op in backend.capabilities))
    return Settings(export.where, backend.size, backend.block_size, caps, options.timeout, options.threads,
                    options.idle_exit, options.data)


def prepare_state_dir(path: Path) -> None:
    """Create ``path`` 0700, or check an existing one is ours and make it 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise NbdError(f"{path} belongs to uid {st.st_uid}, not to this daemon's uid {os.geteuid()}: "
                       "remove it or run the daemon as its owner")
    os.chmod(path, 0o700)


# -- the nbdkit process ---------------------------------------------------------------


def _starttime(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):  # a zombie (PID 1 may be slow to reap, or never)
        return None
    return int(fields[19])


def read_running(state_dir: Path) -> Running | None:
    """The nbdkit recorded in ``state_dir`` if it still runs, else None."""
    try:
        doc = json.loads((state_dir / STATE_NAME).read_text())
        running = Running(int(doc["pid"]), int(doc["starttime"]), Settings(**doc["settings"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _starttime(running.pid) != running.starttime:
        return None
    try:
        cmdline = Path(f"/proc/{running.pid}/cmdline").read_bytes()
    except OSError:
        return None
    if str(state_dir / CHANNEL_NAME).encode() not in cmdline:
        return None
    return running


def _write_running(state_dir: Path, running: Running) -> None:
    tmp = state_dir / (STATE_NAME + ".tmp")
    tmp.write_text(json.dumps({"pid": running.pid, "starttime": running.starttime,
                               "settings": asdict(running.settings)}) + "\n")
    os.replace(tmp, state_dir / STATE_NAME)


def _nbdkit_command(settings: Settings, state_dir: Path, systemd_socket: bool = False) -> list[str]:
    """nbdkit and the plugin's parameters, including what its watch needs to end a kept nbdkit.

    The watch checks the NBD socket's path only where the daemon bound it: a
    socket systemd passed is systemd's (see the plugin's docstring).
    """
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise NbdError("nbdkit is not installed: apt-get install nbdkit nbdkit-plugin-python")
    command = [
        nbdkit, "--foreground", "--threads", str(settings.threads), "--pidfile", str(state_dir / PID_NAME),
        "python", str(PLUGIN),
        f"channel={state_dir / CHANNEL_NAME}", f"size={settings.size}",
        f"block_size={settings.block_size}", f"caps={settings.caps}", f"timeout={settings.timeout}",
        f"state={state_dir / STATE_NAME}", f"idle_exit={settings.idle_exit}", f"registry={registry_dir()}",
        f"export={export_address(settings.where)}",
    ]
    kind, address = parse_where(settings.where)
    if kind == "unix" and not systemd_socket:
        command.append(f"nbd_socket={address}")
    if settings.data == "shm":
        command.append(f"shm={state_dir / SHM_CHANNEL_NAME}")
    return command


#: The shell between the daemon and nbdkit. nbdkit in the foreground (as it
#: runs under socket activation) dies with its parent (it sets
#: PR_SET_PDEATHSIG), so its parent is this shell, in a session of its own,
#: which waits for it and outlives the daemon; nbdkit's own pid goes in
#: LISTEN_PID (sd_listen_fds checks it) and in the pidfile.
_KEEPER = 'sh -c \'LISTEN_PID=$$; export LISTEN_PID; exec "$@"\' nbdkit "$@"; exit $?'


def spawn_nbdkit(settings: Settings, state_dir: Path, listener: socket.socket, systemd_socket: bool = False) -> int:
    """Start nbdkit (under a keeper shell, see :data:`_KEEPER`) serving ``listener``.

    ``systemd_socket``: ``listener`` came from systemd (nbdkit leaves its path alone).
    Returns the keeper's pid; nbdkit writes its own to ``nbdkit.pid`` when it
    accepts clients.
    """
    command = ["/bin/sh", "-c", _KEEPER, "keeper", *_nbdkit_command(settings, state_dir, systemd_socket)]
    # Under systemd, a scope of its own keeps nbdkit and its keeper alive when
    # the unit's cgroup is stopped (systemctl restart/stop, KillMode=control-group).
    # systemd-run --scope execs the keeper: the pid stays the same.
    systemd_run = shutil.which("systemd-run")
    if os.environ.get("INVOCATION_ID") and systemd_run and os.path.isdir("/run/systemd/system"):
        unit = "dmuserd-nbd-" + "".join(c if c.isalnum() else "-" for c in settings.where)[-80:]
        command = [systemd_run, "--scope", "--quiet", "--collect", f"--unit={unit}-{os.getpid()}", "--", *command]
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
    env["LISTEN_FDS"] = "1"
    (state_dir / PID_NAME).unlink(missing_ok=True)
    logfd = os.open(state_dir / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        return os.posix_spawn(
            command[0],
            command,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, logfd, 1),
                (os.POSIX_SPAWN_DUP2, logfd, 2),
                (os.POSIX_SPAWN_DUP2, listener.fileno(), 3),  # the listening socket is fd 3
            ],
            setsid=True,
        )
    finally:
        os.close(logfd)


def _log_tail(state_dir: Path, lines: int = 8) -> str:
    try:
        return "\n".join((state_dir / LOG_NAME).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def wait_exit(pid: int) -> None:
    """Wait until process ``pid`` exits (reaping it if it is our child)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = None
    if pidfd is not None:
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    return _starttime(pid) is not None


def _reap(pid: int) -> bool:
    """Reap our child ``pid`` if it exited; True if it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done != 0


def _read_pidfile(state_dir: Path) -> int | None:
    try:
        pid = int((state_dir / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


async def stop_nbdkit(pid: int) -> None:
    """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with trio.move_on_after(STOP_TIMEOUT):
        await wait_exit(pid)
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    await wait_exit(pid)


# -- sockets ------------------------------------------------------------------------------


def _in_use(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
            return True
        except OSError:
            return False


def bind_nbd_socket(where: str) -> tuple[socket.socket, bool]:
    """The NBD listening socket and whether it is systemd's (else bound at ``where`` now)."""
    kind, address = parse_where(where)
    inherited = inherited_socket(address if kind == "unix" else f"{address[0]}:{address[1]}")
    if inherited is not None:
        log.info("using the NBD socket systemd passed", where=where)
        return inherited, True
    if kind == "unix":
        if os.path.exists(address):
            if _in_use(address):
                raise NbdError(f"{address} is in use by another NBD server: stop it or choose another path")
            os.unlink(address)
        os.makedirs(os.path.dirname(address), exist_ok=True)
        return bind_private_unix(address, 128), False  # listening before its file appears
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise NbdError(f"cannot listen on {host}:{port} for NBD: {exc.strerror}") from None
    sock.listen(128)
    return sock, False


async def accept_within(sock, slots: trio.Semaphore, log_, what: str):
    """Take one of ``slots``, then accept the next ``what`` on ``sock``: ``(conn, address)``.

    Without a free slot the next peer waits in the listen backlog. An accept
    error that passes (out of descriptors or memory for now, as
    trio.serve_listeners does) is logged, its slot returned, and retried
    after 0.1 s; any other is raised.
    """
    while True:
        await slots.acquire()
        try:
            return await sock.accept()
        except OSError as exc:
            slots.release()
            if exc.errno not in _ACCEPT_RETRY:
                raise
            log_.error(f"accepting a {what} failed; retrying", error=exc.strerror)
            await trio.sleep(0.1)


async def bind_channel_socket(state_dir: Path, name: str = CHANNEL_NAME) -> trio.socket.SocketType:
    path = str(state_dir / name)
    if os.path.exists(path):
        if _in_use(path):
            raise NbdError(f"another dmuserd daemon already serves {path}: stop it first")
        os.unlink(path)
    return trio.socket.from_stdlib_socket(bind_private_unix(path, 128))


class SocketTransport:
    """A channel socket from the plugin, as a transport for :func:`serve_channel`.

    It calls the socket directly and waits with :func:`trio.lowlevel.wait_readable`
    / ``wait_writable`` only when the call would block. trio's socket methods
    yield to the scheduler twice per call even when data is there, which was a
    third of the daemon's time per request; a serial channel's peer waits for
    each answer, so this loop blocks (and yields) once per request anyway.
    """

    #: The plugin sends a request on a channel only once the previous one is answered.
    serial = True
    #: READ data goes out as the backend's pieces, gathered by ``sendmsg``.
    #: (Answers through a pipe the plugin passed, with large READ data
    #: ``vmsplice``d, were measured too: the daemon saved its copy but the
    #: plugin's reads of referenced pages cost more, and a 1 MiB answer never
    #: fits a pipe of ``pipe-max-size`` (1 MiB) whole, so no gain overall.)
    scatter = True

    def __init__(self, sock: trio.socket.SocketType, pool: SharedPool | None = None) -> None:
        self.sock = socket.socket(fileno=sock.detach())  # ours to close from now on
        self.sock.setblocking(False)
        #: A slotted channel's pool (announced before anything is read), else None: a plain channel.
        self.pool = None if pool is None else pool.slots
        self._announce = pool
        self._buffer = bytearray(RECEIVE_SIZE)
        self._view = memoryview(self._buffer)
        # After an answer the peer's next request is not there yet (it waited
        # for the answer): wait before reading instead of a recv that fails.
        self._answered = False

    async def receive_some(self, max_bytes: int):
        """The next bytes, as a view of this transport's buffer (valid until the next call)."""
        view = self._view[: min(max_bytes, len(self._buffer))]
        if self._announce is not None:
            pool, self._announce = self._announce, None
            try:
                pool.announce(self.sock)
            except OSError:
                return b""  # the peer is gone already
        if self._answered:
            self._answered = False
            await trio.lowlevel.wait_readable(self.sock)
        while True:
            try:
                n = self.sock.recv_into(view)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except (ConnectionResetError, BrokenPipeError):
                return b""
            return view[:n]

    async def send_all(self, buffers: list) -> None:
        await sendmsg_all(self.sock, buffers)
        self._answered = True


async def sendmsg_all(sock: socket.socket, buffers: list, total: int | None = None) -> None:
    """Send ``buffers`` whole on the non-blocking ``sock``, gathered (``sendmsg``), waiting while it is full.

    At most IOV_MAX (1024) buffers; a partial send goes on with the rest.
    ``total``: their size in bytes, if the caller knows it (counting it here
    takes a memoryview per buffer, ~0.5 µs each). OSError when the peer is gone.
    """
    views = buffers
    if total is None:
        total = sum(memoryview(b).nbytes for b in buffers)
    while True:
        try:
            sent = sock.sendmsg(views)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        if sent == total:
            return
        skip, rest = sent, []
        for view in views:
            view = memoryview(view).cast("B")
            if skip >= len(view):
                skip -= len(view)
            else:
                rest.append(view[skip:])
                skip = 0
        views, total = rest, total - sent


# -- the export ------------------------------------------------------------------------------


class NbdExport(Export):
    """One ``nbd:`` export of one target: its channel listener and its nbdkit."""

    kind = "nbd"

    def __init__(self, spec, host, options: NbdOptions) -> None:
        super().__init__(spec, host)
        self.export = spec
        self.options = options
        self.on_stop = options.on_stop
        self.state_dir = state_dir_for(spec.where)
        self.target: Target | None = None  # the target it serves, once started
        self.settings: Settings | None = None
        self.pid: int | None = None  # nbdkit's
        self.keeper: int | None = None  # its parent shell, when this daemon started it
        self.listener: socket.socket | None = None  # the NBD socket, when we hold it
        self.systemd_socket = False  # the NBD socket is systemd's: never unlink it
        self._channels = 0
        self.pool: SharedPool | None = None  # the slotted channels' pool, made at the first
        self.log = log.bind(where=spec.where)

    @classmethod
    def from_spec(cls, spec, host) -> Export:
        """This export (``server=nbdkit``, the default), or the daemon's own NBD server (``server=dmuserd``)."""
        parse_where(spec.where)
        if spec.options.get("server") == "dmuserd":
            from dmuserd.daemon.nbd_server import NbdServerExport  # it imports this module

            return NbdServerExport.from_spec(spec, host)
        return cls(spec, host, parse_options(spec))

    @property
    def uri(self) -> str:
        """The NBD URI clients connect to."""
        return nbd_uri(self.export.where)

    def status(self) -> dict:
        return {"nbdkit_pid": self.pid, "channels_accepted": self._channels, "on_stop": self.on_stop}

    async def start(self, target, nursery: trio.Nursery) -> str:
        """Start (or re-attach to) the nbdkit serving ``target`` at ``WHERE``; the NBD URI."""
        if not PLUGIN.exists():
            raise NbdError(f"the nbdkit plugin {PLUGIN} is missing from this installation")
        self.target = target
        self.settings = settings_for(target, self.export, self.options)
        self.log = log.bind(device=target.name, where=self.export.where)
        await self._start(nursery)
        return self.uri

    async def _start(self, nursery) -> None:
        prepare_state_dir(self.state_dir)
        # The slotted socket first: a plugin that finds the plain one finds it too.
        shm_sock = await bind_channel_socket(self.state_dir, SHM_CHANNEL_NAME)
        try:
            channel_sock = await bind_channel_socket(self.state_dir)
        except BaseException:
            shm_sock.close()
            raise
        try:
            running = read_running(self.state_dir)
            if running is not None:
                self._check_compatible(running)
                self.pid = running.pid
                self.log.info("re-attached to the running nbdkit", pid=running.pid)
            else:
                await self._start_nbdkit()
        except BaseException:
            channel_sock.close()
            shm_sock.close()
            raise
        channels = trio.Semaphore(MAX_CHANNELS)  # both sockets' channels together
        nursery.start_soon(self._accept_channels, channel_sock, CHANNEL_NAME, channels)
        nursery.start_soon(self._accept_channels, shm_sock, SHM_CHANNEL_NAME, channels)
        nursery.start_soon(self._supervise)

    def _check_compatible(self, running: Running) -> None:
        old, new = running.settings, self.settings
        if (old.size, old.block_size) != (new.size, new.block_size):
            raise NbdError(
                f"nbdkit (pid {running.pid}) still serves {self.export.where} with size {old.size} and block "
                f"size {old.block_size}, but this backend has size {new.size} and block size {new.block_size}: "
                f"serve the same backend, or stop that nbdkit first (dmuserd nbd stop {self.export.where})")
        if old != new:
            self.log.warning("the running nbdkit keeps the settings it was started with until it restarts",
                             running=asdict(old), wanted=asdict(new))

    async def _start_nbdkit(self) -> None:
        if self.listener is None:
            self.listener, self.systemd_socket = bind_nbd_socket(self.export.where)
        keeper = spawn_nbdkit(self.settings, self.state_dir, self.listener, self.systemd_socket)
        # Ready when nbdkit has written its pidfile: it has loaded the plugin
        # and accepts (the socket itself listens already).
        pid = None
        with trio.move_on_after(START_TIMEOUT):
            while pid is None:
                pid = _read_pidfile(self.state_dir)
                if pid is None:
                    if _reap(keeper):
                        raise NbdError(f"nbdkit exited at start; its log ({self.state_dir / LOG_NAME}) ends:\n"
                                       f"{_log_tail(self.state_dir)}")
                    await trio.sleep(0.01)
        if pid is None:
            os.kill(keeper, signal.SIGKILL)
            await wait_exit(keeper)
            raise NbdError(f"nbdkit did not come up in {START_TIMEOUT} s; its log ends:\n{_log_tail(self.state_dir)}")
        self.pid, self.keeper = pid, keeper
        _write_running(self.state_dir, Running(pid, _starttime(pid) or 0, self.settings))
        self.log.info("nbdkit started", pid=pid, endpoint=self.uri, threads=self.settings.threads)

    async def _supervise(self) -> None:
        """Restart nbdkit if it dies; at a stop, keep or stop it (``on-stop``)."""
        restarts = 0
        try:
            while True:
                await wait_exit(self.pid)
                if self.keeper is not None:
                    await wait_exit(self.keeper)
                    self.keeper = None
                restarts += 1
                self.log.error("nbdkit exited; restarting it (its clients were disconnected)",
                               pid=self.pid, log_tail=_log_tail(self.state_dir), restart=restarts)
                if restarts > MAX_RESTARTS:
                    raise NbdError(f"nbdkit keeps exiting (log: {self.state_dir / LOG_NAME}); giving up")
                await trio.sleep(min(0.1 * 2**restarts, 5))
                await self._start_nbdkit()
        finally:
            with trio.CancelScope(shield=True):
                await self._at_exit()

    async def _at_exit(self) -> None:
        if self.host.stopping and self.on_stop == "stop" and self.pid is not None:
            self.log.info("stopping nbdkit (on-stop=stop)", pid=self.pid)
            await stop_nbdkit(self.pid)
            if self.keeper is not None:
                await wait_exit(self.keeper)
            (self.state_dir / STATE_NAME).unlink(missing_ok=True)
            kind, address = parse_where(self.export.where)
            if kind == "unix" and not self.systemd_socket:
                try:
                    os.unlink(address)
                except OSError:
                    pass
        elif self.pid is not None and _alive(self.pid):
            running = read_running(self.state_dir)  # its own settings: it may predate this daemon
            self.log.info("leaving nbdkit running for the next daemon (on-stop=keep)", pid=self.pid,
                          idle_exit_s=(running.settings if running else self.settings).idle_exit)
        if self.listener is not None:
            self.listener.close()

    async def _accept_channels(self, sock, name: str, slots: trio.Semaphore) -> None:
        """Accept the plugin's channels on socket ``name``: at most :data:`MAX_CHANNELS` at once
        (``slots``, shared by both sockets), same uid or root only.

        Over the limit the next connection waits in the listen backlog until
        a channel ends (the plugin's request waits with it), so a peer that
        opens channels without end cannot make the daemon hold more. Channels
        of :data:`SHM_CHANNEL_NAME` are slotted: the export's pool (made at
        the first) is announced to each.
        """
        path = str(self.state_dir / name)
        guard = self.target.dispatcher.guard
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await accept_within(sock, slots, self.log, "channel")
                    peer = Peer.of(conn)
                    if peer is None or peer.uid not in (0, os.geteuid()):
                        guard.reject(SURFACE, "peer-not-allowed",
                                     f"channel from uid {peer.uid if peer else '?'}: only uid 0 and "
                                     f"{os.geteuid()} may serve as the kernel side", peer,
                                     device=self.target.name)
                        conn.close()
                        slots.release()
                        continue
                    try:
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                    except OSError:
                        pass
                    self._channels += 1
                    if name == SHM_CHANNEL_NAME and self.pool is None:
                        try:
                            self.pool = SharedPool()
                        except OSError as exc:  # no memfd or memory now: this channel ends, the plugin goes plain
                            self.log.error("cannot create the shared-memory pool", error=str(exc))
                            conn.close()
                            slots.release()
                            continue
                    nursery.start_soon(self._serve, conn, f"nbd{self._channels}", peer, slots,
                                       self.pool if name == SHM_CHANNEL_NAME else None)
        finally:
            sock.close()
            try:
                os.unlink(path)
            except OSError:
                pass
            if name == SHM_CHANNEL_NAME and self.pool is not None:
                self.pool.close()

    async def _serve(self, conn, name: str, peer: Peer, slots: trio.Semaphore, pool: SharedPool | None) -> None:
        try:
            transport = SocketTransport(conn, pool)
            with transport.sock:
                await serve_channel(transport, self.target.dispatcher, name=name,
                                    surface=SURFACE, peer=peer, resends=True)
        finally:
            slots.release()

