"""snapuserd's ``update-verify``: every block of each started device read through the snapshot.

In-process: the handlers are made as ``init`` makes them and marked started
(attaching needs a dm-user kernel: ``tests/vm/test_dmuser_snapuserd_vm.py``
drives the same through the real socket and device).
"""

from __future__ import annotations

import os

import pytest
import trio

from merge_testlib import torture_cow
from dmuserd.daemon import snapuserd
from dmuserd.daemon.config import DaemonSpec
from dmuserd.daemon.runtime import Daemon
from dmuserd.snapshot.backend import SnapshotBackend


@pytest.fixture
async def daemon(nursery, tmp_path):
    d = Daemon(DaemonSpec([]), control_socket=str(tmp_path / "snapuserd"))
    await nursery.start(d.run)
    yield d
    await d.stop()


def _cow(tmp_path, seed: int, nblocks: int) -> dict:
    where = tmp_path / f"c{seed}"
    where.mkdir()
    return torture_cow(where, seed, nblocks=nblocks)


def _handler(daemon, name: str, t: dict) -> snapuserd.Handler:
    backend = SnapshotBackend(t["base"], t["cow"], offload="cpu")
    handler = snapuserd.Handler(name, str(t["cow"]), str(t["base"]), str(t["base"]), backend, started=True)
    snapuserd.state_of(daemon).handlers[name] = handler
    return handler


async def _close(daemon) -> None:
    for handler in snapuserd.state_of(daemon).handlers.values():
        await handler.backend.close()


async def test_every_block_read_then_success(daemon, tmp_path):
    assert await snapuserd._update_verify(snapuserd.state_of(daemon)) == "success"  # no handler: as snapuserd
    handlers = [_handler(daemon, f"p{i}", _cow(tmp_path, i, 700)) for i in range(2)]
    for handler in handlers:
        snapuserd._start_verification(daemon, handler)
    reply, _ = await snapuserd.handle_message(daemon, b"update-verify")
    assert reply == "success"
    for handler in handlers:
        assert handler.verify == "success" and handler.hashtree == "none"  # no AVB footer
        assert handler.verified_bytes == handler.backend.size == 700 * 4096
    status = daemon.status()["snapuserd"]["handlers"]["p1"]["verify"]
    assert status == {"state": "success", "bytes": 700 * 4096, "of": 700 * 4096, "hashtree": "none", "error": None}
    await _close(daemon)


async def test_a_broken_cow_fails_and_says_why(daemon, tmp_path):
    t = _cow(tmp_path, 3, 600)
    handler = _handler(daemon, "broken", t)
    os.truncate(t["cow"], handler.backend.reader.header.header_size + 4096)  # op data gone
    snapuserd._start_verification(daemon, handler)
    assert await snapuserd._update_verify(snapuserd.state_of(daemon)) == "fail"
    assert handler.verify == "failed"
    assert "failed" in handler.verify_error and "read of" in handler.verify_error
    await _close(daemon)


async def test_not_started_or_resumed_handlers_fail(daemon, tmp_path):
    t = _cow(tmp_path, 4, 300)
    handler = _handler(daemon, "p", t)
    handler.started = False
    assert await snapuserd._update_verify(snapuserd.state_of(daemon)) == "fail"
    handler.started = True
    handler.backend.merge.merged_ops = 3  # a merge under way when the daemon started: snapuserd skips the scan
    snapuserd._start_verification(daemon, handler)
    assert handler.verify == "skipped"
    with trio.fail_after(snapuserd.VERIFY_WAIT / 2):  # a skipped handler is known at once: no waiting
        assert await snapuserd._update_verify(snapuserd.state_of(daemon)) == "fail"
    await _close(daemon)


async def test_supports_handoff_is_refused_until_it_exists(daemon):
    reply, keep_open = await snapuserd.handle_message(daemon, b"supports,second_stage_socket_handoff")
    assert (reply, keep_open) == ("fail", True)


# --- dm-verity: the AVB hashtree of the partition -------------------------------------------------------

BS = 4096


