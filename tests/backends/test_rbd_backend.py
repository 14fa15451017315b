"""The rbd backend in process, against the local Ceph cluster (ceph_harness)."""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio

from dmuserd.backends import BackendError, Op, from_spec
from dmuserd.backends.rbd import HELD_OPS, RbdTimeout

MiB = 1 << 20


async def test_reads_writes_zeroes_discard_match_rbd_export(ceph_cluster, tmp_path):
    image = ceph_cluster.new_image("16M")
    backend = from_spec(ceph_cluster.spec(image))
    assert backend.size == 16 * MiB
    assert backend.capabilities == {Op.READ, Op.WRITE, Op.FLUSH, Op.DISCARD, Op.WRITE_ZEROES}
    model = bytearray(16 * MiB)
    rng = random.Random(25)
    try:
        # Many requests in flight at once, each answered through its own completion.
        async with trio.open_nursery() as nursery:
            for i in range(64):
                offset, data = i * 256 * 1024 + 512 * rng.randrange(8), rng.randbytes(4096 * rng.randrange(1, 16))
                model[offset:offset + len(data)] = data
                nursery.start_soon(backend.write, offset, data, i % 8 == 0)
        await backend.flush()
        await backend.write_zeroes(3 * MiB + 4096, 300 * 1024)
        model[3 * MiB + 4096:3 * MiB + 4096 + 300 * 1024] = bytes(300 * 1024)
        await backend.discard(8 * MiB, 4 * MiB)  # whole objects: deallocated, read back as zeros
        model[8 * MiB:12 * MiB] = bytes(4 * MiB)
        await backend.flush()
        got = bytearray()
        for offset in range(0, 16 * MiB, 4 * MiB):
            got += await backend.read(offset, 4 * MiB)
        assert got == model
        # What the rbd command reads is what we wrote.
        assert ceph_cluster.export(image, tmp_path / "x.img").read_bytes() == bytes(model)
        info = backend.describe()
        assert (info["pool"], info["image"]) == ("rbd", image)
        assert info["cluster"]["mon_host"].startswith("v2:127.0.0.1:")
        assert info["latency"]["write"]["count"] == 64
        assert info["latency"]["read"]["count"] == 4
        assert info["librbd_in_flight"] == 0 and info["timeouts"] == 0
        assert info["summary"].startswith(f"rbd rbd/{image} on cluster ")
    finally:
        await backend.close()


async def test_create_makes_a_missing_image_and_keeps_an_existing_one(ceph_cluster):
    name = f"created-{os.getpid()}"
    backend = from_spec(ceph_cluster.spec(name, create="8M"))
    try:
        assert backend.size == 8 * MiB
        await backend.write(MiB, b"\x5a" * 4096, fua=True)
    finally:
        await backend.close()
    again = from_spec(ceph_cluster.spec(name, create="32M"))  # exists: used as it is
    try:
        assert again.size == 8 * MiB
        assert await again.read(MiB, 4096) == b"\x5a" * 4096
    finally:
        await again.close()
    assert name in ceph_cluster.rbd("ls").stdout.split()


async def test_readonly_serves_reads_only(ceph_cluster):
    image = ceph_cluster.new_image("4M")
    backend = from_spec(ceph_cluster.spec(image, readonly="1"))
    try:
        assert backend.capabilities == {Op.READ, Op.FLUSH}
        assert await backend.read(0, 4096) == bytes(4096)
        with pytest.raises(OSError):
            await backend.write(0, b"x" * 512)  # librbd refuses it too (EROFS), should a caller try
    finally:
        await backend.close()


def test_errors_name_what_is_wrong_and_what_to_do(ceph_cluster, tmp_path):
    with pytest.raises(BackendError, match=r"no pool 'nopool'.*ceph osd pool create nopool"):
        from_spec(f"rbd:pool=nopool,image=x,conf={ceph_cluster.conf}")
    with pytest.raises(BackendError, match=r"no image 'missing' in pool 'rbd'.*create=SIZE"):
        from_spec(ceph_cluster.spec("missing"))
    with pytest.raises(BackendError, match=r"no Ceph configuration at .*nothere.conf"):
        from_spec(f"rbd:pool=rbd,image=x,conf={tmp_path}/nothere.conf")
    with pytest.raises(BackendError, match=r"timeout=soon is not a positive number"):
        from_spec(ceph_cluster.spec("x", timeout="soon"))
    with pytest.raises(BackendError, match=r"needs the option pool="):
        from_spec(f"rbd:image=x,conf={ceph_cluster.conf}")
    # A cluster nobody answers for: start-up fails, it does not hang.
    dead = tmp_path / "dead.conf"
    dead.write_text("[global]\nmon host = v2:127.0.0.1:9\nauth client required = none\n")
    with pytest.raises(BackendError, match=r"cannot connect to the cluster of .*dead.conf .* within 2s \(.*timed out"):
        from_spec(f"rbd:pool=rbd,image=x,conf={dead},connect_timeout=2")
    with pytest.raises(BackendError, match=r"connect_timeout=0 is not a positive number"):
        from_spec(ceph_cluster.spec("x", connect_timeout="0"))


