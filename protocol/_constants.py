"""dm-user's numbers, named (values from include/uapi/linux/dm-user.h)."""

from __future__ import annotations

import enum

#: Size of the message header: five little-endian u64 fields.
HEADER_SIZE = 40
#: ``sector`` counts 512-byte units whatever the device's block size.
SECTOR_SIZE = 512
#: ``MAX_OUTSTANDING_MESSAGES``: the messages dm-user.c keeps in reserve per
#: target (its mempool's size). A reserve, not a cap: ``mempool_alloc(GFP_NOIO)``
#: does not fail there, so any number of messages may be outstanding, and a
#: daemon bounds its own concurrency (dmuserd: ``DEFAULT_MAX_IN_FLIGHT`` in
#: ``daemon/channels.py``).
MESSAGE_POOL_RESERVE = 128
#: How long I/O waits for the first daemon before failing (module parameter).
DEFAULT_DAEMON_TIMEOUT_MS = 4000


class RequestType(enum.IntEnum):
    """``type`` of a kernel → daemon message."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    SECURE_ERASE = 4
    WRITE_SAME = 5
    WRITE_ZEROES = 6
    # The kernel kills zone BIOs before they reach user space; named so that
    # a daemon can recognise (and refuse) them.
    ZONE_OPEN = 7
    ZONE_CLOSE = 8
    ZONE_FINISH = 9
    ZONE_APPEND = 10
    ZONE_RESET = 11
    ZONE_RESET_ALL = 12


class ResponseType(enum.IntEnum):
    """``type`` of a daemon → kernel message. Anything but SUCCESS fails the BIO."""

    SUCCESS = 0
    ERROR = 1
    UNSUPPORTED = 2


class Flag(enum.IntFlag):
    """Request flag bits of the UAPI header.

    The kernel forwards only :data:`FORWARDED_FLAGS`: a BIO carrying
    CGROUP_PUNT, HIPRI, DRV, SWAP (or anything ``bio_flags_to_user_flags()``
    does not map) is killed before it becomes a message.
    """

    FAILFAST_DEV = 0x1
    FAILFAST_TRANSPORT = 0x2
    FAILFAST_DRIVER = 0x4
    SYNC = 0x8
    META = 0x10
    PRIO = 0x20
    NOMERGE = 0x40
    IDLE = 0x80
    INTEGRITY = 0x100
    FUA = 0x200
    PREFLUSH = 0x400
    RAHEAD = 0x800
    BACKGROUND = 0x1000
    NOWAIT = 0x2000
    CGROUP_PUNT = 0x4000
    NOUNMAP = 0x8000
    HIPRI = 0x10000
    DRV = 0x20000
    SWAP = 0x40000


#: Every flag bit the protocol defines.
ALL_FLAGS = 0
for _flag in Flag:
    ALL_FLAGS |= _flag.value
del _flag

#: The flags ``bio_flags_to_user_flags()`` maps (the first 14 and NOUNMAP):
#: the only ones a message from the kernel ever carries.
FORWARDED_FLAGS = ALL_FLAGS & ~int(Flag.CGROUP_PUNT | Flag.HIPRI | Flag.DRV | Flag.SWAP)

#: Request types the kernel actually forwards to user space.
FORWARDED_TYPES = frozenset(
    {
        RequestType.READ,
        RequestType.WRITE,
        RequestType.FLUSH,
        RequestType.DISCARD,
        RequestType.SECURE_ERASE,
        RequestType.WRITE_SAME,
        RequestType.WRITE_ZEROES,
    }
)
