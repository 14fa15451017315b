"""Typed errors of the protocol library."""

from __future__ import annotations

from dmuserd.errors import DmuserdError


class ProtocolError(DmuserdError):
    """Bytes or a response that break the dm-user protocol.

    ``field`` names the offending field (``"type"``, ``"len"``, ``"seq"``,
    ``"flags"``, ``"payload"``, ``"header"``) and ``value`` its value, so a
    log line says exactly what was wrong. A connection that raised this is
    no longer usable: the byte stream has lost its framing.
    """

    def __init__(self, field: str, value: object, message: str) -> None:
        super().__init__(f"dm-user protocol error in {field}={value!r}: {message}")
        self.field = field
        self.value = value


class KernelError(DmuserdError):
    """What a system call on the dm-user misc device would fail with.

    ``errno`` is the error number (``errno.EINVAL``, ``errno.ENOTBLK``, ...).
    """

    def __init__(self, errno_: int, message: str) -> None:
        import os

        super().__init__(f"[{os.strerror(errno_)}] {message}")
        self.errno = errno_