def _avb_partition(data: bytes, *, algorithm: str = "sha256", salt: bytes = bytes(range(32))) -> bytes:
    """``data`` with its hash tree, a vbmeta blob holding one hashtree descriptor and an AVB footer
    (the layout of ``avbtool add_hashtree_footer --do_not_generate_fec``, formats from avbtool)."""
    import struct

    from dmuserd.snapshot._avb_hashtree import FOOTER, HASHTREE
    from dmuserd.snapshot._verity import hash_tree

    blocks = len(data) // BS
    tree = hash_tree(lambda start, count: data[start * BS : (start + count) * BS], blocks, BS, algorithm, salt)
    digest = tree.root_digest[: __import__("hashlib").new(algorithm).digest_size]
    name = b"system"
    following = HASHTREE.size - 16 + len(name) + len(salt) + len(digest)
    padded = -(-following // 8) * 8
    desc = HASHTREE.pack(1, padded, 1, len(data), len(data), len(tree.tree), BS, BS, 0, 0, 0, algorithm.encode(),
                         len(name), len(salt), len(digest), 0, bytes(60)) + name + salt + digest
    desc += bytes(16 + padded - len(desc))
    aux = desc + bytes(-len(desc) % 64)
    header = (b"AVB0" + struct.pack(">IIQQI", 1, 0, 0, len(aux), 0) + struct.pack(">8Q", *[0] * 8)
              + struct.pack(">QQQII", 0, len(desc), 0, 0, 0) + bytes(48) + bytes(80))
    assert len(header) == 256
    vbmeta_offset = len(data) + len(tree.tree)
    body = data + tree.tree + header + aux
    size = -(-(len(body) + FOOTER.size) // BS) * BS + BS
    footer = FOOTER.pack(b"AVBf", 1, 0, len(data), vbmeta_offset, len(header) + len(aux), bytes(28))
    return body + bytes(size - len(body) - FOOTER.size) + footer


def _avb_snapshot(tmp_path, name: str, target: bytes, base: bytes) -> dict:
    from dmuserd.snapshot._cow_tools import create_cow

    where = tmp_path / name
    where.mkdir()
    (where / "base.img").write_bytes(base)
    (where / "target.img").write_bytes(target)
    create_cow(where / "base.img", where / "target.img", where / "t.cow", version=2, progress=False)
    return {"base": where / "base.img", "cow": where / "t.cow"}


def _old_and_new(seed: int) -> tuple[bytes, bytes]:
    import random

    rng = random.Random(seed)
    new = _avb_partition(rng.randbytes(300 * BS))
    old = bytearray(new)
    for block in range(0, len(old) // BS, 9):  # the old build differs in every 9th block
        old[block * BS : (block + 1) * BS] = rng.randbytes(BS)
    return bytes(old), new


async def test_hashtree_of_the_new_partition_matches(daemon, tmp_path):
    old, new = _old_and_new(1)
    handler = _handler(daemon, "system", _avb_snapshot(tmp_path, "ok", new, old))
    snapuserd._start_verification(daemon, handler)
    assert await snapuserd._update_verify(snapuserd.state_of(daemon)) == "success"
    assert handler.hashtree == "matched"
    await _close(daemon)


async def test_data_that_does_not_match_its_hashtree_fails(daemon, tmp_path):
    old, new = _old_and_new(2)
    bad = bytearray(new)
    bad[100 * BS + 7] ^= 0x40  # one bit of the data, the tree and vbmeta as built
    handler = _handler(daemon, "system", _avb_snapshot(tmp_path, "bad", bytes(bad), old))
    snapuserd._start_verification(daemon, handler)
    assert await snapuserd._update_verify(snapuserd.state_of(daemon)) == "fail"
    assert handler.verify == "failed" and "does not match its hashtree" in handler.verify_error
    await _close(daemon)


async def test_a_stored_tree_that_differs_fails(daemon, tmp_path):
    old, new = _old_and_new(3)
    bad = bytearray(new)
    bad[300 * BS + 5] ^= 1  # the stored tree's first block; data and root digest as built
    handler = _handler(daemon, "system", _avb_snapshot(tmp_path, "tree", bytes(bad), old))
    snapuserd._start_verification(daemon, handler)
    assert await snapuserd._update_verify(snapuserd.state_of(daemon)) == "fail"
    assert "hash tree stored" in handler.verify_error
    await _close(daemon)
