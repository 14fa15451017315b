"""The NBD export's shared-memory pool: a sealed memfd the daemon and the plugin both map.

The framing and the slot checks are the protocol's
(:mod:`dmuserd.protocol._shm`); this module does the system calls: it
creates the pool (``memfd_create``, sized, then sealed against shrinking
and growing, so the plugin, which gets the descriptor, cannot make the
daemon's mapping fault), maps it, and announces it on each slotted channel
the plugin opens (``shm.sock`` in the export's state directory), with the
descriptor attached (``SCM_RIGHTS``).

Memory: :data:`SLOTS` slots of :data:`SLOT_SIZE` bytes (64 MiB of address
space per export). A memfd's pages exist once touched: a slot used only by
4 KiB requests holds a page; the plugin takes the slot freed last first, so
a workload keeps as many slots warm as it runs requests at once.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket

from dmuserd.protocol import PoolLayout, SlotPool

#: Slots per pool: every request in flight of 8 clients at nbdkit's default
#: threads (:data:`~dmuserd.daemon.nbd.DEFAULT_THREADS`, per client), or of
#: 2 at ``threads=32``. A request that finds none free goes on the socket instead.
SLOTS = 64
#: Bytes per slot: a READ or WRITE longer than this goes on the socket.
SLOT_SIZE = 1 << 20


class SharedPool:
    """One export's pool: the memfd, the daemon's mapping, and the slots' accounts."""

    def __init__(self, slots: int = SLOTS, slot_size: int = SLOT_SIZE) -> None:
        self.layout = PoolLayout(slots, slot_size)
        self.fd = os.memfd_create("dmuserd-nbd-pool", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.layout.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.map = mmap.mmap(self.fd, self.layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        #: The protocol's account of the slots, shared by every channel of the export.
        self.slots = SlotPool(self.map, self.layout)
        self._announcement = self.layout.encode()

    def announce(self, sock: socket.socket) -> None:
        """Send the pool to a newly accepted slotted channel (its first bytes, with the memfd).

        32 bytes on a new socket: they go at once, or the peer is gone (OSError).
        """
        sent = socket.send_fds(sock, [self._announcement], [self.fd])
        if sent != len(self._announcement):
            raise BrokenPipeError("the pool announcement was cut short")

    def close(self) -> None:
        """Close the descriptor (the mapping goes when the last view of it does)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
