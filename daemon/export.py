"""The export interface: one class per way clients reach a target.

An export kind (``fuse``, ``nbd``, ``dm-user``, ``ublk``, yours) is a
subclass of :class:`Export` registered under the ``dmuserd.exports``
entry-point group, exactly like backends::

    [project.entry-points."dmuserd.exports"]
    my-export = "my_pkg.module:MyExport"

and ``--export my-export:WHERE,key=value`` then works. The daemon knows no
kind by name: for each ``--export`` of each target it

1. builds the export with :meth:`Export.from_spec` (options are validated
   there, with :class:`~dmuserd.backends.Options`, before anything starts);
2. calls ``await export.start(target, nursery)``: serve ``target`` (hand
   every request to ``target.dispatcher.handle``) and return once clients
   can reach it, with a string saying where (a path, a URI); long-running
   tasks go in ``nursery``, cancelled when the target or the daemon stops;
3. to stop: awaits :meth:`Export.prepare_stop` (while requests are still
   served: FUSE detaches the loop devices on its files, whose own flush
   must get through), closes the dispatcher's admission (new requests get
   ERROR at once, :meth:`~dmuserd.daemon.dispatcher.Dispatcher.close_admission`),
   calls :meth:`Export.stop_admitting` (make clients fail fast: remove a
   table, refuse new connections), waits for ``dispatcher.drained``,
   flushes the backend, awaits :meth:`Export.finish_stop` (send clients
   the answers still on their way) and cancels the nursery. Removing one target at run
   time (:meth:`~dmuserd.daemon.runtime.Daemon.remove_target`) does the same
   for that target alone.

What an export needs from the daemon around it (its guard, a place for
process-wide state such as the one FUSE mount) is the :class:`Host` given
to :meth:`Export.from_spec`. ``docs/writing-an-export.md`` walks through a
complete small export.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import trio

from dmuserd.backends import registry
from dmuserd.daemon.config import ConfigError, ExportSpec

if TYPE_CHECKING:
    from dmuserd.daemon.guard import Guard
    from dmuserd.daemon.runtime import Target

#: The entry-point group export classes are registered in.
GROUP = "dmuserd.exports"


class Host(Protocol):
    """What an export may use of the daemon that runs it."""

    #: counts and logs refused inputs and bugs, per surface (:mod:`dmuserd.daemon.guard`)
    guard: Guard
    #: a stop is under way (set before ``stop_admitting`` is called)
    stopping: bool
    #: process-wide state shared by the exports of one kind (keyed by kind), e.g. the FUSE mount
    shared: dict[str, Any]
    #: the daemon's nursery: for process-wide tasks that outlive one target (the FUSE mount)
    nursery: trio.Nursery | None


class Export(abc.ABC):
    """One export of one target (see the module doc)."""

    #: The registry name: the KIND of ``--export KIND:WHERE`` (``spec.kind`` is what the user wrote).
    kind: ClassVar[str] = ""
    #: WHERE when ``--export KIND`` leaves it out (``ublk``: ``auto``, a free device); None: it must be given.
    where_default: ClassVar[str | None] = None

    def __init__(self, spec: ExportSpec, host: Host) -> None:
        self.spec = spec
        self.host = host
        #: where clients find it, once started (what :meth:`start` returned)
        self.endpoint: str | None = None

    @classmethod
    def from_spec(cls, spec: ExportSpec, host: Host) -> Export:
        """Build the export, validating ``spec.options`` (raise :class:`ConfigError`)."""
        return cls(spec, host)

    @abc.abstractmethod
    async def start(self, target: Target, nursery: trio.Nursery) -> str:
        """Serve ``target`` until ``nursery`` is cancelled; return where, once clients can reach it."""

    async def prepare_stop(self) -> None:
        """A stop begins and requests are still served: let clients finish cleanly (optional)."""

    def stop_admitting(self) -> None:
        """A stop is under way: make new I/O fail fast. The dispatcher already refuses it."""

    async def finish_stop(self) -> None:
        """Requests are done, the backend flushed; the nursery is cancelled next: deliver the answers still
        queued (optional; the NBD server's replies that did not fit its sockets yet)."""

    def status(self) -> dict:
        """Extra facts for ``dmuserd status`` (queues, counters); the endpoint is added by the daemon."""
        return {}


def available() -> dict[str, str]:
    """Registered export kinds → ``module:Class``."""
    return registry.available(GROUP)


def export_class(kind: str) -> type[Export]:
    """The class registered for ``kind``, or one named ``module.path:Class``."""
    # Export is abstract: mypy refuses an abstract class for type[T], though only issubclass() is done with it.
    return registry.registered_class(GROUP, kind, Export, ConfigError, "export kind")  # type: ignore[type-abstract]


def build(spec: ExportSpec, host: Host) -> Export:
    """The export ``spec`` names, built and its options checked (nothing started)."""
    return export_class(spec.kind).from_spec(spec, host)
