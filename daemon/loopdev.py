"""Loop devices on top of our FUSE files: find them, attach, detach."""

from __future__ import annotations

import glob
import os

import structlog
import trio

log = structlog.get_logger("dmuserd.loop")


def loops_backed_by(prefix: str) -> list[str]:
    """``/dev/loopN`` devices whose backing file lies under ``prefix``."""
    prefix = os.path.abspath(prefix)
    found = []
    for path in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(path) as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing == prefix or backing.startswith(prefix.rstrip("/") + "/"):
            found.append("/dev/" + path.split("/")[3])
    return sorted(found)


async def attach_loop(path: str, *, direct_io: bool = True) -> str:
    """``losetup --find --show`` on ``path``; returns the device."""
    args = ["losetup", "--find", "--show"]
    if direct_io:
        args.append("--direct-io=on")
    result = await trio.run_process(args + [path], capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        raise OSError(f"losetup {path} failed: {result.stderr.decode().strip()}")
    return result.stdout.decode().strip()


async def detach_loop(device: str) -> None:
    result = await trio.run_process(["losetup", "-d", device], capture_stderr=True, check=False)
    if result.returncode != 0:
        log.warning("losetup -d failed", loop=device, error=result.stderr.decode().strip())


async def detach_loops_under(prefix: str) -> list[str]:
    """Detach (or mark for auto-clear, if busy) every loop device on our files."""
    devices = loops_backed_by(prefix)
    for device in devices:
        log.info("detaching loop device", loop=device)
        await detach_loop(device)
    return devices
