"""Typed errors of the DSA offload, all under :class:`dmuserd.errors.DmuserdError`."""

from __future__ import annotations

from dmuserd.errors import DmuserdError


class DsaError(DmuserdError):
    """Something about DSA offload went wrong."""


class DsaUnavailable(DsaError):
    """The engine asked for cannot run here (no extension, no usable queue)."""


class DsaArgumentError(DsaError, ValueError):
    """An operation's buffers or parameters are wrong (lengths, writability)."""


class DeltaRecordError(DsaError, ValueError):
    """A delta record handed to apply_delta is malformed.

    Both engines raise it for the same records, with the device's status
    (7: offsets not increasing, 8: offset out of range, 0x15: bad size).
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"bad delta record: {detail} (status {status:#04x})")
        self.status = status
