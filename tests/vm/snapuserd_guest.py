"""The guest side of ``test_dmuser_snapuserd_vm.py``: libsnapshot's flow against dmuserd, as root in the VM.

``python tests/vm/snapuserd_guest.py WORKDIR`` reads ``WORKDIR/plan.json``
and lays the devices out as libsnapshot does for a partition that existed
before the update: the old partition (a loop device over ``base.img``)
mapped twice by dm-linear, ``<p>-src`` (what the snapshot reads) and
``<p>-base`` (what the merge writes); a dm-user table ``<p>-user-cow``
served by a ``dmuserd dm snapuserd`` daemon after ``init``/``start``. It
records the replies and what the devices read back in
``WORKDIR/results.json`` (after every step) and asserts nothing: the host
test does. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import dmuser_vm_lib as lib

PY = sys.executable
PARAM = "/sys/module/dm_user/parameters/dm_user_daemon_timeout_msec"
SOCK = "/tmp/snapuserd-vm.sock"


def sh(*argv, timeout=120, check=False) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=check)


def direct_io(device: str, offset: int, length: int, data: bytes | None = None) -> dict:
    """:func:`dmuser_vm_lib.direct_io`, with the first 16 bytes read (``head``)."""
    return lib.direct_io(device, offset, length, data, head=True)


class Guest(lib.Steps):
    def __init__(self, work: str) -> None:
        self.work = work
        with open(os.path.join(work, "plan.json")) as f:
            self.plan = json.load(f)["snapuserd"]
        self.results: dict = {"steps": [], "replies": []}
        self.daemon: subprocess.Popen | None = None
        self.loop = None

    def say(self, message: str, reply: bool = True, timeout: float = 60.0):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(SOCK)
            s.sendall(message.encode())
            answer = s.recv(512).decode() if reply else None
        self.results["replies"].append([message, answer])
        return answer

    # -- steps -----------------------------------------------------------------

    def setup(self) -> None:
        with open(PARAM, "w") as f:
            f.write(str(lib.LONG_TIMEOUT_MS))
        self.loop = sh("losetup", "--find", "--show", self.plan["base"], check=True).stdout.strip()
        sectors = self.plan["size"] // 512
        for name in ("snapt-src", "snapt-base"):
            sh("dmsetup", "create", name, "--table", f"0 {sectors} linear {self.loop} 0", check=True)
        log = open(os.path.join(self.work, "d-snapuserd.log"), "w")
        self.daemon = subprocess.Popen([PY, "-m", "dmuserd", "--log-level", "info", "dm", "snapuserd",
                                        "--socket", SOCK], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.daemon.returncode}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(SOCK)
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the daemon is not ready in 120 s")

    def libsnapshot_flow(self) -> None:
        plan, out = self.plan, self.results
        misc, size = "snapt-user-cow", plan["size"]
        self.say("query")
        self.say("supports,second_stage_socket_handoff")
        init = self.say(f"init,{misc},{plan['cow']},/dev/mapper/snapt-src,/dev/mapper/snapt-base")
        sectors = int(init.split(",")[1]) if init.startswith("success,") else 0
        if sectors:
            sh("dmsetup", "create", misc, "--table", f"0 {sectors} user 0 {sectors} {misc}", check=True)
        self.say(f"start,{misc}")
        out["read_before_merge"] = direct_io(f"/dev/mapper/{misc}", 0, size)
        self.say("update-verify")
        self.say(f"initiate_merge,{misc}")
        percents = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            percent = self.say("merge_percent")
            percents.append(percent)
            if percent == "100.000000":
                break
            time.sleep(0.3)
        out["percents"] = percents
        self.say(f"getstatus,{misc}")
        out["read_after_merge"] = direct_io(f"/dev/mapper/{misc}", 0, size)
        # served from the merge device: a block written through <p>-base now reads back through the snapshot
        block = plan["marker_block"] * 4096
        out["marker_write"] = direct_io("/dev/mapper/snapt-base", block, 4096, b"\x5a" * 4096)
        out["marker_read"] = direct_io(f"/dev/mapper/{misc}", block, 4096)
        with open(plan["target"], "rb") as f:
            f.seek(block)
            original = f.read(4096)
        direct_io("/dev/mapper/snapt-base", block, 4096, original)
        # `delete` answers once the device is gone (libsnapshot's WaitForDeviceDelete, after it removed the
        # table); sent while the table is there, it waits and the device is served meanwhile
        pending: dict = {}
        waiter = threading.Thread(target=lambda: pending.update(reply=self.say(f"delete,{misc}")), daemon=True)
        waiter.start()
        time.sleep(1.0)
        out["read_during_delete"] = direct_io(f"/dev/mapper/{misc}", 0, size)
        out["delete_pending"] = waiter.is_alive()
        out["dmsetup_remove"] = sh("dmsetup", "remove", misc).returncode
        waiter.join(60)
        out["delete_reply"] = pending.get("reply")
        self.say(f"delete,{misc}")  # gone already: success
        out["loop_after_merge"] = direct_io(self.loop, 0, size)
        # `stop` ends the daemon once its devices are gone: a second device (merged already) is served till then
        misc2 = "snapt2-user-cow"
        init = self.say(f"init,{misc2},{plan['cow']},/dev/mapper/snapt-src,/dev/mapper/snapt-base")
        sectors = int(init.split(",")[1]) if init.startswith("success,") else 0
        if sectors:
            sh("dmsetup", "create", misc2, "--table", f"0 {sectors} user 0 {sectors} {misc2}", check=True)
        self.say(f"start,{misc2}")
        self.say("stop", reply=False)
        time.sleep(1.0)
        out["read_after_stop"] = direct_io(f"/dev/mapper/{misc2}", 0, size)
        out["alive_after_stop"] = self.daemon.poll() is None
        out["dmsetup_remove2"] = sh("dmsetup", "remove", misc2).returncode
        try:
            out["exit"] = self.daemon.wait(60)
        except subprocess.TimeoutExpired:
            out["exit"] = "hung"
        out["remove_base"] = sh("dmsetup", "remove", "snapt-base").returncode
        out["remove_src"] = sh("dmsetup", "remove", "snapt-src").returncode

    def cleanup(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
        for name in ("snapt-user-cow", "snapt2-user-cow", "snapt-base", "snapt-src"):
            sh("dmsetup", "remove", "--force", name)
        if self.loop:
            sh("losetup", "-d", self.loop)

    def run(self) -> None:
        self.step("setup", self.setup)
        self.step("libsnapshot_flow", self.libsnapshot_flow)
        self.step("cleanup", self.cleanup)
        self.results["done"] = True
        self.save()


if __name__ == "__main__":
    Guest(sys.argv[1]).run()
