"""DirectDevice, FUSE's default device: one typed request to the dispatcher per block I/O.

Real parts (a dispatcher over a memory backend); what a caller (the FUSE
export) gets back: a READ's data, None otherwise, and ``OSError(EIO)``
naming the request when it fails, or that the target is stopping when the
dispatcher's admission is closed.
"""

from __future__ import annotations

import errno

import pytest

from dmuserd.backends.memory import MemoryBackend
from dmuserd.daemon.direct import DirectDevice
from dmuserd.daemon.dispatcher import Dispatcher
from dmuserd.protocol import Flag, RequestType

R, W, FLUSH = RequestType.READ, RequestType.WRITE, RequestType.FLUSH


def _device(size: int = 1 << 20) -> DirectDevice:
    return DirectDevice(Dispatcher(MemoryBackend(size), name="d"))


async def test_read_write_flush_answers():
    dev = _device()
    assert await dev.submit(W, 8192, 4096, data=b"x" * 4096, flags=Flag.FUA) is None
    assert bytes(await dev.submit(R, 8192, 4096)) == b"x" * 4096
    assert await dev.submit(W, 0, 0, data=b"", flags=Flag.PREFLUSH) is None  # the 6.1 kernel's flush
    stats = dev.dispatcher.stats
    assert stats.requests["write"] == 1 and stats.requests["read"] == 1 and stats.requests["flush"] == 1
    assert stats.in_flight == 0


async def test_a_failed_request_is_eio_naming_it_and_the_device_goes_on():
    dev = _device()
    with pytest.raises(OSError) as failed:
        await dev.submit(R, 1 << 20, 4096)  # beyond the end
    assert failed.value.errno == errno.EIO
    assert f"READ at {1 << 20}+4096" in str(failed.value) and "ERROR" in str(failed.value)
    assert dev.dispatcher.stats.errors == 1
    assert bytes(await dev.submit(R, 0, 512)) == bytes(512)


async def test_after_admission_closed_io_is_eio_saying_the_target_stops():
    dev = _device()
    dev.dispatcher.close_admission()
    dev.stop_admitting()
    for kind, length in ((R, 4096), (W, 4096), (FLUSH, 0)):
        with pytest.raises(OSError) as refused:
            await dev.submit(kind, 0, length, data=bytes(length) if kind == W else None)
        assert refused.value.errno == errno.EIO and "stopping" in str(refused.value)
    assert dev.dispatcher.stats.refused == 3 and dev.dispatcher.drained.is_set()
