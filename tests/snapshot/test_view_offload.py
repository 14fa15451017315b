"""Serving a snapshot through the data mover: the bytes are the target's
whatever the engine (cpu, emulated), the emulator really moves them, and
``status`` shows the serving mover's counters."""

from __future__ import annotations

import os

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merge_testlib import torture_cow
from dmuserd.daemon.config import DaemonSpec, parse_target
from dmuserd.daemon.runtime import Daemon
from dmuserd.snapshot.backend import SnapshotBackend

SECTOR = 512


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two COW files with every op kind: v2 uncompressed, v3 lz4 with 4-block chunks."""
    out = {}
    for name, options in (("v2", {}), ("v3", {"version": 3, "compression": "lz4", "factor": 4 * 4096})):
        out[name] = torture_cow(tmp_path_factory.mktemp(name), 7, nblocks=384, **options)
    return out


def _reads(size: int):
    sectors = size // SECTOR
    one = st.integers(0, sectors - 1).flatmap(
        lambda start: st.tuples(st.just(start), st.integers(1, min(sectors - start, 2 * 256))))
    return st.lists(one, min_size=1, max_size=6)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_cpu_and_emulated_serving_equal_the_rendered_image(images, data):
    name = data.draw(st.sampled_from(sorted(images)))
    t = images[name]
    target = t["target_bytes"]
    reads = data.draw(_reads(len(target)))

    async def main():
        backends = [SnapshotBackend(t["base"], t["cow"], offload=engine) for engine in ("cpu", "emulated", "emulated")]
        backends[2].mover.threshold = 4096  # every block-sized piece goes to the emulated device
        try:
            for start, count in reads:
                offset, length = start * SECTOR, count * SECTOR
                want = target[offset : offset + length]
                for backend in backends:
                    got = await backend.read(offset, length)
                    assert bytes(got) == want, (backend.mover.engine, offset, length)
        finally:
            for backend in backends:
                await backend.close()

    trio.run(main)


async def test_emulated_serving_offloads_copies_and_fills(images):
    t = images["v3"]
    target = t["target_bytes"]
    backend = SnapshotBackend(t["base"], t["cow"], offload="emulated")
    try:
        for offset in range(0, len(target), 1 << 20):
            assert bytes(await backend.read(offset, min(1 << 20, len(target) - offset))) == target[offset : offset + (1 << 20)]
        stats = backend.describe()["mover"]
    finally:
        await backend.close()
    assert stats["engine"] == "emulated"
    assert stats["offloaded_bytes"] > 0 and stats["submitted"] > 0
    assert backend.mover.emulator.stats()["descriptors"] > 0


def test_a_dsa_engine_that_cannot_open_is_a_backend_error(images):
    from dmuserd.backends import BackendError
    from dmuserd.dsa_offload import open_mover

    try:
        open_mover("dsa").close()
        pytest.skip("this machine has a usable DSA work queue")
    except Exception:  # noqa: BLE001 - whatever the reason, the backend must say it
        pass
    t = images["v2"]
    with pytest.raises(BackendError, match="offload=dsa.*offload=auto"):
        SnapshotBackend(t["base"], t["cow"], offload="dsa")


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")
async def test_serve_offload_emulated_shows_the_serving_mover_in_status(images, tmp_path):
    t = images["v3"]
    target = t["target_bytes"]
    spec = DaemonSpec([parse_target("snap", f"snapshot:base={t['base']},cow={t['cow']}", [f"fuse:{tmp_path / 'fuse'}"])],
                      offload="emulated")
    daemon = Daemon(spec, control_socket=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        path = daemon.targets["snap"].endpoints["fuse"]

        def read_all():
            fd = os.open(path, os.O_RDONLY)
            try:
                return b"".join(os.pread(fd, 1 << 20, off) for off in range(0, len(target), 1 << 20))
            finally:
                os.close(fd)

        data = await trio.to_thread.run_sync(read_all)
        status = daemon.status()["targets"]["snap"]
        await daemon.stop()
    assert data == target
    mover = status["mover"]
    assert mover["engine"] == "emulated" and mover["offloaded_bytes"] > 0
