"""The guest side of the dm-user edge-case tests (issue #21): run inside ``run-in-vm`` as root.

``python tests/vm/dmuser_edge_guest.py WORKDIR`` reads ``WORKDIR/plan.json``,
creates the tables below with ``dmsetup``, then

* runs one daemon (``python -m dmuserd serve``) with no ``dmsetup`` on its
  PATH, attached to existing tables: a READ and a WRITE of 40 MiB, each one
  BIO (its buffer's pages physically contiguous, as ``/proc/self/pagemap``
  shows); a backend answering with item buffers; ``fsync`` of read-only
  targets;
* then, in this process, refusals at start (``DmUserExport.start``) and a channel
  the kernel poisons (an unknown seq answered first), served by
  :class:`~dmuserd.daemon.dmuser.DmUserDevice`;

and writes what it observed to ``WORKDIR/results.json`` after every step.
It asserts nothing: ``test_dmuser_edge_vm.py`` on the host does.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import mmap
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading

import dmuser_vm_lib as lib
from dmuser_guest import Guest

MiB = lib.MiB
#: The daemon's PATH: nothing there, so no dmsetup (as on Android).
NO_DMSETUP_PATH = "/nonexistent-dmuserd-test-path"
TABLES = {
    "e_big": 96 * MiB,  # 40 MiB I/O, larger than the daemon's 32 MiB buffers
    "e_items": 4 * MiB,  # reads answered with buffers of 2- and 4-byte items
    "e_ro": 1 * MiB,  # a backend with neither write() nor flush()
    "e_snap": lib.SNAP_SIZE,  # a snapshot target (base + COW)
    "e_large": 8 * MiB,  # a table larger than its 4 MiB backend
    "e_poison": 4 * MiB,  # a channel the kernel puts in its error state
}
BIG = 40 * MiB
ITEMS_WRONG = 2 * MiB  # ItemsBackend: reads from here come back with the wrong byte size
ITEMS_SEED = 11
SMALL = 64 * 1024
POISON_SECTOR = 2048  # e_poison: the READ here is answered with an unknown seq first
HUNG_AFTER = 30.0  # a request not done by then is recorded as hung
PAGE = 4096
_HEADER = struct.Struct("<5Q")


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, str(exc.errno))


def bounded(fn, *args) -> dict:
    """``fn(*args)`` in a thread, given :data:`HUNG_AFTER` seconds: its dict, or ``{"result": "hung"}``."""
    out: dict = {}

    def run():
        try:
            out.update(fn(*args))
        except Exception as exc:  # noqa: BLE001 - recorded, judged on the host
            out["result"] = f"raised {exc!r}"

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HUNG_AFTER)
    return dict(out) if not thread.is_alive() else {"result": "hung"}


def contiguous_buffer(length: int):
    """A view of ``length`` bytes of anonymous memory whose pages are as physically contiguous as found.

    One O_DIRECT BIO holds at most 256 segments, but a segment spans any run
    of contiguous pages, so over such a buffer one ``preadv`` is one BIO.
    Returns (the mmap, the view, the number of physical runs in the view).
    """
    spare = 16 * MiB
    area = mmap.mmap(-1, length + spare, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for offset in range(0, length + spare, PAGE):
        area[offset] = 1  # fault every page in, in order
    address = ctypes.addressof(ctypes.c_char.from_buffer(area))
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // PAGE * 8)
        entries = [e for (e,) in struct.iter_unpack("<Q", f.read((length + spare) // PAGE * 8))]
    frames = [e & ((1 << 55) - 1) for e in entries]
    breaks = list(itertools.accumulate([0] + [int(b != a + 1) for a, b in zip(frames, frames[1:])]))
    window = length // PAGE
    start = min(range(len(frames) - window + 1), key=lambda i: breaks[i + window - 1] - breaks[i])
    runs = breaks[start + window - 1] - breaks[start] + 1
    return area, memoryview(area)[start * PAGE : start * PAGE + length], runs


def vectored_io(device: str, view, offset: int, write: bool) -> dict:
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        done = os.pwritev(fd, [view], offset) if write else os.preadv(fd, [view], offset)
        return {"result": "ok" if done == len(view) else f"short:{done}"}
    except OSError as exc:
        return {"result": _errno_name(exc)}
    finally:
        os.close(fd)


def fsync(device: str) -> dict:
    fd = os.open(device, os.O_RDONLY)
    try:
        os.fsync(fd)
        return {"result": "ok"}
    except OSError as exc:
        return {"result": _errno_name(exc)}
    finally:
        os.close(fd)


class EdgeGuest(Guest):
    def setup(self) -> None:
        self.set_timeout(lib.LONG_TIMEOUT_MS)
        for name, size in TABLES.items():
            self.dm_create(name, size)
        with open(self.path("items.img"), "wb") as f:
            f.write(lib.pattern(ITEMS_SEED, TABLES["e_items"]))
        snap = self.plan["snapshot"]
        backend = "dmuser_vm_backend"
        with open(self.path("edge.toml"), "w") as f:
            f.write(
                '[targets.e_big]\nbackend = "memory:size=96M"\nexports = ["dm-user:e_big,channels=2"]\n'
                f'[targets.e_items]\nbackend = {{ type = "{backend}:ItemsBackend", path = "{self.path("items.img")}",'
                f' wrong = "{ITEMS_WRONG}" }}\nexports = ["dm-user:e_items,channels=2"]\n'
                f'[targets.e_ro]\nbackend = {{ type = "{backend}:ReadOnlyBackend", size = "1M" }}\n'
                'exports = ["dm-user:e_ro,channels=1"]\n'
                f'[targets.e_snap]\nbackend = {{ type = "snapshot", base = "{snap["base"]}", cow = "{snap["cow"]}" }}\n'
                'exports = ["dm-user:e_snap,channels=1"]\n')

    def start(self) -> None:
        self.results["dmsetup_on_daemon_path"] = shutil.which("dmsetup", path=NO_DMSETUP_PATH)
        self.start_daemon("de", ["serve", "--config", self.path("edge.toml"), "--control-socket", "/tmp/de.sock"],
                          "/tmp/de.sock", env={"PATH": NO_DMSETUP_PATH})
        status = self.status("/tmp/de.sock")
        self.results["attached"] = {name: t["exports"] for name, t in status["targets"].items()}

    def need_daemon(self) -> None:
        """Fail a step at once when the daemon is not running (its I/O would wait for the attach timeout)."""
        daemon = self.daemons.get("de")
        if daemon is None or daemon.poll() is not None:
            raise RuntimeError("the daemon is not running")

    def oversized(self) -> None:
        self.need_daemon()
        out = self.results["oversized"] = {}
        area, view, out["runs"] = contiguous_buffer(BIG)
        out["read"] = bounded(vectored_io, "/dev/mapper/e_big", view, 0, False)
        view[:] = b"\xa5" * BIG
        out["write"] = bounded(vectored_io, "/dev/mapper/e_big", view, 0, True)
        out["untouched"] = self.direct_io("/dev/mapper/e_big", 0, SMALL)  # the dropped write left zeros
        data = lib.pattern(12, SMALL)
        out["small_write"] = self.direct_io("/dev/mapper/e_big", MiB, SMALL, data)
        out["small_read"] = self.direct_io("/dev/mapper/e_big", MiB, SMALL)
        status = self.status("/tmp/de.sock")
        out["rejected"] = status["rejected_inputs"]
        out["requests"] = status["targets"]["e_big"]["requests"]
        del view
        area.close()

    def items(self) -> None:
        self.need_daemon()
        out = self.results["items"] = {}
        out["right"] = self.direct_io("/dev/mapper/e_items", 0, SMALL)
        out["wrong"] = self.direct_io("/dev/mapper/e_items", ITEMS_WRONG, PAGE)
        out["after"] = self.direct_io("/dev/mapper/e_items", SMALL, SMALL)
        target = self.status("/tmp/de.sock")["targets"]["e_items"]
        out["errors"], out["in_flight"] = target["errors"], target["in_flight"]

    def flushes(self) -> None:
        self.need_daemon()
        out = self.results["fsync"] = {}
        for name in ("e_ro", "e_snap"):
            out[name] = bounded(fsync, f"/dev/mapper/{name}")
            out[f"{name}_requests"] = self.status("/tmp/de.sock")["targets"][name]["requests"]

    def stop(self) -> None:
        daemon = self.daemons["de"]
        daemon.send_signal(signal.SIGTERM)
        try:
            self.results["de_exit"] = daemon.wait(60)
        except subprocess.TimeoutExpired:
            self.results["de_exit"] = "hung"
            daemon.kill()
        with open(self.path("de.log")) as f:
            log = f.read()
        lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        self.results["de_log"] = {"channel_failed": sum(str(e.get("event")).startswith("dm-user channel failed")
                                                        for e in lines),
                                  "errors": [e.get("event") for e in lines if e.get("level") in ("error", "critical")],
                                  "lines": len(lines)}

    def in_process(self) -> None:
        import trio

        path = os.environ["PATH"]
        os.environ["PATH"] = NO_DMSETUP_PATH  # the export's start finds no dmsetup either
        try:
            trio.run(self._in_process)
        finally:
            os.environ["PATH"] = path

    async def _in_process(self) -> None:
        import trio

        from dmuserd.backends import create
        from dmuserd.daemon.config import ConfigError, ExportSpec, TargetSpec
        from dmuserd.daemon.dispatcher import Dispatcher
        from dmuserd.daemon.dmsetup import table_size
        from dmuserd.daemon.dmuser import DevChannel, DmUserDevice, DmUserExport
        from dmuserd.daemon.runtime import Target

        class PoisonChannel(DevChannel):
            """Answers the READ at POISON_SECTOR with an unknown seq first.

            The kernel takes that header once and fails every later write on
            the channel with EINVAL: the daemon gives the channel up (and
            reopens it) while the kernel still counts that READ as the
            channel's own.
            """

            async def send_all(self, buffers: list) -> None:
                seq, _kind, _flags, sector, _length = _HEADER.unpack_from(bytes(buffers[0]))
                if sector == POISON_SECTOR:
                    await super().send_all([_HEADER.pack(seq + (1 << 40), 0, 0, 0, 0)])
                await super().send_all(buffers)

        class PoisonDevice(DmUserDevice):
            channel_type = PoisonChannel

        out = self.results["in_process"] = {"table_size_e_large": table_size("e_large")}
        async with trio.open_nursery() as nursery:
            for key, name, spec in (("larger_table", "e_large", {"size": "4M"}),
                                    ("block_size", "e_big", {"size": "4M", "block_size": "4K"})):
                target = Target(TargetSpec(name, "memory", spec, []), create("memory", spec))
                try:
                    await DmUserExport.from_spec(ExportSpec("dm-user", name, {}), None).start(target, nursery)
                    out[key] = "started"
                except ConfigError as exc:
                    out[key] = str(exc)

            dispatcher = Dispatcher(create("memory", {"size": "4M"}), name="e_poison")
            device = PoisonDevice("e_poison", dispatcher, channels=1)
            await nursery.start(device.run)
            poisoned = await trio.to_thread.run_sync(bounded, self.direct_io, "/dev/mapper/e_poison",
                                                     POISON_SECTOR * 512, PAGE)
            out["poisoned"] = poisoned
            data = lib.pattern(13, SMALL)
            out["after_write"] = await trio.to_thread.run_sync(bounded, self.direct_io, "/dev/mapper/e_poison",
                                                               0, SMALL, data)
            out["after_read"] = await trio.to_thread.run_sync(bounded, self.direct_io, "/dev/mapper/e_poison",
                                                              0, SMALL)
            out["reopened"] = device.reopened
            out["reader_threads"] = sum(t.name.startswith("dm-user e_poison") for t in threading.enumerate())
            nursery.cancel_scope.cancel()

    def cleanup(self) -> None:
        for proc in self.daemons.values():
            if proc.poll() is None:
                proc.kill()
        for name in TABLES:
            self.sh("dmsetup", "remove", "--force", name)

    def run(self) -> None:
        self.step("setup", self.setup)
        self.step("start", self.start)
        self.step("oversized", self.oversized)
        self.step("items", self.items)
        self.step("flushes", self.flushes)
        self.step("stop", self.stop)
        self.step("in_process", self.in_process)
        self.step("cleanup", self.cleanup)
        self.results["done"] = True
        self.save()


if __name__ == "__main__":
    EdgeGuest(sys.argv[1]).run()
