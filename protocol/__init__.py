"""dm-user, sans I/O: bytes in, typed events out.

* the numbers: :class:`RequestType`, :class:`ResponseType`, :class:`Flag`,
  :data:`HEADER_SIZE`, :data:`SECTOR_SIZE`, :data:`FORWARDED_FLAGS`,
  :data:`MESSAGE_POOL_RESERVE`;
* the message: :class:`Header` (its layout: :data:`HEADER_STRUCT`, the one
  in the tree), :class:`Request`, :class:`OversizedRequest`, :class:`Response`;
* slotted channels (the NBD plugin's shared-memory data plane):
  :class:`PoolLayout`, :class:`SlotPool`, :data:`SLOT_STRUCT`, :data:`NO_SLOT`,
  :data:`ANNOUNCEMENT_SIZE`;
* the daemon's side of a channel: :class:`DaemonConnection`;
* the server side of NBD (the daemon's own NBD export):
  :class:`NbdServerConnection` and its events, :func:`nbd_simple_reply`,
  the structured reply chunks :func:`nbd_data_chunk`, :func:`nbd_error_chunk`,
  :func:`nbd_block_status_chunk`;
* the kernel's side: :class:`KernelTarget` (a model of ``dm-user.c``) with
  its :class:`Channel` and :class:`Bio`.

This package imports only the standard library (nbdkit's embedded Python
loads it by path), and never trio.
"""

from dmuserd.protocol._connection import DEFAULT_MAX_IO, NEED_DATA, DaemonConnection
from dmuserd.protocol._constants import (
    ALL_FLAGS,
    DEFAULT_DAEMON_TIMEOUT_MS,
    FORWARDED_FLAGS,
    FORWARDED_TYPES,
    HEADER_SIZE,
    MESSAGE_POOL_RESERVE,
    SECTOR_SIZE,
    Flag,
    RequestType,
    ResponseType,
)
from dmuserd.protocol._errors import KernelError, ProtocolError
from dmuserd.protocol._kernel import WOULD_BLOCK, Bio, BioState, Channel, KernelTarget
from dmuserd.protocol._nbd import MAX_PAYLOAD as NBD_MAX_PAYLOAD
from dmuserd.protocol._nbd import NEED_DATA as NBD_NEED_DATA
from dmuserd.protocol._nbd import (
    AllocationFlag as NbdAllocationFlag,
)
from dmuserd.protocol._nbd import (
    Command as NbdCommand,
)
from dmuserd.protocol._nbd import (
    CommandFlag as NbdCommandFlag,
)
from dmuserd.protocol._nbd import (
    NbdDisconnect,
    NbdErrno,
    NbdNegotiated,
    NbdProtocolError,
    NbdRefused,
    NbdRequest,
    NbdServerConnection,
    TransmissionFlag,
)
from dmuserd.protocol._nbd import block_status_chunk as nbd_block_status_chunk
from dmuserd.protocol._nbd import data_chunk as nbd_data_chunk
from dmuserd.protocol._nbd import error_chunk as nbd_error_chunk
from dmuserd.protocol._nbd import simple_reply as nbd_simple_reply
from dmuserd.protocol._message import HEADER_STRUCT, Header, OversizedRequest, Request, Response, new_message
from dmuserd.protocol._shm import ANNOUNCEMENT_SIZE, NO_SLOT, SLOT_STRUCT, PoolLayout, SlotPool

__all__ = [
    "new_message",
    "ALL_FLAGS",
    "ANNOUNCEMENT_SIZE",
    "DEFAULT_DAEMON_TIMEOUT_MS",
    "DEFAULT_MAX_IO",
    "FORWARDED_FLAGS",
    "FORWARDED_TYPES",
    "HEADER_SIZE",
    "HEADER_STRUCT",
    "MESSAGE_POOL_RESERVE",
    "NBD_MAX_PAYLOAD",
    "NBD_NEED_DATA",
    "NEED_DATA",
    "NO_SLOT",
    "SECTOR_SIZE",
    "SLOT_STRUCT",
    "WOULD_BLOCK",
    "Bio",
    "BioState",
    "Channel",
    "DaemonConnection",
    "Flag",
    "Header",
    "KernelError",
    "KernelTarget",
    "NbdAllocationFlag",
    "NbdCommand",
    "NbdCommandFlag",
    "NbdDisconnect",
    "NbdErrno",
    "NbdNegotiated",
    "NbdProtocolError",
    "NbdRefused",
    "NbdRequest",
    "NbdServerConnection",
    "OversizedRequest",
    "PoolLayout",
    "ProtocolError",
    "Request",
    "RequestType",
    "Response",
    "ResponseType",
    "SlotPool",
    "TransmissionFlag",
    "nbd_block_status_chunk",
    "nbd_data_chunk",
    "nbd_error_chunk",
    "nbd_simple_reply",
]
