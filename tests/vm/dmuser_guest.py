"""The guest side of the dm-user VM tests: run inside ``run-in-vm`` as root.

``python tests/vm/dmuser_guest.py WORKDIR`` reads ``WORKDIR/plan.json``,
runs real daemons (``python -m dmuserd``) against real dm-user tables and
writes what it observed to ``WORKDIR/results.json`` (after every step, so a
timeout still leaves the steps before it). It asserts nothing: the tests on
the host do. Every wait is bounded, so nothing here can hang the VM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import dmuser_vm_lib as lib

PY = sys.executable
PARAM = "/sys/module/dm_user/parameters/dm_user_daemon_timeout_msec"


class Guest(lib.Steps):
    def __init__(self, work: str) -> None:
        self.work = work
        with open(os.path.join(work, "plan.json")) as f:
            self.plan = json.load(f)
        self.results: dict = {"steps": []}
        self.daemons: dict[str, subprocess.Popen] = {}

    # -- bookkeeping ---------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.work, name)

    # -- tools ---------------------------------------------------------------

    @staticmethod
    def sh(*argv, timeout=120, check=False) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=check)

    @staticmethod
    def set_timeout(ms: int) -> None:
        with open(PARAM, "w") as f:
            f.write(str(ms))

    def dm_create(self, name: str, size: int) -> None:
        sectors = size // 512
        self.sh("dmsetup", "create", name, "--table", f"0 {sectors} user 0 {sectors} {name}", check=True)

    direct_io = staticmethod(lib.direct_io)

    def io_in_thread(self, *args, **kwargs):
        out: dict = {}

        def run():
            out.update(self.direct_io(*args, **kwargs))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, out

    def start_daemon(self, name: str, argv: list[str], socket_path: str, env: dict | None = None) -> None:
        try:
            os.unlink(socket_path)
        except FileNotFoundError:
            pass
        log = open(self.path(f"{name}.log"), "w")
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)), **(env or {}))
        proc = subprocess.Popen([PY, "-m", "dmuserd", "--log-level", "info", *argv],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        self.daemons[name] = proc
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon {name} exited with {proc.returncode}")
            if os.path.exists(socket_path):
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(socket_path)
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon {name} not ready in 120 s")

    @staticmethod
    def control(socket_path: str, message: bytes, *, reply=True, json_line=False, timeout=30.0):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.sendall(message)
            if not reply:
                return None
            if not json_line:
                return s.recv(512).decode()
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return json.loads(data)

    def status(self, socket_path: str) -> dict:
        return self.control(socket_path, b'{"cmd": "status"}\n', json_line=True)["status"]

    # -- the steps -------------------------------------------------------------

    def setup(self) -> None:
        self.set_timeout(lib.LONG_TIMEOUT_MS)
        for name, size in (("t1", lib.T1_SIZE), ("t3", lib.T3_SIZE), *lib.RAW_TABLES.items()):
            self.dm_create(name, size)
        made = self.sh(PY, "-m", "dmuserd", "dm", "create", "t2", "--size", str(lib.T2_SIZE))
        self.results["dm_create"] = [made.returncode, made.stdout.strip(), made.stderr[-500:]]
        with open(self.path("a.img"), "wb") as f:
            f.truncate(lib.T1_SIZE)
        with open(self.path("b.img"), "wb") as f:
            f.write(lib.pattern(lib.EARLY_SEED, lib.EARLY_LEN))
            f.truncate(lib.T2_SIZE)
        with open(self.path("d1.toml"), "w") as f:
            f.write(self._toml(stall=True, t2=False))
        with open(self.path("d2.toml"), "w") as f:
            f.write(self._toml(stall=False, t2=True))
        self.results["misc_devices"] = sorted(os.listdir("/dev/dm-user"))

    def _toml(self, *, stall: bool, t2: bool) -> str:
        stall_opts = f', stall = "{lib.STALL_OFF}+4K", marker = "{self.path("stall.marker")}"' if stall else ""
        text = (f'[targets.t1]\nbackend = {{ type = "dmuser_vm_backend:StallBackend", path = "{self.path("a.img")}", '
                f'fail = "{lib.FAIL_OFF}+4K"{stall_opts} }}\nexports = ["dm-user:t1,channels=4"]\n')
        if t2:
            text += f'[targets.t2]\nbackend = "file:path={self.path("b.img")}"\nexports = ["dm-user:t2"]\n'
            text += '[targets.t4]\nbackend = "memory:size=4M"\nexports = ["dm-user:t4,create=1"]\n'
        return text

    def start_d1(self) -> None:
        self.start_daemon("d1", ["serve", "--config", self.path("d1.toml"), "--control-socket", "/tmp/d1.sock"],
                          "/tmp/d1.sock")
        self.results["d1_status"] = self.status("/tmp/d1.sock")

    def filesystem(self) -> None:
        out = self.results["fs"] = {}
        mkfs = self.sh("mkfs.ext4", "-q", "-F", "/dev/mapper/t1")
        out["mkfs"] = [mkfs.returncode, mkfs.stderr[-500:]]
        os.makedirs("/tmp/mnt", exist_ok=True)
        mount = self.sh("mount", "/dev/mapper/t1", "/tmp/mnt")
        out["mount"] = [mount.returncode, mount.stderr[-500:]]
        files = {}
        for i in range(4):
            data = lib.pattern(100 + i, (i + 1) * 300 * 1024)
            with open(f"/tmp/mnt/file{i}", "wb") as f:
                f.write(data)
            files[f"file{i}"] = lib.sha(data)
        out["written"] = files
        out["umount"] = self.sh("umount", "/tmp/mnt").returncode
        self.sh("blockdev", "--flushbufs", "/dev/mapper/t1")
        self.sh("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        mount = self.sh("mount", "-o", "ro", "/dev/mapper/t1", "/tmp/mnt")
        out["read_back"] = {}
        if mount.returncode == 0:
            for name in files:
                with open(f"/tmp/mnt/{name}", "rb") as f:
                    out["read_back"][name] = lib.sha(f.read())
            self.sh("umount", "/tmp/mnt")
        fsck = self.sh("e2fsck", "-fn", "/dev/mapper/t1")
        out["fsck"] = [fsck.returncode, fsck.stdout[-1500:] + fsck.stderr[-500:]]

    def fio(self) -> None:
        plan = self.plan["fio"]
        proc = self.sh(
            "fio", "--name=verify", "--filename=/dev/mapper/t1", "--rw=randwrite", f"--bs={plan['bs']}",
            f"--size={plan['size']}", f"--numjobs={plan['jobs']}", "--offset_increment=16M", "--iodepth=8",
            "--ioengine=libaio", "--direct=1", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
            "--group_reporting=0", "--verify_state_save=0", "--output-format=json", timeout=plan["timeout"])
        out = self.results["fio"] = {"rc": proc.returncode, "stderr": proc.stderr[-1000:]}
        try:
            report = json.loads(proc.stdout[proc.stdout.index("{"):])
            out["jobs"] = [{"error": j["error"], "write_ios": j["write"]["total_ios"],
                            "read_ios": j["read"]["total_ios"]} for j in report["jobs"]]
        except (ValueError, KeyError) as exc:
            out["parse_error"] = f"{exc}: {proc.stdout[-500:]}"

    def cases_d1(self) -> None:
        c = self.results.setdefault("cases", {})
        data = lib.pattern(lib.PATTERN_SEED, lib.PATTERN_LEN)
        with open(self.path("pattern.bin"), "wb") as f:
            f.write(data)
        block = 64 * 1024
        dd_out = self.sh("dd", f"if={self.path('pattern.bin')}", "of=/dev/mapper/t1", f"bs={block}",
                         f"seek={lib.PATTERN_OFF // block}", "oflag=direct", "conv=notrunc", "status=none")
        dd_in = self.sh("dd", "if=/dev/mapper/t1", f"of={self.path('readback.bin')}", f"bs={block}",
                        f"skip={lib.PATTERN_OFF // block}", f"count={lib.PATTERN_LEN // block}",
                        "iflag=direct", "status=none")
        with open(self.path("readback.bin"), "rb") as f:
            back = f.read()
        ok = dd_out.returncode == 0 and dd_in.returncode == 0
        c["pattern_rw"] = {"result": "ok" if ok else f"dd:{dd_out.returncode}/{dd_in.returncode}",
                           "sha": lib.sha(back)}
        before = self.status("/tmp/d1.sock")["targets"]["t1"]["requests"]
        wrote = self.direct_io("/dev/mapper/t1", lib.DSYNC_OFF, lib.DSYNC_LEN,
                               lib.pattern(lib.DSYNC_SEED, lib.DSYNC_LEN), dsync=True)
        # read the backing file right after the write returned
        with open(self.path("a.img"), "rb") as f:
            f.seek(lib.DSYNC_OFF)
            landed = f.read(lib.DSYNC_LEN)
        after = self.status("/tmp/d1.sock")["targets"]["t1"]["requests"]
        c["dsync_durable"] = {"result": wrote["result"], "sha": lib.sha(landed)}
        self.results["dsync_requests"] = {k: after[k] - before[k] for k in after}
        c["failing_read"] = self.direct_io("/dev/mapper/t1", lib.FAIL_OFF, lib.PROBE_LEN)

    def kill_in_flight(self) -> None:
        c = self.results["cases"]
        thread, out = self.io_in_thread("/dev/mapper/t1", lib.STALL_OFF, lib.PROBE_LEN)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.path("stall.marker")) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.results["stall_reached"] = os.path.exists(self.path("stall.marker"))
        self.daemons["d1"].send_signal(signal.SIGKILL)
        self.daemons["d1"].wait(30)
        thread.join(60)
        c["killed_in_flight"] = dict(out) if not thread.is_alive() else {"result": "hung"}
        start = time.monotonic()
        c["after_kill_new_io"] = self.direct_io("/dev/mapper/t1", 0, lib.PROBE_LEN)
        self.results["after_kill_seconds"] = round(time.monotonic() - start, 2)

    def timeout_case(self) -> None:
        self.set_timeout(lib.SHORT_TIMEOUT_MS)
        try:
            thread, out = self.io_in_thread("/dev/mapper/t3", 0, lib.PROBE_LEN)
            thread.join(60)
            self.results["cases"]["no_daemon_timeout"] = dict(out) if not thread.is_alive() else {"result": "hung"}
        finally:
            self.set_timeout(lib.LONG_TIMEOUT_MS)

    @staticmethod
    def _read_headers(fd: int, count: int) -> list:
        """Read ``count`` request headers from a dm-user channel (in a thread: a read blocks)."""
        headers = []

        def run():
            while len(headers) < count:
                headers.append(struct.unpack("<5Q", os.read(fd, 40)))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(60)
        return headers

    @staticmethod
    def _answer_read(fd: int, seq: int, data: bytes) -> None:
        os.write(fd, struct.pack("<5Q", seq, 0, 0, 0, len(data)) + data)

    def kernel_limits(self) -> None:
        """Tables served by this script itself, no daemon: no cap on messages, per-message timers."""
        c = self.results["cases"]
        # beyond_reserve: a channel open first (no timers), then 200 reads at once
        fd = os.open("/dev/dm-user/t5", os.O_RDWR)
        reads = [self.io_in_thread("/dev/mapper/t5", i * lib.PROBE_LEN, lib.PROBE_LEN)
                 for i in range(lib.BEYOND_RESERVE)]
        headers = self._read_headers(fd, lib.BEYOND_RESERVE)
        for header in headers:
            self._answer_read(fd, header[0], bytes(header[4]))
        os.close(fd)  # (what was not taken or answered fails now)
        deadline = time.monotonic() + 60
        for thread, _ in reads:
            thread.join(max(deadline - time.monotonic(), 0))
        outcomes = {out.get("result", "hung") for _, out in reads}
        c["beyond_reserve"] = {"result": outcomes.pop() if len(outcomes) == 1 else sorted(outcomes),
                               "taken": len({h[0] for h in headers})}
        self.set_timeout(lib.SHORT_TIMEOUT_MS)
        try:
            # timer_per_message: two reads, no daemon, queued SECOND_AFTER apart
            first, first_out = self.io_in_thread("/dev/mapper/t6", 0, lib.PROBE_LEN)
            time.sleep(lib.SECOND_AFTER)
            second, second_out = self.io_in_thread("/dev/mapper/t6", lib.PROBE_LEN, lib.PROBE_LEN)
            first.join(30)
            pending = second.is_alive()
            second.join(30)
            c["timer_per_message"] = {"first": first_out.get("result", "hung"), "second_pending_then": pending,
                                      "second": second_out.get("result", "hung")}
            # spent_timer_not_rearmed: its timer fires while a channel is open; that channel closes
            thread, out = self.io_in_thread("/dev/mapper/t7", 0, lib.PROBE_LEN)
            time.sleep(lib.OPEN_AFTER)
            fd = os.open("/dev/dm-user/t7", os.O_RDWR)
            time.sleep(lib.HOLD_OPEN)
            os.close(fd)
            time.sleep(lib.CHECK_AFTER)
            pending = thread.is_alive()
            fd = os.open("/dev/dm-user/t7", os.O_RDWR)
            for header in self._read_headers(fd, 1):
                self._answer_read(fd, header[0], lib.pattern(lib.RAW_SEED, header[4]))
            thread.join(30)
            os.close(fd)
            c["spent_timer_not_rearmed"] = {"pending_after_close": pending, **out} if not thread.is_alive() else {
                "pending_after_close": pending, "result": "hung"}
        finally:
            self.set_timeout(lib.LONG_TIMEOUT_MS)

    def swap_case(self) -> None:
        """Swap on a dm-user device: every swap-out BIO carries REQ_SWAP, which dm-user kills.

        The guest serves T8 itself (mkswap and swapon read and write it as
        usual), then a process in a memory cgroup touches more memory than
        the cgroup may hold. Its swap-outs never reach the channel: the
        kernel logs "unsupported BIO type" for each, and the process is
        killed for lack of memory instead.
        """
        fd = os.open("/dev/dm-user/t8", os.O_RDWR)
        store = bytearray(lib.RAW_TABLES["t8"])
        messages: list = []

        def serve():  # ends when the table is removed (ENOTBLK) at cleanup
            try:
                while True:
                    seq, kind, flags, sector, length = struct.unpack("<5Q", os.read(fd, 40))
                    messages.append((kind, flags))
                    start = sector * 512
                    if kind == 1 and length:
                        data = bytearray()
                        while len(data) < length:
                            data += os.read(fd, length - len(data))
                        store[start : start + length] = data
                    payload = bytes(store[start : start + length]) if kind == 0 else b""
                    os.write(fd, struct.pack("<5Q", seq, 0, 0, 0, 0) + payload)
            except OSError:
                pass

        threading.Thread(target=serve, daemon=True).start()
        out = self.results["swap"] = {"mkswap": self.sh("mkswap", "/dev/mapper/t8").returncode,
                                      "swapon": self.sh("swapon", "/dev/mapper/t8").returncode}
        if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            self.sh("mount", "-t", "cgroup2", "none", "/sys/fs/cgroup", check=True)
        with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as f:
            f.write("+memory")
        os.makedirs("/sys/fs/cgroup/swaphog", exist_ok=True)
        with open("/sys/fs/cgroup/swaphog/memory.max", "w") as f:
            f.write(str(lib.SWAP_LIMIT))
        killed_before = self.sh("dmesg").stdout.count("unsupported BIO type")
        before = len(messages)
        hog = subprocess.Popen([PY, "-c", "import os\n"
                                "open('/sys/fs/cgroup/swaphog/cgroup.procs', 'w').write(str(os.getpid()))\n"
                                f"b = bytearray({lib.SWAP_HOG})\n"
                                "for i in range(0, len(b), 4096): b[i] = 1\n"])
        try:
            out["hog_exit"] = hog.wait(180)
        except subprocess.TimeoutExpired:
            hog.kill()
            out["hog_exit"] = "hung"
        forwarded = [m for m in messages[before:] if m[0] == 1]
        killed = self.sh("dmesg").stdout.count("unsupported BIO type") - killed_before
        out["killed"] = killed
        out["swapoff"] = self.sh("swapoff", "/dev/mapper/t8", timeout=120).returncode
        self.results["cases"]["swap_write_killed"] = {"result": "killed" if killed else "not killed",
                                                      "forwarded": len(forwarded)}

    def restart(self) -> None:
        c = self.results["cases"]
        thread, out = self.io_in_thread("/dev/mapper/t2", 0, lib.EARLY_LEN)
        time.sleep(0.5)
        self.results["queued_before_attach"] = thread.is_alive()
        self.start_daemon("d2", ["serve", "--config", self.path("d2.toml"), "--control-socket", "/tmp/d2.sock"],
                          "/tmp/d2.sock")
        thread.join(60)
        c["before_attach"] = dict(out) if not thread.is_alive() else {"result": "hung"}
        c["restart_read"] = self.direct_io("/dev/mapper/t1", lib.PATTERN_OFF, lib.PATTERN_LEN)
        data = lib.pattern(9, 64 * 1024)
        self.results["created"] = {
            "exists": os.path.exists("/dev/dm-user/t4"),
            "write": self.direct_io("/dev/mapper/t4", 65536, len(data), data),
            "read": self.direct_io("/dev/mapper/t4", 65536, len(data)),
        }
        # the table removed under the serving daemon: that export ends, the daemon stays
        removed = self.results["removed_under_daemon"] = {"dmsetup": self.sh("dmsetup", "remove", "t2").returncode}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            endpoints = self.status("/tmp/d2.sock")["targets"]["t2"]["exports"]
            if "dm-user" not in endpoints:
                break
            time.sleep(0.1)
        removed["endpoints_after"] = endpoints
        removed["daemon_alive"] = self.daemons["d2"].poll() is None
        d2 = self.daemons["d2"]
        d2.send_signal(signal.SIGTERM)
        try:
            self.results["d2_exit"] = d2.wait(60)
        except subprocess.TimeoutExpired:
            self.results["d2_exit"] = "hung"
            d2.kill()
        c["after_stop"] = self.direct_io("/dev/mapper/t1", 0, lib.PROBE_LEN)
        self.results["created"]["table_after_stop"] = self.sh("dmsetup", "info", "t4").returncode

    def snapuserd(self) -> None:
        snap = self.plan.get("snapuserd")
        if not snap:
            return
        out = self.results["snapuserd"] = {"replies": []}
        sock = "/tmp/snapuserd.sock"
        self.start_daemon("d3", ["dm", "snapuserd", "--socket", sock], sock)

        def say(message: str, reply=True):
            answer = self.control(sock, message.encode(), reply=reply)
            out["replies"].append([message, answer])
            return answer

        misc = "snapt"
        say("query")
        say("supports,second_stage_socket_handoff")
        say("supports,no_such_feature")
        init = say(f"init,{misc},{snap['cow']},{snap['base']},{snap['base']}")
        say(f"init,{misc},{snap['cow']},{snap['base']},{snap['base']}")  # exists already: fail
        sectors = int(init.split(",")[1]) if init.startswith("success,") else 0
        if sectors:
            self.dm_create(misc, sectors * 512)
        say(f"getstatus,{misc}")
        say(f"start,{misc}")
        say(f"start,{misc}")  # attached already: fail
        read = self.direct_io(f"/dev/mapper/{misc}", 0, snap["size"])
        out["read_before_merge"] = read
        say(f"initiate_merge,{misc}")
        percents = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            percent = say("merge_percent")
            percents.append(percent)
            if percent == "100.000000":
                break
            time.sleep(0.3)
        out["percents"] = percents
        say(f"getstatus,{misc}")
        out["read_after_merge"] = self.direct_io(f"/dev/mapper/{misc}", 0, snap["size"])
        say("pause_merge")
        say("resume_merge")
        # libsnapshot's order: the table goes first, then delete (which returns once the device is gone)
        out["dmsetup_remove"] = self.sh("dmsetup", "remove", misc).returncode
        say(f"delete,{misc}")
        say(f"delete,{misc}")  # gone already: success
        with open(snap["base"], "rb") as f:
            out["base_after_merge"] = lib.sha(f.read(snap["size"]))
        say("frobnicate")
        say("detach", reply=False)
        say("query")
        say("stop", reply=False)
        try:
            out["exit"] = self.daemons["d3"].wait(60)
        except subprocess.TimeoutExpired:
            out["exit"] = "hung"

    def cleanup(self) -> None:
        for proc in self.daemons.values():
            if proc.poll() is None:
                proc.kill()
        gone = self.sh(PY, "-m", "dmuserd", "dm", "remove", "t3")
        self.results["dm_remove"] = [gone.returncode, gone.stderr[-500:], os.path.exists("/dev/dm-user/t3")]
        for name in ("t1", "t2", "t3", "t4", "snapt", *lib.RAW_TABLES):
            self.sh("dmsetup", "remove", "--force", name)

    def run(self) -> None:
        self.step("setup", self.setup)
        self.step("start_d1", self.start_d1)
        self.step("filesystem", self.filesystem)
        self.step("fio", self.fio)
        self.step("cases_d1", self.cases_d1)
        self.step("kill_in_flight", self.kill_in_flight)
        self.step("timeout_case", self.timeout_case)
        self.step("kernel_limits", self.kernel_limits)
        self.step("swap_case", self.swap_case)
        self.step("restart", self.restart)
        self.step("snapuserd", self.snapuserd)
        self.step("cleanup", self.cleanup)
        self.results["done"] = True
        self.save()


if __name__ == "__main__":
    Guest(sys.argv[1]).run()
