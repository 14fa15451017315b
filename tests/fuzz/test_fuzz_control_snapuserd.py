"""Storms on the control socket in snapuserd's text protocol, against a served daemon (issue #21).

A connection whose first byte is not ``{`` speaks snapuserd's protocol
(daemon/snapuserd.py): comma-separated words, one message per ``recv()`` of
at most 512 bytes. The storm sends every command with every arity, empty
and huge fields, commas, NULs, paths that do not exist, are not snapshots,
are directories or devices, and real snapshot files (so ``init`` succeeds
and ``start``/``delete``/``getstatus``/``initiate_merge`` meet a real
handler). ``stop`` is never sent: it stops the daemon, as snapuserd's does.
"""

from __future__ import annotations

import socket
import struct

from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_lib import HANG_SECONDS, Hang, connect, exchange, storm_settings

OPS = ["query", "init", "start", "delete", "supports", "getstatus", "initiate_merge", "merge_percent",
       "pause_merge", "resume_merge", "detach", "update-verify", "", "INIT", " query", "query ", "init\x00", "quer",
       "supports\r\n", "getstatus\n"]
MISC = ["snap_a", "snap_b", "disk", "snap", "a/b", "", ".", "..", "-", "x" * 128, "snap\x00a", "é", "a b",
        "/dev/dm-user/snap_a", "control.sock"]
FEATURES = ["second_stage_socket_handoff", "", "second_stage_socket_handoff\x00", "x" * 300]


def _is_stop(message: bytes) -> bool:
    first = message.split(b",", 1)[0].strip(b" \t\r\n\x00").lower()
    return first == b"stop" or first.startswith(b"stop")


def _paths(files: dict, workdir: str) -> st.SearchStrategy[str]:
    real = [str(files[k]) for k in ("cow", "base", "other", "garbage", "empty", "target", "dir", "fifo")]
    hostile = ["", "/", "/nonexistent/x.cow", "relative.cow", "/dev/null", "/dev/zero", "/proc/self/status",
               "/dev/dm-user/nope", "a\x00b", "/" + "n" * 5000, workdir, str(files["cow"]) + "\x00"]
    return st.one_of(st.sampled_from(real + hostile), st.text(max_size=20))


def messages(files: dict, workdir: str):
    """One snapuserd message: a command and 0..6 fields, or raw bytes."""
    path = _paths(files, workdir)
    field = st.one_of(path, st.sampled_from(MISC + FEATURES), st.text(max_size=12))
    init_like = st.builds(lambda m, c, b, base: f"init,{m},{c},{b},{base}",
                          st.sampled_from(MISC[:4]), path, path, path)
    worded = st.builds(lambda op, fields: ",".join([op, *fields]),
                       st.sampled_from(OPS), st.lists(field, max_size=6))
    per_handler = st.builds(lambda op, m: f"{op},{m}",
                            st.sampled_from(["start", "delete", "getstatus", "initiate_merge"]),
                            st.sampled_from(MISC[:4]))
    text = st.one_of(init_like, init_like, worded, per_handler, st.sampled_from([",", ",,,,", "init,,,,",
                                                                                 "query,", "\n", "\x00"]))
    encoded = text.map(lambda t: t.encode("utf-8", "surrogatepass"))
    raw = st.binary(min_size=1, max_size=600)
    huge = st.builds(lambda op, n: op.encode() + b"," + b"A" * n, st.sampled_from(["init", "getstatus", "query"]),
                     st.sampled_from([500, 505, 511, 512, 513, 4096, 70_000]))
    return st.one_of(encoded, encoded, encoded, raw, huge).filter(lambda m: m and not _is_stop(m))


@st.composite
def conversations(draw, files: dict, workdir: str):
    """One connection: messages sent one at a time, then an ending.

    Each message up to 512 bytes waits for its reply before the next goes
    (snapuserd's framing is one ``recv()``); a longer message, raw bytes or
    ``detach`` (no reply) ends the conversation, as the daemon would read
    anything after it together with it.
    """
    msgs = draw(st.lists(messages(files, workdir), min_size=1, max_size=6))
    if msgs[0].startswith(b"{"):
        msgs[0] = b"q" + msgs[0]
    end = draw(st.sampled_from(["shutdown", "shutdown", "close", "reset"]))
    return msgs, end


def _say_all(daemon, msgs, end) -> None:
    """Send the messages one per round trip; every reply is printable ASCII."""
    sock = connect(daemon.control)
    replies = bytearray()
    try:
        for i, message in enumerate(msgs):
            last = i == len(msgs) - 1 or len(message) > 512 or message.split(b",")[0] == b"detach"
            try:
                sock.sendall(message)
            except (BrokenPipeError, ConnectionResetError):
                break  # closed on us (after "fail" to an unknown request, say)
            if last:
                break
            try:
                reply = sock.recv(4096)  # one reply per message up to 512 bytes
            except ConnectionResetError:
                break
            except socket.timeout:
                raise Hang(f"no reply to {message[:80]!r} in {HANG_SECONDS:g} s") from None
            if not reply:
                break
            replies += reply
        if end == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif end == "shutdown":
            sock.shutdown(socket.SHUT_WR)
            while True:
                try:
                    chunk = sock.recv(4096)
                except ConnectionResetError:
                    break
                except socket.timeout:
                    raise Hang(f"a half-closed snapuserd connection was not closed in {HANG_SECONDS:g} s") from None
                if not chunk:
                    break
                replies += chunk
    finally:
        sock.close()
    # snapuserd's replies are short ASCII words (JSON only for "too many connections")
    assert replies.startswith(b'{"ok": false') or all(32 <= c < 127 for c in replies), bytes(replies[:200])


def _conversation(daemon, msgs, end) -> None:
    """One conversation, then the handlers it may have made are deleted (each example starts afresh)."""
    _say_all(daemon, msgs, end)
    _say_all(daemon, [f"delete,{misc}".encode() for misc in MISC[:4]], "shutdown")


def test_control_snapuserd_storm(control_daemon, snapshot_files):
    daemon = control_daemon
    before = daemon.rejected()
    files = snapshot_files
    cow, base = files["cow"], files["base"]

    @storm_settings(ci=200, fuzz=3000)
    @given(conversations(files, str(daemon.workdir)))
    @example(([f"init,snap_a,{cow},{base},{base}".encode(), b"getstatus,snap_a", b"start,snap_a",
               b"initiate_merge,snap_a", b"merge_percent", b"delete,snap_a"], "shutdown"))
    @example(([f"init,snap_a,{cow}\x00,{base},".encode()], "shutdown"))  # a NUL in a path
    @example(([f"init,snap_a,{cow},{base},{base}\x00".encode()], "shutdown"))
    @example(([f"init,snap_a,{files['fifo']},{base},".encode(), b"getstatus,snap_a"], "shutdown"))  # a named pipe
    @example(([f"init,snap_a,{cow},{files['dir']},".encode()], "shutdown"))  # a directory as the base
    @example(([b"init,snap_a,,,"], "shutdown"))
    @example(([b"frobnicate"], "shutdown"))  # unknown: "fail", then closed
    @example(([b"query," + b"A" * 70_000], "shutdown"))
    def storm(conversation):
        msgs, end = conversation
        daemon.run_example(_conversation, daemon, msgs, end)

    storm()
    # Whatever the storm did, the handlers it left can be deleted and the
    # daemon still answers as snapuserd does.
    received, _ = exchange(daemon.control, [b"query"])
    assert received in (b"active", b"passive"), received
    daemon.check_after_storm(surfaces=("control-snapuserd",), before=before)
