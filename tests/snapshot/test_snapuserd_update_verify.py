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
        assert handler.verify == "success"
        assert handler.verified_bytes == handler.backend.size == 700 * 4096
    status = daemon.status()["snapuserd"]["handlers"]["p1"]["verify"]
    assert status == {"state": "success", "bytes": 700 * 4096, "of": 700 * 4096, "error": None}
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
