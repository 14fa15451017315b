"""The ublk devices of this kernel, who serves them, and deleting one nobody serves.

What ``dmuserd ublk list`` and ``dmuserd ublk del ID`` show and do, and what
the export asks before it takes an ID. A device's ID comes from its channel
node ``/dev/ublkcN`` (devtmpfs makes one per device, started or not), its
facts from GET_DEV_INFO: state, queues, depth, the pid of the daemon that
started it (or is setting it up). Who *serves* it:

* a live device (or one still being set up) is served by that pid while it runs;
* a quiesced device (``recovery=1``, its daemon gone) by no one, unless a
  process has its channel open: a new daemon taking it over.

A device nobody serves can be deleted (DEL_DEV): one left by ``recovery=1``
(its waiting I/O then fails with EIO) or by a daemon that died while setting
it up. The kernel's DEL_DEV waits until nobody has the channel open, so one
with a holder is refused instead, naming it.
"""

from __future__ import annotations

import errno
import glob
import os
import re
from dataclasses import dataclass

from dmuserd.daemon.ublk import uapi
from dmuserd.daemon.ublk.control import Control
from dmuserd.daemon.ublk.errors import UblkError

_CHANNEL = re.compile(r"ublkc(\d+)")


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a pid <= 0 is no process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def device_ids() -> list[int]:
    """The IDs of the ublk devices there are, from their ``/dev/ublkcN`` nodes."""
    found = (_CHANNEL.fullmatch(os.path.basename(path)) for path in glob.glob(uapi.CHAR_PATH.format("*")))
    return sorted(int(match.group(1)) for match in found if match)


def channel_holders(dev_id: int) -> list[int]:
    """The pids of the processes that have ``/dev/ublkcN`` open (all of them only for root)."""
    channel = uapi.CHAR_PATH.format(dev_id)
    holders = []
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            if any(os.readlink(os.path.join(fd_dir, fd)) == channel for fd in os.listdir(fd_dir)):
                holders.append(int(fd_dir.split("/")[2]))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return sorted(holders)


@dataclass(frozen=True)
class Device:
    """One ublk device as ``dmuserd ublk list`` shows it."""

    id: int
    #: ``live``, ``quiesced`` (recovery=1, waiting for a daemon) or ``dead`` (stopped, or not started yet)
    state: str
    queues: int
    depth: int
    max_io: int
    #: the daemon that started it or is setting it up (-1: none)
    pid: int
    pid_alive: bool
    #: processes with its channel open
    holders: tuple[int, ...]
    recovery: bool
    #: ``/dev/ublkbN`` when the block device is there (started, not stopped)
    block: str | None

    @classmethod
    def from_info(cls, info: uapi.DevInfo, holders: list[int]) -> Device:
        block = uapi.BLOCK_PATH.format(info.dev_id)
        return cls(info.dev_id, uapi.DevState(info.state).name.lower(), info.nr_hw_queues, info.queue_depth,
                   info.max_io_buf_bytes, info.ublksrv_pid, alive(info.ublksrv_pid), tuple(holders),
                   bool(info.flags & uapi.Feature.USER_RECOVERY), block if os.path.exists(block) else None)

    @property
    def served_by(self) -> int | None:
        """The pid of the running process that serves it, or None (see the module doc)."""
        if self.pid_alive and self.state != "quiesced":
            return self.pid
        return self.holders[0] if self.holders else None

    def as_dict(self) -> dict:
        view = {name: getattr(self, name) for name in self.__dataclass_fields__}
        view["holders"] = list(self.holders)
        view["served_by"] = self.served_by
        return view


async def describe(control: Control, dev_id: int) -> Device | None:
    """Device ``dev_id``, or None when there is none."""
    info = await control.info(dev_id)
    return Device.from_info(info, channel_holders(dev_id)) if info is not None else None


async def list_devices(control: Control) -> list[Device]:
    """Every ublk device, by ID (one removed meanwhile is left out)."""
    devices = [await describe(control, dev_id) for dev_id in device_ids()]
    return [device for device in devices if device is not None]


async def delete(control: Control, dev_id: int) -> Device:
    """DEL_DEV device ``dev_id`` if nobody serves it; what it was. :class:`UblkError` names who does."""
    device = await describe(control, dev_id)
    if device is None:
        raise UblkError(f"there is no ublk device {dev_id} (`dmuserd ublk list` shows those there are)",
                        errno=errno.ENODEV)
    user = device.served_by
    if user is not None:
        raise UblkError(f"ublk device {dev_id} ({device.state}) is served by pid {user}, which runs: stop that "
                        "daemon instead (a stop deletes its device; with recovery=1 delete it after the stop)",
                        errno=errno.EBUSY)
    await control.delete(dev_id)
    return device
