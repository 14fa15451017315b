"""Only the daemon's own user (or root) may open a channel to it.

The channel socket is 0600 in a 0700 directory, so another user cannot
even reach it; and a process of another uid that does reach it (here: one
keeping CAP_DAC_OVERRIDE, as a misconfigured helper might) is refused by
the SO_PEERCRED check, with a log line.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from nbd_harness import qemu_io

NOBODY = 65534
PYTHON = "/usr/bin/python3"

# Connect, send one READ request (a valid dm-user header), print what came back.
CLIENT = r"""
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("connect:", exc.errno); sys.exit(0)
try:
    s.sendall(struct.pack("<5Q", 7, 0, 0, 0, 4096))
    data = s.recv(8192)
    print("answer:", len(data))
except OSError as exc:
    print("closed:", exc.errno)
"""


def _as_nobody(socket_path, *caps: str) -> str:
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(PYTHON):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to act as another user")
    extra = [f"--inh-caps=+{c}" for c in caps] + [f"--ambient-caps=+{c}" for c in caps]
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *extra,
         PYTHON, "-c", CLIENT, str(socket_path)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_channel_from_another_uid_is_refused(nbd_session):
    daemon = nbd_session.start("memory:size=1M")
    channel = nbd_session.state_dir / "ch.sock"
    # Without privileges the path itself is closed to other users.
    assert _as_nobody(channel) == "connect: 13"  # EACCES
    # With CAP_DAC_OVERRIDE it connects, and the daemon hangs up unanswered.
    out = _as_nobody(channel, "dac_override")
    assert out in ("answer: 0", "closed: 32", "closed: 104"), out  # EOF, EPIPE or ECONNRESET: no answer
    refusals = [e for e in daemon.log_events()
                if e.get("event") == "input rejected" and e.get("reason") == "peer-not-allowed"]
    assert refusals and refusals[0]["peer_uid"] == NOBODY and refusals[0]["surface"] == "nbd-channel"
    assert daemon.status()["rejected_inputs"]["nbd-channel"]["peer-not-allowed"] == 1
    # The same request from root is answered (a 40-byte header, then the data).
    result = subprocess.run([PYTHON, "-c", CLIENT, str(channel)], capture_output=True, text=True, timeout=30)
    assert result.stdout.startswith("answer:") and int(result.stdout.split()[1]) >= 40, result
    # And the export still serves its real clients.
    qemu_io(nbd_session.uri, "write -P 0x9 0 4k", "read -P 0x9 0 4k")
