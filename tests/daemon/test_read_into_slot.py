"""A READ's data read by the backend straight into its destination (the NBD export's shared slot).

:meth:`DaemonConnection.destination` names a slotted READ's slot; the
dispatcher hands it to :meth:`Backend.readinto`; the answer's data is that
very view, so :meth:`DaemonConnection.send_response` copies nothing. The
built-in ``memory`` and ``file`` backends fill the slot themselves (chunks,
never-written ranges, ``preadv``, ``O_DIRECT`` into page-aligned and into
unaligned memory); a backend without ``readinto`` gets the default (a copy
of ``read``), and one whose ``read`` returns the wrong size fails that
request with ERROR and leaves the slot free.
"""

from __future__ import annotations

import mmap
import os
import random
import struct

import pytest
from dmuserd.backends import Backend
from dmuserd.backends.file import FileBackend
from dmuserd.backends.memory import CHUNK, MemoryBackend
from dmuserd.daemon.dispatcher import Dispatcher
from dmuserd.protocol import (
    NO_SLOT,
    SLOT_STRUCT,
    DaemonConnection,
    Flag,
    PoolLayout,
    Request,
    RequestType,
    Response,
    ResponseType,
    SlotPool,
)

SLOT = 256 * 1024
SLOTS = 2
_HEADER = struct.Struct("<5Q")  # dm-user's header, packed independently of the library


def pack(seq: int, type_: int, flags: int, sector: int, length: int) -> bytes:
    return _HEADER.pack(seq, type_, flags, sector, length)


def pattern(length: int, salt: int) -> bytes:
    return random.Random(salt).randbytes(length)


