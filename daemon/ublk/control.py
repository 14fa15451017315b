"""``/dev/ublk-control``: create, start, stop, recover and delete ublk devices.

Each control command is an ``IORING_OP_URING_CMD`` on the control device,
issued on an io_uring of its own (128-byte SQEs: the command area is 32
bytes). The kernel runs it in an io_uring worker, never in our thread: START_DEV
waits there until every queue has fetched and then scans the new disk for
partitions, which takes I/O that this same thread serves. So a command is
submitted and its completion awaited through the ring's eventfd, while trio
goes on serving the queues.
"""

from __future__ import annotations

import errno
import itertools
import os

import trio

from dmuserd.daemon.ublk import uapi
from dmuserd.daemon.ublk.errors import UblkError

_uring = None


def uring_module():
    """The C extension, or :class:`UblkError` saying how to get it."""
    global _uring
    if _uring is None:
        try:
            from dmuserd.daemon.ublk import _uring as module
        except ImportError as exc:
            raise UblkError(
                f"the ublk export needs dmuserd's io_uring extension, which is not built ({exc}): "
                "install liburing-dev (scripts/setup-system) and reinstall dmuserd (make venv)"
            ) from None
        _uring = module
    return _uring


class Control:
    """The control device and its ring; one command in the kernel at a time per caller."""

    def __init__(self) -> None:
        uring = uring_module()
        try:
            self.fd = os.open(uapi.CONTROL_PATH, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise UblkError(f"cannot open {uapi.CONTROL_PATH}: {exc.strerror}") from None
        try:
            self.ring = uring.Ring(16, uring.SETUP_SQE128)
        except OSError as exc:
            os.close(self.fd)
            raise UblkError(f"cannot set up an io_uring for ublk: {exc.strerror}") from None
        self._async = uring.SQE_ASYNC
        self._ids = itertools.count(1)
        #: buffers the kernel may still write into, by command, until its completion arrives
        self._buffers: dict[int, bytearray] = {}
        self._results: dict[int, int] = {}
        self._names: dict[int, tuple[uapi.Cmd, int]] = {}
        self._reaping = trio.Lock()

    def submit(self, cmd: uapi.Cmd, dev_id: int, *, buffer: bytearray | None = None, data0: int = 0) -> int:
        """Hand one control command to the kernel now; its id for :meth:`wait`."""
        uring = uring_module()
        uid = next(self._ids)
        addr, length = (uring.address(buffer), len(buffer)) if buffer is not None else (0, 0)
        if buffer is not None:
            self._buffers[uid] = buffer
        self.ring.uring_cmd(self.fd, cmd, uapi.ctrl_cmd(dev_id, addr=addr, length=length, data0=data0), uid,
                            self._async)
        self.ring.submit()
        self._names[uid] = (cmd, dev_id)
        return uid

    async def wait(self, uid: int) -> int:
        """The (non-negative) result of a submitted command, or :class:`UblkError` naming it."""
        while uid not in self._results:
            async with self._reaping:
                if uid in self._results:
                    break
                await trio.lowlevel.wait_readable(self.ring.eventfd)
                for done, res in self.ring.completions():
                    self._results[done] = res
                    self._buffers.pop(done, None)
        res = self._results.pop(uid)
        cmd, dev_id = self._names.pop(uid)
        if res < 0:
            raise UblkError(f"ublk {cmd.name} of device {dev_id if dev_id != uapi.ANY_ID else '(any)'} failed: "
                            f"{os.strerror(-res)}", errno=-res)
        return res

    async def command(self, cmd: uapi.Cmd, dev_id: int, *, buffer: bytearray | None = None, data0: int = 0) -> int:
        """Run one control command: :meth:`submit`, then :meth:`wait`."""
        return await self.wait(self.submit(cmd, dev_id, buffer=buffer, data0=data0))

    async def add(self, info: uapi.DevInfo) -> uapi.DevInfo:
        """ADD_DEV: the device as the kernel made it (its ID, queues and flags may differ from the request)."""
        buffer = bytearray(info.encode())
        await self.command(uapi.Cmd.ADD_DEV, info.dev_id, buffer=buffer)
        return uapi.DevInfo.decode(buffer)

    async def info(self, dev_id: int) -> uapi.DevInfo | None:
        """GET_DEV_INFO, or None when there is no such device."""
        buffer = bytearray(uapi.DEV_INFO_SIZE)
        try:
            await self.command(uapi.Cmd.GET_DEV_INFO, dev_id, buffer=buffer)
        except UblkError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return uapi.DevInfo.decode(buffer)

    async def set_params(self, dev_id: int, params: uapi.Params) -> None:
        await self.command(uapi.Cmd.SET_PARAMS, dev_id, buffer=bytearray(params.encode()))

    async def params(self, dev_id: int) -> uapi.Params:
        buffer = bytearray(uapi.Params(0).encode())
        await self.command(uapi.Cmd.GET_PARAMS, dev_id, buffer=buffer)
        return uapi.Params.decode(buffer)

    async def delete(self, dev_id: int, seconds: float = 10.0) -> None:
        """DEL_DEV within ``seconds`` (a started device is stopped first: I/O waiting on it fails with EIO).

        The kernel finishes it once nobody has ``/dev/ublkcN`` open; past ``seconds``, :class:`UblkError`.
        """
        with trio.move_on_after(seconds):
            await self.command(uapi.Cmd.DEL_DEV, dev_id)
            return
        raise UblkError(f"ublk device {dev_id} could not be deleted within {seconds:.0f} s "
                        f"(is {uapi.CHAR_PATH.format(dev_id)} still open?)", errno=errno.EBUSY)

    def close(self) -> None:
        self.ring.close()
        os.close(self.fd)
