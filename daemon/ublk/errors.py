"""The ublk export's error: what failed, on which device, and the errno behind it."""

from __future__ import annotations

from dmuserd.errors import DmuserdError


class UblkError(DmuserdError):
    """A ublk device could not be created, served, recovered or removed."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        #: the kernel's errno where there was one (EEXIST: the ID is taken, EBUSY: not recoverable yet)
        self.errno = errno
