"""The backend API: what a storage engineer implements.

A backend is an object with a ``size``, a logical block size and async
methods for the block operations it supports. Subclass :class:`Backend` and
override the operations you have; the ones you leave alone answer
UNSUPPORTED to the client, and :attr:`Backend.capabilities` is worked out
from what you overrode (narrow it with ``disabled_ops`` if needed).

A minimal backend::

    class Tiny(Backend):
        def __init__(self):
            super().__init__(size=1 << 20)
            self.buf = bytearray(self.size)

        async def read(self, offset, length):
            return self.buf[offset:offset + length]

        async def write(self, offset, data, fua=False):
            self.buf[offset:offset + len(data)] = data

The daemon guarantees every call is in range and aligned to
``block_size``; a backend never sees a request it must validate. Any
exception a call raises fails that one request (ERROR), except
:class:`Unsupported`, which answers UNSUPPORTED.

Durability: ``write(..., fua=True)`` must be durable when it returns, and
``flush()`` must make every write that completed before it durable.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from dmuserd.errors import DmuserdError

if TYPE_CHECKING:
    from typing_extensions import Buffer


class Op(enum.Enum):
    """A block operation a backend may support."""

    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    DISCARD = "discard"
    WRITE_ZEROES = "write_zeroes"


class Extent(NamedTuple):
    """A run of ``length`` bytes that is either data or a ``hole`` (not allocated: reads as zeros)."""

    length: int
    hole: bool


class BackendError(DmuserdError):
    """A backend could not be created or configured."""


class Unsupported(DmuserdError):
    """The backend does not do this operation (answered as UNSUPPORTED)."""


_METHOD_FOR_OP = {
    Op.READ: "read",
    Op.WRITE: "write",
    Op.FLUSH: "flush",
    Op.DISCARD: "discard",
    Op.WRITE_ZEROES: "write_zeroes",
}


class Backend:
    """Base class of every backend. See the module docstring."""

    #: registry name, e.g. ``"memory"``; set by subclasses.
    name: ClassVar[str] = ""
    #: Options a daemon-wide setting fills in when a target's spec leaves them
    #: out (``dmuserd serve --offload cpu`` sets ``offload`` for backends listing it).
    daemon_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, size: int, block_size: int = 512, disabled_ops: Iterable[Op] = ()) -> None:
        if size < 0:
            raise BackendError(f"size must not be negative (got {size})")
        if block_size < 512 or block_size & (block_size - 1):
            raise BackendError(f"block_size must be a power of two >= 512 (got {block_size})")
        if size % block_size:
            raise BackendError(f"size {size} is not a multiple of the block size {block_size}")
        self.size = size
        self.block_size = block_size
        self._disabled_ops = frozenset(disabled_ops)

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "Backend":
        """Build the backend from ``key=value`` options (command line or TOML).

        Subclasses that take options override this; see
        :func:`dmuserd.backends.options.Options` for typed parsing.
        """
        if options:
            raise BackendError(f"backend {cls.name!r} takes no options (got {', '.join(options)})")
        return cls()  # type: ignore[call-arg]  # a backend without options has a constructor without arguments

    @property
    def capabilities(self) -> frozenset[Op]:
        """The operations this backend serves: those its class overrides."""
        ops: set[Op] = set()
        for op, method in _METHOD_FOR_OP.items():
            if getattr(type(self), method) is not getattr(Backend, method):
                ops.add(op)
        return frozenset(ops) - self._disabled_ops

    def supports(self, op: Op) -> bool:
        return op in self.capabilities

    async def read(self, offset: int, length: int) -> Buffer:
        """Return ``length`` bytes (any bytes-like object) starting at ``offset``."""
        raise Unsupported("read")

    async def read_views(self, offset: int, length: int) -> list[Buffer]:
        """Return the ``length`` bytes at ``offset`` as a list of buffers, in order.

        For exports that hand the data on by scatter-gather (``sendmsg``,
        ``vmsplice``) instead of joining it into one buffer first. Override
        it where the data already lies in pieces (the ``memory`` backend's
        chunks): the buffers may then be views of the backend's own memory,
        so a write to that range that runs before they are sent shows in
        them. The caller sends them at once; a write that still gets in
        between was in flight together with this read, and the client may
        see either data then, as with any overlapping read and write. Each
        buffer's ``len()`` is its size in bytes (bytes, bytearray or a
        memoryview of format ``B``). The default is what :meth:`read`
        returns, as one byte buffer.
        """
        data = await self.read(offset, length)
        return [data if type(data) is bytes else memoryview(data).cast("B")]

    async def readinto(self, offset: int, buffer: memoryview) -> None:
        """Fill all of ``buffer`` (bytes) with the data at ``offset``, or raise.

        The daemon calls it where the export has the READ's destination
        already (the NBD export's shared slot), and layers above a backend
        use it to read into their own buffers. The default copies what
        :meth:`read` returns; override it where the data can land in
        ``buffer`` directly (``memory``: one copy from its chunks; ``file``:
        ``preadv`` into it) to save a copy and an allocation.
        """
        data = memoryview(await self.read(offset, len(buffer))).cast("B")
        if len(data) != len(buffer):
            raise BackendError(
                f"{type(self).__name__}.read returned {len(data)} bytes, {len(buffer)} were asked for"
            )
        buffer[:] = data

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """What of ``offset..offset+length`` is allocated: consecutive extents from ``offset``, in order.

        Optional, for exports that report allocation (NBD's ``base:allocation``
        block status: clients such as ``qemu-img convert`` then skip the
        holes). The extents may cover less than ``length`` (at least one
        block; the caller asks again from where they end), never more; each
        is whole blocks long, and a hole must read back as zeros. The
        default cannot tell, so all of it is data; ``memory`` reports its
        never-written chunks as holes.
        """
        return [Extent(length, False)]

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; durable before returning when ``fua``.

        ``data`` is any bytes-like object, valid only until this returns: it
        may be a view of memory the client reuses for its next request (the
        NBD export's shared slots), so copy what you keep.
        """
        raise Unsupported("write")

    async def flush(self) -> None:
        """Make every completed write durable."""
        raise Unsupported("flush")

    async def discard(self, offset: int, length: int) -> None:
        """The range's contents are no longer needed (may read back as anything)."""
        raise Unsupported("discard")

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """The range reads back as zeros; ``may_unmap`` allows deallocating it."""
        raise Unsupported("write_zeroes")

    async def close(self) -> None:
        """Release resources. Called once, after the last request."""

    def describe(self) -> dict[str, Any]:
        """A short description for ``dmuserd status`` and logs."""
        return {"backend": self.name, "size": self.size, "block_size": self.block_size}
