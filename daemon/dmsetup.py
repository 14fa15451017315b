"""Device-mapper tables for dm-user, through ``dmsetup``.

A dm-user target is one table line::

    0 <sectors> user 0 <sectors> <name>

``dmsetup create`` with it makes two devices: the block device
``/dev/mapper/<name>`` that users read and write, and the misc device
``/dev/dm-user/<name>`` that the daemon serves. Removing the table makes
the daemon's blocked ``read()``s on the misc device fail with ENOTBLK.

Both the command line (``dmuserd dm create``, synchronous) and the daemon
(``create=1`` on a dm-user export, async) use these functions; the async
ones run the same ``dmsetup`` commands with :func:`trio.run_process`.

Attaching to a table that exists needs no ``dmsetup`` (Android has none):
the daemon opens ``/dev/dm-user/NAME`` by path and reads the device's size
from sysfs (:func:`table_size`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

from dmuserd.errors import DmuserdError
from dmuserd.protocol import SECTOR_SIZE

MISC_DIR = "/dev/dm-user"
MAPPER_DIR = "/dev/mapper"
#: Where the kernel lists block devices: ``dm-N/dm/name`` and ``dm-N/size``.
SYS_BLOCK = "/sys/block"
#: How long to wait for devtmpfs (or udev) to show /dev/dm-user/NAME.
DEVICE_WAIT_SECONDS = 10.0

_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,127}$")


class DmError(DmuserdError):
    """A device-mapper table could not be created, read or removed."""


def misc_path(name: str) -> str:
    """The misc device the daemon serves: ``/dev/dm-user/NAME``."""
    return os.path.join(MISC_DIR, name)


def mapper_path(name: str) -> str:
    """The block device users see: ``/dev/mapper/NAME``."""
    return os.path.join(MAPPER_DIR, name)


def check_name(name: str) -> str:
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise DmError(f"dm-user name {name!r}: use 1-127 letters, digits, '_', '.', '+' or '-'")
    return name


def user_table(name: str, size: int) -> str:
    """The table line of a dm-user target of ``size`` bytes."""
    check_name(name)
    if size <= 0 or size % SECTOR_SIZE:
        raise DmError(f"dm-user {name}: size {size} must be a positive multiple of {SECTOR_SIZE} bytes")
    sectors = size // SECTOR_SIZE
    return f"0 {sectors} user 0 {sectors} {name}"


def _dmsetup() -> str:
    path = shutil.which("dmsetup")
    if path is None:
        raise DmError("dmsetup is not installed: install the dmsetup package (Debian: apt-get install dmsetup)")
    return path


def _create_args(name: str, size: int) -> list[str]:
    return [_dmsetup(), "create", name, "--table", user_table(name, size)]


def _remove_args(name: str) -> list[str]:
    return [_dmsetup(), "remove", "--retry", check_name(name)]


def _create_failed(name: str, stderr: str) -> DmError:
    why = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
    hint = ""
    if "already exists" in stderr:
        hint = f" (remove it first: dmuserd dm remove {name}, or attach to it without create=1)"
    elif "Unknown target type" in stderr or "unknown target type" in stderr.lower():
        hint = " (this kernel has no dm-user target: `dmsetup targets` must list 'user')"
    elif os.geteuid() != 0:
        hint = " (device-mapper needs root)"
    return DmError(f"dmsetup create {name} failed: {why}{hint}")


def _remove_failed(name: str, stderr: str) -> DmError:
    why = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
    hint = ""
    if "busy" in stderr.lower():
        hint = f" ({mapper_path(name)} is still open or mounted: unmount it and run `dmuserd dm remove {name}`)"
    return DmError(f"dmsetup remove {name} failed: {why}{hint}")


def _device_appeared(name: str) -> bool:
    return os.path.exists(misc_path(name))


def create_user_target(name: str, size: int) -> None:
    """``dmsetup create`` a dm-user table; return once its misc device exists."""
    proc = subprocess.run(_create_args(name, size), capture_output=True, text=True)
    if proc.returncode:
        raise _create_failed(name, proc.stderr)
    deadline = time.monotonic() + DEVICE_WAIT_SECONDS
    while not _device_appeared(name):
        if time.monotonic() > deadline:
            raise DmError(f"dm-user {name}: table created but {misc_path(name)} did not appear "
                          f"within {DEVICE_WAIT_SECONDS:.0f} s (is devtmpfs mounted on /dev?)")
        time.sleep(0.01)


def remove_target(name: str) -> None:
    """``dmsetup remove`` a table (any daemon's reads then end with ENOTBLK)."""
    proc = subprocess.run(_remove_args(name), capture_output=True, text=True)
    if proc.returncode:
        raise _remove_failed(name, proc.stderr)


def table_size(name: str, sys_block: str | None = None) -> int | None:
    """The size in bytes of the device-mapper device ``name``, or None if sysfs lists none.

    Found through ``sys_block/dm-N/dm/name`` and read from ``dm-N/size``
    (512-byte sectors): no ``dmsetup``, no ioctl, nothing but sysfs, which
    Android has too. The tables ``dmuserd dm create``, ``create=1`` and
    Android's libsnapshot make name the device like its misc device; a
    dm-user table whose device has another name is not found here (its size
    is then unknown, and None says so).
    """
    check_name(name)
    sys_block = sys_block or SYS_BLOCK
    try:
        entries = sorted(e for e in os.listdir(sys_block) if e.startswith("dm-"))
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(sys_block, entry, "dm", "name")) as f:
                if f.read().strip() != name:
                    continue
            with open(os.path.join(sys_block, entry, "size")) as f:
                return int(f.read()) * SECTOR_SIZE
        except (OSError, ValueError):
            continue  # removed meanwhile, or not a dm device after all
    return None


async def create_user_target_async(name: str, size: int) -> None:
    """:func:`create_user_target` for trio code."""
    import trio

    proc = await trio.run_process(_create_args(name, size), capture_stdout=True, capture_stderr=True, check=False)
    if proc.returncode:
        raise _create_failed(name, proc.stderr.decode(errors="replace"))
    with trio.move_on_after(DEVICE_WAIT_SECONDS):
        while not _device_appeared(name):
            await trio.sleep(0.01)
    if not _device_appeared(name):
        raise DmError(f"dm-user {name}: table created but {misc_path(name)} did not appear "
                      f"within {DEVICE_WAIT_SECONDS:.0f} s (is devtmpfs mounted on /dev?)")


async def remove_target_async(name: str) -> None:
    """:func:`remove_target` for trio code."""
    import trio

    proc = await trio.run_process(_remove_args(name), capture_stdout=True, capture_stderr=True, check=False)
    if proc.returncode:
        raise _remove_failed(name, proc.stderr.decode(errors="replace"))
