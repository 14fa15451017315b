"""snapuserd's text protocol on the control socket, on the host (no dm-user needed).

A real daemon (in this process) with a real Unix control socket; a client
speaking snapuserd's protocol over a plain socket, as Android tooling does.
What needs a dm-user kernel (``start``, merges of attached devices) is
checked in the VM by ``test_dmuser_vm.py``.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from dmuserd.daemon import snapuserd
from dmuserd.daemon.config import DaemonSpec
from dmuserd.daemon.runtime import Daemon

import dmuser_vm_lib as lib

SNAP_SIZE = 1 * lib.MiB


@pytest.fixture
def snapshot_files(tmp_path):
    from dmuserd.snapshot._cow_tools import create_cow

    base = lib.pattern(3, SNAP_SIZE)
    target = bytearray(base)
    target[8192:12288] = lib.pattern(4, 4096)
    (tmp_path / "base.img").write_bytes(base)
    (tmp_path / "target.img").write_bytes(target)
    create_cow(tmp_path / "base.img", tmp_path / "target.img", tmp_path / "s.cow", version=2, progress=False)
    return tmp_path / "base.img", tmp_path / "s.cow"


class Client:
    """A snapuserd client: one message per send, one reply per recv (as libsnapshot's)."""

    def __init__(self, path: str) -> None:
        self.sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        self.path = path

    async def connect(self) -> "Client":
        await self.sock.connect(self.path)
        return self

    async def say(self, message: str, reply: bool = True) -> str | None:
        await self.sock.send(message.encode())
        if not reply:
            return None
        with trio.fail_after(10):
            return (await self.sock.recv(512)).decode()

    async def closed_by_peer(self) -> bool:
        with trio.fail_after(10):
            return await self.sock.recv(512) == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def daemon(tmp_path, nursery):
    path = str(tmp_path / "ctl" / "snapuserd")
    d = Daemon(DaemonSpec([]), control_socket=path)
    await nursery.start(d.run)
    d.socket_path = path
    yield d
    await d.stop()


async def test_query_supports_percent_status(daemon):
    client = await Client(daemon.socket_path).connect()
    assert await client.say("query") == "active"
    assert await client.say("supports,second_stage_socket_handoff") == "fail"  # no handoff (yet)
    assert await client.say("update-verify") == "success"  # no handler: as snapuserd
    assert await client.say("supports,teleportation") == "fail"
    assert await client.say("merge_percent") == "0.000000"
    assert await client.say("getstatus,nothing") == "snapshot-merge-failed"
    assert await client.say("getstatus") == "snapshot-merge-failed"  # malformed
    assert await client.say("pause_merge") == "success"
    assert await client.say("resume_merge") == "success"
    assert await client.say("delete,never-made") == "success"  # as snapuserd: gone already
    assert await client.say("initiate_merge,never-made") == "fail"
    assert await client.say("start,never-made") == "fail"
    assert await client.say("query\n") == "active"  # a typed newline is forgiven
    client.close()


async def test_init_delete_and_failures(daemon, snapshot_files, tmp_path):
    base, cow = snapshot_files
    client = await Client(daemon.socket_path).connect()
    assert await client.say(f"init,snap_a,{cow},{base},{base}") == f"success,{SNAP_SIZE // 512}"
    assert await client.say(f"init,snap_a,{cow},{base},{base}") == "fail"  # exists
    assert await client.say("getstatus,snap_a") == "snapshot"
    assert await client.say("initiate_merge,snap_a") == "fail"  # not attached
    assert await client.say("merge_percent") == "0.000000"  # nothing attached: snapuserd says 0
    assert await client.say(f"init,snap_b,{tmp_path / 'nope.cow'},{base},{base}") == "fail"
    other = tmp_path / "other.img"
    other.write_bytes(base.read_bytes())
    # a merge device of its own (libsnapshot's <p>-base next to <p>-src): the same size, accepted
    assert await client.say(f"init,snap_c,{cow},{base},{other}") == f"success,{SNAP_SIZE // 512}"
    assert snapuserd.state_of(daemon).handlers["snap_c"].backend.describe()["base_merge"] == str(other)
    assert await client.say("delete,snap_c") == "success"
    short = tmp_path / "short.img"
    short.write_bytes(bytes(SNAP_SIZE - 4096))
    assert await client.say(f"init,snap_c,{cow},{base},{short}") == "fail"  # not the same blocks
    assert await client.say(f"init,a/b,{cow},{base},{base}") == "fail"  # not a dm name
    assert await client.say(f"init,snap_d,{cow},{base}") == "fail"  # malformed
    # start needs /dev/dm-user/snap_a; on this host there is none (the VM test attaches)
    if not os.path.exists("/dev/dm-user/snap_a"):
        assert await client.say("start,snap_a") == "fail"
        assert await client.say("getstatus,snap_a") == "snapshot-merge-failed"  # dropped: init again
        assert await client.say(f"init,snap_a,{cow},{base},{base}") == f"success,{SNAP_SIZE // 512}"
    assert await client.say("delete,snap_a") == "success"
    assert await client.say("getstatus,snap_a") == "snapshot-merge-failed"
    assert snapuserd.state_of(daemon).handlers == {}
    client.close()


async def test_unknown_request_fails_and_closes(daemon):
    client = await Client(daemon.socket_path).connect()
    assert await client.say("frobnicate,1,2") == "fail"
    assert await client.closed_by_peer()
    client.close()


async def test_json_lines_still_work_on_the_same_socket(daemon):
    def ask() -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(daemon.socket_path)
            s.sendall(b'{"cmd": "status"}\n{"cmd": "status"}\n')
            data = b""
            while data.count(b"\n") < 2:
                data += s.recv(65536)
            return [json.loads(line) for line in data.splitlines()]

    answers = await trio.to_thread.run_sync(ask)
    assert [a["ok"] for a in answers] == [True, True]
    assert answers[0]["status"]["targets"] == {}


async def test_detach_then_passive_and_stop_ends_the_daemon(tmp_path):
    path = str(tmp_path / "snapuserd")
    d = Daemon(DaemonSpec([]), control_socket=path)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            # no reply and no framing: a client sends nothing more on that connection
            for message, reply in (("query", "active"), ("detach", None), ("query", "passive"), ("stop", None)):
                client = await Client(path).connect()
                assert await client.say(message, reply=reply is not None) == reply
                client.close()
        # the nursery ends: the daemon's run returned after `stop`
    assert d.stopping


_MESSAGES = st.one_of(
    st.binary(max_size=512),
    st.lists(st.sampled_from(["query", "init", "start", "delete", "supports", "getstatus", "initiate_merge",
                              "merge_percent", "pause_merge", "resume_merge", "detach", "update-verify", "x", "",
                              "/dev/null",
                              "second_stage_socket_handoff", "a" * 100]),
             min_size=1, max_size=6).map(lambda words: ",".join(words).encode()),
)
_REPLIES = {"active", "passive", "success", "fail", "snapshot", "snapshot-merge", "snapshot-merge-complete",
            "snapshot-merge-failed", None}


@settings(max_examples=300, deadline=None)
@given(_MESSAGES)
def test_fuzz_any_message_gets_a_snapuserd_reply(message):
    async def main():
        with tempfile.TemporaryDirectory() as tmp:
            daemon = Daemon(DaemonSpec([]), control_socket=f"{tmp}/snapuserd")
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                reply, keep_open = await snapuserd.handle_message(daemon, message)
                await daemon.stop()
        assert len(reply or "") <= snapuserd.MAX_MESSAGE
        if reply is not None and not reply.startswith("success,"):
            try:
                float(reply)
            except ValueError:
                assert reply in _REPLIES, reply
        assert isinstance(keep_open, bool)

    trio.run(main)