def _slotted(conn: DaemonConnection, seq: int, kind: RequestType, offset: int, length: int, slot: int) -> Request:
    conn.receive_data(pack(seq, kind, 0, offset // 512, length) + SLOT_STRUCT.pack(slot))
    request = conn.next_event()
    assert isinstance(request, Request)
    return request


@pytest.fixture
def memory():
    return mmap.mmap(-1, SLOTS * SLOT)  # page-aligned, as the export's memfd pool


@pytest.fixture
def pool(memory):
    return SlotPool(memory, PoolLayout(SLOTS, SLOT))


async def test_a_slotted_read_is_read_into_its_slot_and_answered_without_a_copy(memory, pool):
    backend = MemoryBackend(1 << 20)
    data = pattern(3 * CHUNK, 5)
    await backend.write(CHUNK // 2, data)
    conn = DaemonConnection(pool=pool)
    # Across chunks, a never-written chunk included (the range runs past what was written).
    request = _slotted(conn, 1, RequestType.READ, CHUNK, 4 * CHUNK, slot=1)
    into = conn.destination(request)
    assert into is not None and len(into) == 4 * CHUNK
    memory[SLOT:2 * SLOT] = b"\xee" * SLOT  # stale bytes the read must overwrite
    response = await Dispatcher(backend).handle(request, True, into)
    assert response.type == ResponseType.SUCCESS and response.payload is into
    assert conn.send_response(response) == [pack(1, ResponseType.SUCCESS, 0, CHUNK // 512, 4 * CHUNK)]
    expected = (data + bytes(4 * CHUNK))[CHUNK // 2:CHUNK // 2 + 4 * CHUNK]
    assert memory[SLOT:SLOT + 4 * CHUNK] == expected
    assert pool.busy == 0


async def test_no_destination_without_a_slot_or_for_a_write(pool):
    conn = DaemonConnection(pool=pool)
    plain = _slotted(conn, 1, RequestType.READ, 0, 4096, slot=NO_SLOT)
    write = _slotted(conn, 2, RequestType.WRITE, 0, 4096, slot=0)
    assert conn.destination(plain) is None
    assert conn.destination(write) is None
    assert DaemonConnection().destination(Request(3, RequestType.READ, Flag(0), 0, 4096)) is None


async def test_answer_data_from_elsewhere_is_still_copied_into_the_slot(memory, pool):
    conn = DaemonConnection(pool=pool)
    request = _slotted(conn, 4, RequestType.READ, 0, 8192, slot=0)
    data = pattern(8192, 9)
    assert conn.send_response(Response(request.seq, ResponseType.SUCCESS, data)) == [
        pack(4, ResponseType.SUCCESS, 0, 0, 8192)]
    assert memory[:8192] == data and pool.busy == 0


@pytest.mark.parametrize("direct", [False, True])
async def test_the_file_backend_preads_into_the_buffer(tmp_path, direct):
    path = tmp_path / "disk.img"
    data = pattern(1 << 20, 3)
    path.write_bytes(data)
    try:
        backend = FileBackend(str(path), direct=direct)
    except Exception as exc:  # noqa: BLE001 - tmpfs refuses O_DIRECT
        pytest.skip(f"O_DIRECT is not available on {tmp_path}: {exc}")
    try:
        aligned = memoryview(mmap.mmap(-1, 1 << 20))
        await backend.readinto(4096, aligned[:512 * 1024])
        assert aligned[:512 * 1024] == data[4096:4096 + 512 * 1024]
        unaligned = memoryview(bytearray(8192 + 512))[512:]  # not page-aligned: the O_DIRECT fallback
        await backend.readinto(8192, unaligned)
        assert unaligned == data[8192:16384]
    finally:
        await backend.close()


async def test_the_file_backend_reads_zeros_past_a_short_file(tmp_path):
    path = tmp_path / "short.img"
    path.write_bytes(pattern(4096, 1))
    backend = FileBackend(str(path), size=16384)
    os.truncate(path, 4096)  # shorter than the size the backend serves
    try:
        buffer = memoryview(bytearray(b"\xff" * 16384))
        await backend.readinto(0, buffer)
        assert buffer[:4096] == pattern(4096, 1) and buffer[4096:] == bytes(12288)
    finally:
        await backend.close()


class _ReadOnly(Backend):
    """A backend with ``read`` alone (no ``readinto``); ``short`` makes it return too little."""

    name = "read-only"

    def __init__(self, short: bool) -> None:
        super().__init__(size=1 << 20)
        self.short = short

    async def read(self, offset: int, length: int) -> bytes:
        return pattern(length - 512 if self.short else length, offset)


async def test_a_backend_without_readinto_gets_a_copy_and_a_wrong_size_fails_that_request(memory, pool):
    conn = DaemonConnection(pool=pool)
    request = _slotted(conn, 1, RequestType.READ, 4096, 4096, slot=0)
    response = await Dispatcher(_ReadOnly(short=False)).handle(request, False, conn.destination(request))
    assert response.type == ResponseType.SUCCESS
    conn.send_response(response)
    assert memory[:4096] == pattern(4096, 4096)
    request = _slotted(conn, 2, RequestType.READ, 0, 4096, slot=0)
    dispatcher = Dispatcher(_ReadOnly(short=True))
    response = await dispatcher.handle(request, False, conn.destination(request))
    assert response.type == ResponseType.ERROR and dispatcher.stats.errors == 1
    conn.send_response(response)
    assert pool.busy == 0


@pytest.mark.parametrize("offset, length", [(0, 4096), (CHUNK - 4096, 4096), (CHUNK + 512, 8192), (3 * CHUNK, CHUNK)])
async def test_memory_readinto_within_one_chunk_written_or_not(offset, length):
    backend = MemoryBackend(1 << 20)
    data = pattern(2 * CHUNK, 8)
    await backend.write(0, data)  # chunks 0 and 1 written, 2 and up never
    buffer = memoryview(bytearray(b"\xee" * length))
    await backend.readinto(offset, buffer)
    assert buffer == (data + bytes(2 * CHUNK))[offset:offset + length]
    assert backend.allocated_bytes == 2 * CHUNK  # reading a hole allocates nothing
