"""The guest side of ``test_ublk_vm.py``: real ublk devices served by ``dmuserd serve``, as root in the VM.

``python tests/vm/ublk_guest.py WORKDIR`` reads ``WORKDIR/plan.json`` (the
snapshot images made on the host), runs daemons with ``--export ublk:...``
and records what happened in ``WORKDIR/results.json`` after every step. It
asserts nothing: the host's tests do. Every wait is bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import dmuser_vm_lib as lib
from dmuser_guest import PY, Guest

SCRATCH = "/tmp/ublk"  # tmpfs: backing files off the 9p share
MNT = "/tmp/ublk-mnt"


def sha_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def queue_params(dev: str) -> dict:
    base = f"/sys/block/{os.path.basename(dev)}"
    names = ("logical_block_size", "physical_block_size", "max_sectors_kb", "write_cache", "fua",
             "discard_max_bytes", "write_zeroes_max_bytes", "nr_requests")
    out = {name: open(f"{base}/queue/{name}").read().strip() for name in names}
    out["ro"] = open(f"{base}/ro").read().strip()
    out["size"] = int(open(f"{base}/size").read()) * 512
    out["mq"] = sorted(os.listdir(f"{base}/mq"))
    return out


class UblkGuest(Guest):
    def serve(self, name: str, backend: str, export: str, *extra: str) -> dict:
        sock = f"/tmp/{name}.sock"
        self.start_daemon(name, ["serve", "--name", "disk", "--backend", backend, "--export", export, *extra,
                                 "--control-socket", sock], sock)
        return self.status(sock)

    def stop(self, name: str) -> int | None:
        proc = self.daemons.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            return None

    def ublk_cli(self, *argv: str) -> dict:
        """``dmuserd ublk ARGV``: its status, output and last error line (``list --json``: the devices, parsed)."""
        proc = self.sh(PY, "-m", "dmuserd", "ublk", *argv, timeout=180)
        out = {"rc": proc.returncode, "stdout": proc.stdout, "error": proc.stderr.strip().splitlines()[-1:]}
        if argv[:2] == ("list", "--json") and proc.returncode == 0:
            out["devices"] = json.loads(proc.stdout)
        return out

    def fio_verify(self, dev: str, size: str, *, background: bool = False, timeout: int = 900):
        """randwrite + verify, 2 jobs (one per CPU, so both queues serve), QD 16 each."""
        argv = ["fio", "--name=verify", f"--filename={dev}", "--rw=randwrite", "--bs=4k", f"--size={size}",
                "--numjobs=2", f"--offset_increment={size}", "--iodepth=16", "--ioengine=libaio", "--direct=1",
                "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--cpus_allowed=0-1",
                "--cpus_allowed_policy=split", "--verify_state_save=0", "--output-format=json"]
        if background:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return self.fio_report(proc.returncode, proc.stdout, proc.stderr)

    @staticmethod
    def fio_report(rc: int, stdout: str, stderr: str) -> dict:
        out = {"rc": rc, "stderr": stderr[-1500:]}
        try:
            report = json.loads(stdout[stdout.index("{"):])
            out["jobs"] = [{"error": j["error"], "write_ios": j["write"]["total_ios"],
                            "read_ios": j["read"]["total_ios"]} for j in report["jobs"]]
        except (ValueError, KeyError) as exc:
            out["parse_error"] = f"{exc}: {stdout[-500:]}"
        return out

    def filesystem(self, dev: str) -> dict:
        out = {}
        mkfs = self.sh("mkfs.ext4", "-q", "-F", dev)
        out["mkfs"] = [mkfs.returncode, mkfs.stderr[-500:]]
        os.makedirs(MNT, exist_ok=True)
        data = os.urandom(3 << 20)
        out["written"] = hashlib.sha256(data).hexdigest()
        out["mount"] = self.sh("mount", dev, MNT).returncode
        with open(f"{MNT}/file", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        out["umount"] = self.sh("umount", MNT).returncode
        out["remount"] = self.sh("mount", dev, MNT).returncode
        out["read_back"] = sha_file(f"{MNT}/file")
        out["umount2"] = self.sh("umount", MNT).returncode
        fsck = self.sh("e2fsck", "-fn", dev)
        out["fsck"] = [fsck.returncode, fsck.stdout[-1500:] + fsck.stderr[-500:]]
        return out

    # -- the steps ---------------------------------------------------------------

    def setup(self) -> None:
        os.makedirs(SCRATCH, exist_ok=True)
        for name in ("a.img", "b.img", "c.img"):
            with open(f"{SCRATCH}/{name}", "wb") as f:
                f.truncate(128 << 20)
        for name in ("base.img", "snap.cow"):
            shutil.copy(self.plan["snapshot"][name], f"{SCRATCH}/{name}")
        self.results["control_exists"] = os.path.exists("/dev/ublk-control")

    def file_backend(self) -> None:
        status = self.serve("d1", f"file:path={SCRATCH}/a.img", "ublk:0,queues=2,depth=16")
        out = self.results["file"] = {"status": status["targets"]["disk"]}
        out["params"] = queue_params("/dev/ublkb0")
        # the same ID again, from a second daemon: a clear error, the first one serves on
        taken = self.sh(PY, "-m", "dmuserd", "serve", "--backend", "memory:size=16M", "--export", "ublk:0",
                        "--control-socket", "/tmp/dx.sock", timeout=180)
        out["id_in_use"] = [taken.returncode, taken.stderr.strip().splitlines()[-1:] if taken.stderr else []]
        # dmuserd ublk list / del while the daemon serves: listed as served by it, not deleted
        out["pid"] = self.daemons["d1"].pid
        out["list"] = self.ublk_cli("list", "--json")
        out["list_text"] = self.ublk_cli("list")["stdout"]
        out["del_served"] = self.ublk_cli("del", "0")
        out["fs"] = self.filesystem("/dev/ublkb0")
        out["fio"] = self.fio_verify("/dev/ublkb0", "16M")
        out["status_after"] = self.status("/tmp/d1.sock")["targets"]["disk"]
        out["status_text"] = self.sh(PY, "-m", "dmuserd", "status", "--control-socket", "/tmp/d1.sock").stdout
        out["exit"] = self.stop("d1")
        out["gone_after_stop"] = {p: not os.path.exists(p) for p in ("/dev/ublkb0", "/dev/ublkc0", "/sys/block/ublkb0")}

    def snapshot_backend(self) -> None:
        status = self.serve("d2", f"snapshot:base={SCRATCH}/base.img,cow={SCRATCH}/snap.cow", "ublk")  # WHERE left out: a free ID
        target = status["targets"]["disk"]
        dev = target["exports"]["ublk"]
        out = self.results["snapshot"] = {"device": dev, "params": queue_params(dev)}
        out["device_sha"] = sha_file(dev)
        os.makedirs(MNT, exist_ok=True)
        out["mount"] = self.sh("mount", "-o", "ro,noload", dev, MNT).returncode
        out["files"] = {name: sha_file(f"{MNT}/{name}") for name in sorted(os.listdir(MNT)) if name != "lost+found"}
        out["umount"] = self.sh("umount", MNT).returncode
        fsck = self.sh("e2fsck", "-fn", dev)
        out["fsck"] = [fsck.returncode, fsck.stdout[-1500:] + fsck.stderr[-500:]]
        out["exit"] = self.stop("d2")
        out["gone_after_stop"] = not os.path.exists(dev)

    def recovery(self) -> None:
        args = (f"file:path={SCRATCH}/b.img", "ublk:1,queues=2,depth=16,recovery=1")
        out = self.results["recovery"] = {}
        out["status"] = self.serve("d3", *args)["targets"]["disk"]
        fio = self.fio_verify("/dev/ublkb1", "12M", background=True)
        deadline = time.monotonic() + 300
        written = 0
        while written < (4 << 20) and time.monotonic() < deadline and fio.poll() is None:
            time.sleep(0.2)
            written = self.status("/tmp/d3.sock")["targets"]["disk"]["bytes_written"]
        out["written_before_kill"] = written
        self.daemons["d3"].kill()
        self.daemons.pop("d3").wait(timeout=60)
        killed = time.monotonic()
        out["fio_alive_after_kill"] = fio.poll() is None
        status = self.serve("d4", *args)
        out["restart_s"] = round(time.monotonic() - killed, 1)
        out["status_after"] = status["targets"]["disk"]
        try:
            stdout, stderr = fio.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            fio.kill()
            stdout, stderr = fio.communicate()
        out["fio"] = self.fio_report(fio.returncode, stdout, stderr)
        out["served_by_new"] = self.status("/tmp/d4.sock")["targets"]["disk"]
        out["pid"] = self.daemons["d4"].pid
        out["exit"] = self.stop("d4")
        out["kept_after_stop"] = os.path.exists("/dev/ublkb1")
        # the kept device: listed as quiesced once the kernel noticed its daemon is gone, then deleted by hand
        deadline = time.monotonic() + 60
        while True:
            listed = self.ublk_cli("list", "--json")
            kept = [d for d in listed.get("devices", []) if d["id"] == 1]
            if time.monotonic() > deadline or (kept and kept[0]["state"] == "quiesced"):
                break
            time.sleep(0.5)
        out["list_kept"] = listed
        out["del_kept"] = self.ublk_cli("del", "1")
        out["gone_after_del"] = {p: not os.path.exists(p) for p in ("/dev/ublkb1", "/dev/ublkc1")}
        out["list_after_del"] = self.ublk_cli("list", "--json")
        out["del_again"] = self.ublk_cli("del", "1")

    def crash_without_recovery(self) -> None:
        """kill -9 without recovery: I/O fails (no hang), and a new daemon can have the ID again."""
        args = (f"file:path={SCRATCH}/c.img", "ublk:2")
        out = self.results["crash"] = {}
        self.serve("d6", *args)
        data = lib.pattern(lib.PATTERN_SEED, 64 * 1024)
        out["write"] = lib.direct_io("/dev/ublkb2", 0, len(data), data)
        self.daemons.pop("d6").kill()
        time.sleep(0.3)  # SIGKILL taken: the process is exiting (it ends once the kernel has stopped the device)
        thread, result = self.io_in_thread("/dev/ublkb2", 0, 4096)
        thread.join(timeout=120)
        out["read_after_kill"] = result if not thread.is_alive() else {"result": "hung"}
        started = time.monotonic()
        status = self.serve("d7", *args)
        out["restart_s"] = round(time.monotonic() - started, 1)
        out["endpoint"] = status["targets"]["disk"]["exports"]
        out["read_back"] = lib.direct_io("/dev/ublkb2", 0, len(data))
        out["want"] = lib.sha(data)
        out["exit"] = self.stop("d7")

    def bench(self) -> None:
        """The same memory target over ublk (fio libaio) and over the NBD export (fio's nbd engine)."""
        plan = self.plan.get("bench")
        if not plan:
            return
        status = self.serve("d5", "memory:size=256M", "ublk:auto", "--export", "nbd:/tmp/bench-nbd.sock")
        dev = status["targets"]["disk"]["exports"]["ublk"]
        out = self.results["bench"] = {"device": dev}
        common = ["--bs=4k", "--iodepth=16", "--direct=1", "--time_based", f"--runtime={plan['seconds']}",
                  "--size=256M", "--output-format=json", "--numjobs=1"]
        engines = {"ublk": ["--ioengine=libaio", f"--filename={dev}"],
                   "nbd": ["--ioengine=nbd", "--uri=nbd+unix:///?socket=/tmp/bench-nbd.sock"]}
        for rw in ("randread", "randwrite"):
            for name, engine in engines.items():
                proc = self.sh("fio", f"--name={name}-{rw}", f"--rw={rw}", *common, *engine, timeout=300)
                try:
                    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
                    side = job["read" if rw == "randread" else "write"]
                    out[f"{name}_{rw}"] = {"iops": round(side["iops"]), "error": job["error"]}
                except (ValueError, KeyError, IndexError) as exc:
                    out[f"{name}_{rw}"] = {"parse_error": f"{exc}: {proc.stdout[-300:]} {proc.stderr[-300:]}"}
        out["exit"] = self.stop("d5")

    def run(self) -> None:
        for name in ("setup", "file_backend", "snapshot_backend", "recovery", "crash_without_recovery", "bench"):
            self.step(name, getattr(self, name))
        for name in list(self.daemons):
            self.daemons.pop(name).kill()
        self.results["done"] = True
        self.save()


if __name__ == "__main__":
    UblkGuest(sys.argv[1]).run()