async def test_unanswered_requests_fail_with_eio_and_the_backend_recovers(ceph_cluster, tmp_path):
    image = ceph_cluster.new_image("4M")
    backend = from_spec(ceph_cluster.spec(image, timeout="2"))
    data = random.Random(7).randbytes(64 * 1024)
    try:
        await backend.write(0, data, fua=True)
        with ceph_cluster.osd_paused():
            with pytest.raises(RbdTimeout) as caught:
                await backend.read(0, 64 * 1024)
            assert caught.value.errno == errno.EIO
            assert "not answered within 2s" in str(caught.value)
            # librbd's cache (writeback once flushed) takes the write; the flush waits for the OSD.
            await backend.write(4096, b"\1" * 4096)
            with pytest.raises(RbdTimeout, match="flush not answered"):
                await backend.flush()
            info = backend.describe()
            assert info["timeouts"] == 2 and info["timed_out_still_queued"] == 2
        # The OSD answers again: new requests succeed, the queued ones complete.
        assert await backend.read(0, 64 * 1024) is not None
        with trio.fail_after(60):
            while backend.describe()["timed_out_still_queued"]:
                await trio.sleep(0.1)
        got = await backend.read(0, 64 * 1024)
        assert got[:4096] == data[:4096] and got[8192:] == data[8192:]
        assert got[4096:8192] == b"\1" * 4096
        await backend.flush()
        stored = ceph_cluster.export(image, tmp_path / "x.img").read_bytes()
        assert stored[:64 * 1024] == got  # what the timed-out flush covered reached the OSD
    finally:
        await backend.close()


async def test_an_outage_under_many_requests_keeps_librbd_within_its_budget(ceph_cluster):
    """More requests than librbd may hold (HELD_OPS) while the OSD is frozen: the first
    HELD_OPS reach librbd, the rest wait in trio (the event loop keeps running: a submit
    never blocks in librbd's objecter), all fail with EIO after the timeout, and once the
    OSD is back librbd completes what it held and the budget is free again."""
    image = ceph_cluster.new_image("64M")
    backend = from_spec(ceph_cluster.spec(image, timeout="2"))
    extra = 100
    failures: list[str] = []
    seen_full = []

    async def reader(i: int) -> None:
        try:  # objects 0..14, none read before (librbd's cache knows nothing of them)
            await backend.read((i % 3840) * 4096, 4096)
        except RbdTimeout as exc:
            failures.append(str(exc))

    async def heartbeat() -> None:
        while True:
            await trio.sleep(0.05)
            seen_full.append(backend.describe()["librbd_held_ops"] == HELD_OPS)

    try:
        await backend.read(63 << 20, 4096)  # connected, the image open (object 15)
        with ceph_cluster.osd_paused():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(heartbeat)
                async with trio.open_nursery() as readers:
                    for i in range(HELD_OPS + extra):
                        readers.start_soon(reader, i)
                nursery.cancel_scope.cancel()
            assert len(failures) == HELD_OPS + extra
            assert sum("waiting behind" in f for f in failures) == extra
            assert any(seen_full)  # the loop ran while librbd held the whole budget
            info = backend.describe()
            assert info["librbd_held_ops"] == HELD_OPS and info["timed_out_still_queued"] == HELD_OPS
        with trio.fail_after(60):
            while backend.describe()["timed_out_still_queued"]:
                await trio.sleep(0.1)
        assert backend.describe()["librbd_held_ops"] == 0
        assert len(await backend.read(4096, 4096)) == 4096
    finally:
        await backend.close()


