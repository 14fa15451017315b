"""The guest side of ``test_nbd_kernel_vm.py``: the kernel's NBD client on dmuserd's NBD exports, as root in the VM.

``python tests/vm/nbd_kernel_guest.py WORKDIR`` serves a memory backend with
``--export nbd:SOCKET,server=F`` for both fronts (``dmuserd``, ``nbdkit``),
attaches a ``/dev/nbdN`` to it with the userspace tool ``nbd-client``
(``-unix SOCKET``, block size 4096, two connections when the export
advertises CAN_MULTI_CONN), and records in ``WORKDIR/results.json`` what
each step gave: ext4 made, written, read back after a remount and checked
(``e2fsck -fn``), fio randwrite + crc32c verify on the raw device, a discard
and a zeroing (``blkdiscard``, ``blkdiscard -z``) and the requests the daemon
counted for them, ``nbd-client -d``, the daemon's stop. It asserts nothing:
the host's test does. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import sys
import time

import dmuser_vm_lib as lib
from ublk_guest import UblkGuest

FRONTS = {"dmuserd": "/dev/nbd0", "nbdkit": "/dev/nbd1"}
SIZE = 64 * lib.MiB
ZEROED_OFF, ZEROED_LEN = 4 * lib.MiB, lib.MiB  # written with a pattern, then blkdiscard -z


def queue_params(dev: str) -> dict:
    base = f"/sys/block/{os.path.basename(dev)}"
    names = ("logical_block_size", "write_cache", "fua", "discard_max_bytes", "write_zeroes_max_bytes")
    out = {name: open(f"{base}/queue/{name}").read().strip() for name in names}
    out["size"] = int(open(f"{base}/size").read()) * 512
    out["mq"] = sorted(os.listdir(f"{base}/mq"))
    return out


class NbdKernelGuest(UblkGuest):
    def disk(self, name: str) -> dict:
        return self.status(f"/tmp/{name}.sock")["targets"]["disk"]

    def kernel_log(self) -> list[str]:
        return [line for line in self.sh("dmesg").stdout.splitlines() if "nbd" in line][-30:]

    def front(self, server: str) -> None:
        dev = FRONTS[server]
        sock = f"/tmp/nbd-{server}.sock"
        uri = f"nbd+unix:///?socket={sock}"
        out = self.results[server] = {"device": dev}
        status = self.serve(server, f"memory:size={SIZE}", f"nbd:{sock},server={server}")
        out["status"] = status["targets"]["disk"]
        info = self.sh("nbdinfo", "--json", uri)
        out["nbdinfo"] = json.loads(info.stdout)["exports"][0] if info.returncode == 0 else info.stderr[-500:]
        out["connections"] = 2 if isinstance(out["nbdinfo"], dict) and out["nbdinfo"]["can_multi_conn"] else 1
        attach = self.sh("nbd-client", "-unix", sock, dev, "-block-size", "4096",
                         "-connections", str(out["connections"]), timeout=180)
        out["attach"] = [attach.returncode, (attach.stdout + attach.stderr)[-1000:]]
        if attach.returncode != 0:
            out["kernel_log"] = self.kernel_log()
            out["exit"] = self.stop(server)
            return
        out["params"] = queue_params(dev)
        out["export_status"] = self.disk(server)["export_status"]["nbd"]
        out["fs"] = self.filesystem(dev)
        out["fio"] = self.fio_verify(dev, "8M")
        # a pattern, then zeroed (write-zeroes if the kernel sends it, else written zeros), then read back
        out["pattern"] = self.direct_io(dev, ZEROED_OFF, ZEROED_LEN, lib.pattern(5, ZEROED_LEN))
        before = self.disk(server)
        zero = self.sh("blkdiscard", "-z", "-o", str(ZEROED_OFF), "-l", str(ZEROED_LEN), dev)
        out["zero"] = [zero.returncode, zero.stderr[-500:]]
        out["zeroed_read"] = self.direct_io(dev, ZEROED_OFF, ZEROED_LEN)
        discard = self.sh("blkdiscard", dev)
        out["discard"] = [discard.returncode, discard.stderr[-500:]]
        after = self.disk(server)
        out["requests_before"], out["requests_after"] = before["requests"], after["requests"]
        out["allocated"] = [before["allocated_bytes"], after["allocated_bytes"]]
        out["errors"] = after["errors"]
        out["check_before"] = self.sh("nbd-client", "-check", dev).returncode
        detach = self.sh("nbd-client", "-d", dev, timeout=120)
        out["detach"] = [detach.returncode, (detach.stdout + detach.stderr)[-500:]]
        deadline = time.monotonic() + 30
        while self.sh("nbd-client", "-check", dev).returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        out["check_after"] = self.sh("nbd-client", "-check", dev).returncode
        out["size_after"] = int(open(f"/sys/block/{os.path.basename(dev)}/size").read())
        # The server sees the kernel's close a moment after nbd-client does: wait for what is checked.
        export = self.disk(server)["export_status"]["nbd"]
        while export.get("connections") and time.monotonic() < deadline + 30:
            time.sleep(0.2)
            export = self.disk(server)["export_status"]["nbd"]
        out["connections_after"], out["memory_held_after"] = export.get("connections"), export.get("memory_held")
        out["exit"] = self.stop(server)
        out["kernel_log"] = self.kernel_log()

    def run(self) -> None:
        self.results["nbd_client"] = self.sh("nbd-client", "-V").stdout.strip()
        for server in FRONTS:
            self.step(server, lambda s=server: self.front(s))
        for name in list(self.daemons):
            self.daemons.pop(name).kill()
        self.results["done"] = True
        self.save()


if __name__ == "__main__":
    NbdKernelGuest(sys.argv[1]).run()
