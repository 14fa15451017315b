"""``dmuserd demo`` (``make demo``): the whole stack in one command.

A sparse 1 GiB memory disk served over FUSE, attached as a loop device,
formatted ext4 and mounted; a few files are written, synced, and read back
from the device; then a summary says what is where, and the daemon keeps
serving until Ctrl-C, which tears everything down.

File work runs in threads and tools in subprocesses: the FUSE file system is
served by this very event loop, so nothing here may block it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys

import structlog
import trio

from dmuserd.daemon.config import DaemonSpec, parse_target
from dmuserd.daemon.loopdev import attach_loop, detach_loop
from dmuserd.daemon.runtime import Daemon
from dmuserd.errors import DmuserdError

log = structlog.get_logger("dmuserd.demo")

FILES = {f"file{i}.bin": (i + 1) * 1024 * 1024 for i in range(4)}


class DemoError(DmuserdError):
    pass


def _say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


async def _run(*args: str) -> None:
    result = await trio.run_process(list(args), capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        raise DemoError(f"`{' '.join(args)}` failed: {result.stderr.decode().strip() or result.returncode}")


def _write_files(directory: str) -> dict[str, str]:
    digests = {}
    for name, size in FILES.items():
        data = os.urandom(size)
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    with open(os.path.join(directory, "README.txt"), "w") as f:
        f.write("Written by `dmuserd demo` through ext4 → loop → FUSE → dm-user model → memory backend.\n")
    os.sync()
    return digests


def _check_files(directory: str, digests: dict[str, str]) -> None:
    for name, digest in digests.items():
        with open(os.path.join(directory, name), "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                raise DemoError(f"{name} read back different from what was written")


def _check_tools() -> None:
    if os.geteuid() != 0:
        raise DemoError("the demo attaches a loop device and mounts ext4: run it as root (sudo make demo)")
    missing = [t for t in ("losetup", "mkfs.ext4", "mount", "umount") if not shutil.which(t)]
    if missing:
        raise DemoError(f"missing tools: {', '.join(missing)} (apt-get install util-linux e2fsprogs mount)")


async def run_demo(size: str = "1G", directory: str | None = None, duration: float | None = None) -> int:
    _check_tools()
    base = directory or "/run/dmuserd-demo"
    fuse_dir, mnt = os.path.join(base, "fuse"), os.path.join(base, "mnt")
    control = os.path.join(base, "control.sock")
    os.makedirs(mnt, exist_ok=True)
    spec = DaemonSpec([parse_target("demo", f"memory:size={size}", [f"fuse:{fuse_dir}"])])
    daemon = Daemon(spec, control_socket=control)
    loop = None
    mounted = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            try:
                image = daemon.targets["demo"].endpoints["fuse"]
                _say(f"[1/5] serving a sparse {size} memory disk over FUSE: {image}")
                loop = await attach_loop(image)
                _say(f"[2/5] attached as loop device {loop} (direct I/O)")
                await _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop)
                _say("[3/5] formatted ext4")
                await _run("mount", loop, mnt)
                mounted = True
                _say(f"[4/5] mounted at {mnt}")
                digests = await trio.to_thread.run_sync(_write_files, mnt)
                await _run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
                await trio.to_thread.run_sync(_check_files, mnt, digests)
                total = sum(FILES.values()) // (1024 * 1024)
                _say(f"[5/5] wrote {len(FILES)} files ({total} MiB), synced, dropped caches, read back: all equal")
                stats = daemon.targets["demo"].dispatcher.stats
                _say()
                _say("What is where:")
                _say(f"  FUSE file     {image}")
                _say(f"  block device  {loop}")
                _say(f"  file system   {mnt} (ext4)")
                _say(f"  requests so far: {stats.total_requests}, errors: {stats.errors}")
                _say()
                _say("From another shell:")
                _say(f"  ls -l {mnt}; cp /etc/services {mnt}/")
                _say(f"  dmuserd status --control-socket {control}")
                _say()
                if duration is None:
                    _say("Serving. Press Ctrl-C to unmount, detach and stop.")
                    async for _ in signals:
                        break
                else:
                    _say(f"Serving for {duration} s.")
                    with trio.move_on_after(duration):
                        async for _ in signals:
                            break
            finally:
                with trio.CancelScope(shield=True):
                    _say("Tearing down: unmount, detach, stop.")
                    if mounted:
                        await _run("umount", mnt)
                    if loop:
                        await detach_loop(loop)
                    await daemon.stop()
    _say("Done.")
    return 0