def test_native_queue_submits_and_collects_by_key(ceph_cluster):
    """backends/_rbd_native.c, the rbd backend's only I/O path: a submit returns 0 and the
    request comes back from reap() under its key with librbd's return value (the bytes read,
    or -errno); more finished requests than one rbd_poll_io_events batch come back at once."""
    import select

    from dmuserd.backends._librbd import Cluster, Queue

    image_name = ceph_cluster.new_image("4M")
    data = random.Random(9).randbytes(4 * MiB)
    cluster = Cluster(ceph_cluster.conf, "admin", 10)
    pool = cluster.open_pool(ceph_cluster.pool)

    def collect(io: Queue, eventfd: int, count: int) -> dict[int, int]:
        done: dict[int, int] = {}
        while len(done) < count:
            assert select.select([eventfd], [], [], 30)[0], f"only {len(done)} of {count} requests finished"
            done.update(io.reap())
        assert io.reap() == []  # the eventfd was reset: nothing more
        return done

    try:
        image = pool.open_image(image_name, readonly=False)
        try:
            assert isinstance(image.io, Queue)
            assert image.io.write(1, 0, data) == 0
            assert image.io.flush(2) == 0
            assert collect(image.io, image.eventfd, 2) == {1: 0, 2: 0}
            buffers = {key: bytearray(4096) for key in range(10, 210)}  # 200 > one batch of 64
            for key, buf in buffers.items():
                assert image.io.read(key, (key - 10) * 16384, buf) == 0
            assert image.io.read(300, image.size, bytearray(512)) == 0  # past the end: fails on completion
            done = collect(image.io, image.eventfd, len(buffers) + 1)
            assert done.pop(300) == -errno.EINVAL
            assert done == dict.fromkeys(buffers, 4096)
            for key, buf in buffers.items():
                assert buf == data[(key - 10) * 16384:(key - 10) * 16384 + 4096]
            assert image.io.write_zeroes(301, 0, 4096) == 0
            assert image.io.discard(302, MiB, MiB) == 0
            assert collect(image.io, image.eventfd, 2) == {301: 0, 302: 0}
            assert image.io.read(303, 0, buffers[10]) == 0 and image.io.read(304, MiB, buffers[11]) == 0
            assert collect(image.io, image.eventfd, 2) == {303: 4096, 304: 4096}
            assert buffers[10] == buffers[11] == bytes(4096)
        finally:
            image.close()
        readonly = pool.open_image(image_name, readonly=True)
        try:
            assert readonly.io.write(5, 0, b"x" * 512) == 0
            assert collect(readonly.io, readonly.eventfd, 1) == {5: -errno.EROFS}
        finally:
            readonly.close()
    finally:
        pool.close()
        cluster.close()


async def test_readinto_reuses_its_buffers_but_never_one_librbd_may_still_fill(ceph_cluster):
    """readinto reads into a buffer of the backend's, then copies: a read that timed out
    stays queued in librbd and fills that buffer later, so it must not be reused (and the
    caller's buffer is never handed to librbd)."""
    from dmuserd.backends.rbd import REUSE_BYTES, REUSE_MIN

    image = ceph_cluster.new_image("8M")
    backend = from_spec(ceph_cluster.spec(image, timeout="2"))
    data = random.Random(11).randbytes(8 * MiB)
    out = memoryview(bytearray(MiB))
    try:
        await backend.write(0, data, fua=True)
        for offset in (0, MiB):
            await backend.readinto(offset, out)
            assert out == data[offset:offset + MiB]
            assert len(backend._spare[MiB]) == 1  # the same buffer, back for the next read
        small = memoryview(bytearray(REUSE_MIN // 2))
        await backend.readinto(4 * MiB, small)
        assert small == data[4 * MiB:4 * MiB + len(small)] and len(small) not in backend._spare
        # Many other sizes (a client chooses them), ~48 MiB in all: what is kept stays within
        # REUSE_BYTES, all sizes together. None is MiB, so the MiB buffer kept above stays
        # (which sizes fill the rest depends on the order the cluster answers in).
        async with trio.open_nursery() as nursery:
            for i in range(48):
                nursery.start_soon(backend.readinto, 0, memoryview(bytearray(MiB + 512 * (i % 24 + 1))))
        assert sum(len(b) for kept in backend._spare.values() for b in kept) <= REUSE_BYTES
        assert len(backend._spare) > 2  # other sizes were kept too, up to the bound
        kept = list(backend._spare[MiB])
        assert len(kept) == 1
        with ceph_cluster.osd_paused():
            with pytest.raises(RbdTimeout):
                await backend.readinto(2 * MiB, out)
            assert backend._spare[MiB] == kept[:-1]  # librbd holds the last one: not kept
            assert out == data[MiB:2 * MiB]  # the caller's buffer untouched
        with trio.fail_after(60):
            while backend.describe()["timed_out_still_queued"]:
                await trio.sleep(0.1)
        assert backend._spare[MiB] == kept[:-1]
        await backend.readinto(3 * MiB, out)
        assert out == data[3 * MiB:4 * MiB]
    finally:
        await backend.close()
