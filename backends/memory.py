"""``memory``: a sparse RAM disk.

``--backend memory:size=1G``. Storage is allocated in 64 KiB chunks on first
write, so untouched (or discarded) regions cost no RAM and a device can be
as large as the address space while holding only what was written. Contents
vanish with the process; flush has nothing to do.

Each chunk is kept as a ``memoryview`` of its ``bytearray``: a read slices
it without copying and copies once, into the bytes it returns (or the
caller's buffer), and a read across chunks is one list of slices, joined;
``read_views`` hands the slices out uncopied.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Self, cast

from dmuserd.backends._api import Backend, Extent
from dmuserd.backends.options import size_and_block_size

if TYPE_CHECKING:
    from typing_extensions import Buffer

CHUNK = 64 * 1024
_ZERO_CHUNK = bytes(CHUNK)
_ZERO_VIEW = memoryview(_ZERO_CHUNK)


class MemoryBackend(Backend):
    name = "memory"

    def __init__(self, size: int, block_size: int = 512) -> None:
        super().__init__(size=size, block_size=block_size)
        self._chunks: dict[int, memoryview] = {}  # views of bytearray(CHUNK)

    @classmethod
    def from_options(cls, options: dict[str, str]) -> Self:
        return cls(*size_and_block_size(cls.name, options))

    @property
    def allocated_bytes(self) -> int:
        return len(self._chunks) * CHUNK

    def _spans(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(chunk index, start in chunk, end in chunk) covering the range."""
        end = offset + length
        while offset < end:
            index, start = divmod(offset, CHUNK)
            stop = min(CHUNK, start + end - offset)
            yield index, start, stop
            offset += stop - start

    async def read(self, offset: int, length: int) -> bytes:
        index, start = divmod(offset, CHUNK)
        if start + length <= CHUNK:  # the common case: one chunk
            chunk = self._chunks.get(index)
            return bytes(length) if chunk is None else bytes(chunk[start : start + length])
        # One copy into immutable bytes, which the dm-user model then takes
        # without copying again (and no zero-filled buffer to copy into).
        return b"".join(self._views(offset, length))

    async def read_views(self, offset: int, length: int) -> list[Buffer]:
        # The chunks themselves, no copy: an export hands them on at once.
        index, start = divmod(offset, CHUNK)
        if 0 < length <= CHUNK - start:  # the common case: one chunk
            return [self._chunks.get(index, _ZERO_VIEW)[start : start + length]]
        return cast("list[Buffer]", self._views(offset, length))

    async def readinto(self, offset: int, buffer: memoryview) -> None:
        index, start = divmod(offset, CHUNK)
        end = start + len(buffer)
        if end <= CHUNK:  # the common case: one chunk
            chunk = self._chunks.get(index)
            buffer[:] = _ZERO_VIEW[: end - start] if chunk is None else chunk[start:end]
            return
        pos = 0
        for piece in self._views(offset, len(buffer)):
            end = pos + len(piece)
            buffer[pos:end] = piece
            pos = end

    def _views(self, offset: int, length: int) -> list[memoryview]:
        """The range as slices of its chunks, in order (the zero chunk where none was written).

        The chunks in the middle are whole; only the first and the last are
        cut. (One list comprehension over chunk numbers: a 1 MiB READ takes
        16 chunks, and a loop over (index, start, stop) spans cost ~4x the
        Python steps.)
        """
        if not length:
            return []
        first, start = divmod(offset, CHUNK)
        end = start + length  # counted from the first chunk's start
        get = self._chunks.get
        views = [get(index, _ZERO_VIEW) for index in range(first, first + -(-end // CHUNK))]
        views[-1] = views[-1][: end - (len(views) - 1) * CHUNK]
        views[0] = views[0][start:]
        return views

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Never-written (or wholly zeroed) chunks are holes; a chunk written anywhere is data."""
        chunks = self._chunks
        end = offset + length
        out: list[Extent] = []
        while offset < end:
            index = offset // CHUNK
            stop = min((index + 1) * CHUNK, end)
            hole = index not in chunks
            if out and out[-1].hole is hole:
                out[-1] = Extent(out[-1].length + stop - offset, hole)
            else:
                out.append(Extent(stop - offset, hole))
            offset = stop
        return out

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        pos = 0
        for index, start, stop in self._spans(offset, len(view)):
            chunk = self._chunks.get(index)
            if chunk is None:
                chunk = self._chunks[index] = memoryview(bytearray(CHUNK))
            chunk[start:stop] = view[pos : pos + stop - start]
            pos += stop - start

    async def flush(self) -> None:
        pass

    async def discard(self, offset: int, length: int) -> None:
        self._zero(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self._zero(offset, length)

    def _zero(self, offset: int, length: int) -> None:
        for index, start, stop in self._spans(offset, length):
            if start == 0 and stop == CHUNK:
                self._chunks.pop(index, None)
            elif (chunk := self._chunks.get(index)) is not None:
                chunk[start:stop] = _ZERO_CHUNK[: stop - start]

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"allocated_bytes": self.allocated_bytes}
