"""The FUSE read handler against the bytes it serves: every offset and size around block edges and the end.

In process (the operation the FUSE session's READ runs, the real dispatcher
and memory backend); tests/fuzz/test_fuzz_fuse.py does the same through a
mount.
"""

from __future__ import annotations

import errno
import itertools

import pytest

from dmuserd.backends.memory import MemoryBackend
from dmuserd.daemon.direct import DirectDevice
from dmuserd.daemon.dispatcher import Dispatcher
from dmuserd.daemon.fuse import FuseMount, Operations
from dmuserd.daemon.config import ConfigError


async def _read(ops: Operations, fh: int, off: int, size: int) -> bytes:
    """What the READ answers: the backend's views (whole blocks) or bytes (anything else)."""
    data = await ops.read(fh, off, size)
    return b"".join(data) if isinstance(data, list) else bytes(data)


@pytest.mark.parametrize("block", [512, 4096])
async def test_reads_around_block_edges_and_the_end(tmp_path, block):
    size = 8 * block
    backend = MemoryBackend(size, block)
    content = bytes(i * 7 % 251 for i in range(size))
    await backend.write(0, content)
    dispatcher = Dispatcher(backend)
    mount = FuseMount(str(tmp_path / "mnt"))
    mount.add("disk", DirectDevice(dispatcher), size, block)
    ops = Operations(mount)
    (fh,) = ops.files
    edges = sorted({0, 1, block - 1, block, block + 1, 3 * block, size - block - 1, size - 1, size, size + 1})
    for off, length in itertools.product(edges, [0, 1, block - 1, block, block + 1, 2 * block, size, size + 7]):
        got = await _read(ops, fh, off, length)
        assert got == content[off : off + length], (off, length)
    reads = dispatcher.stats.requests["read"]
    assert await _read(ops, fh, 2 * block, 3 * block) == content[2 * block : 5 * block]
    assert dispatcher.stats.requests["read"] == reads + 1  # whole blocks: one request, as asked
    with pytest.raises(OSError) as info:
        await ops.read(fh + 99, 0, block)
    assert info.value.errno == errno.ENOENT


def test_a_size_off_the_block_size_is_refused(tmp_path):
    mount = FuseMount(str(tmp_path / "mnt"))
    device = DirectDevice(Dispatcher(MemoryBackend(4096, 512)))
    with pytest.raises(ConfigError, match="not a multiple of the block size 512"):
        mount.add("disk", device, 4096 + 100, 512)
