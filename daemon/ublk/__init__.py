"""The ublk export: ``--export ublk[:ID][,queues=N][,depth=D][,recovery=1]`` serves a target as ``/dev/ublkbN``.

* :mod:`~dmuserd.daemon.ublk.uapi`: the kernel's numbers and structs (Linux 6.1 ``ublk_cmd.h``);
* :mod:`~dmuserd.daemon.ublk.control`: ``/dev/ublk-control`` commands over io_uring;
* :mod:`~dmuserd.daemon.ublk.queue`: one queue's FETCH / COMMIT_AND_FETCH cycle, served from trio;
* :mod:`~dmuserd.daemon.ublk.export`: :class:`UblkExport`, the export (registered as ``ublk``);
* :mod:`~dmuserd.daemon.ublk.devices`: the devices there are and who serves them (``dmuserd ublk list|del``).

io_uring comes from a small C extension over liburing (``_uring``); its
completions wake trio through an eventfd.
"""

from dmuserd.daemon.ublk.errors import UblkError
from dmuserd.daemon.ublk.export import UblkExport

__all__ = ["UblkError", "UblkExport"]
