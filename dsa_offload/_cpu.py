"""The CPU implementation of every mover operation, on memoryviews of bytes.

These are the CPU engine, the fallback when the device cannot do a piece of
work, and the reference the device results are tested against. They need
no extension: copies are memoryview slice assignments (memcpy), CRCs come
from the ``crc32c`` package (the extension's where it is built), comparisons use bytearray equality (memcmp)
chunk by chunk. Where the extension is built, large copies and every
comparison go through it instead (no GIL, and no copy to compare).
"""

from __future__ import annotations

import functools
import struct

from dmuserd.dsa_offload._errors import DeltaRecordError, DsaArgumentError
from dmuserd.dsa_offload._native import extension
from dmuserd.dsa_offload._spec import DELTA_ENTRY, DELTA_GRANULE, Status

# Comparison works chunk by chunk: one chunk's copy stays in cache.
_CHUNK = 64 * 1024


# From this size a copy drops the GIL (through the extension, when built),
# so a copy run in a worker thread (a device fallback from 256 KiB) really
# leaves the trio loop free.
NOGIL_COPY = 256 << 10


def copy(dst: memoryview, src: memoryview) -> None:
    if len(dst) >= NOGIL_COPY:
        ext = extension()
        if ext is not None:
            ext.memmove(dst, src)
            return
    dst[:] = src  # memmove semantics, at memcpy speed


def fill(dst: memoryview, pattern: bytes) -> None:
    """Repeat the 8-byte ``pattern`` over ``dst`` (byte i = pattern[i % 8])."""
    n = len(dst)
    done = min(n, 8)
    dst[:done] = pattern[:done]
    while done < n:  # doubling keeps every copy a multiple of 8 long
        step = min(done, n - done)
        dst[done : done + step] = dst[:step]
        done += step


def first_difference(a: memoryview, b: memoryview) -> int | None:
    """Offset of the first byte where ``a`` and ``b`` differ, or None.

    Through the extension when built: memcmp in place, without the GIL.
    Without it, each chunk of ``a`` is copied once to compare it."""
    ext = extension()
    if ext is not None:
        offset = ext.first_difference(a, b)
        return None if offset < 0 else offset
    n = len(a)
    for start in range(0, n, _CHUNK):
        end = min(n, start + _CHUNK)
        if bytearray(a[start:end]) != b[start:end]:
            lo, hi = start, end  # the difference lies in [lo, hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if bytearray(a[lo:mid]) != b[lo:mid]:
                    hi = mid
                else:
                    lo = mid
            return lo
    return None


def pattern_difference(buf: memoryview, pattern: bytes) -> int | None:
    """Offset of the first byte of ``buf`` that breaks the 8-byte pattern."""
    n = len(buf)
    block = memoryview(pattern * (min(n, _CHUNK) // 8 + 1))
    for start in range(0, n, _CHUNK):
        end = min(n, start + _CHUNK)
        offset = first_difference(buf[start:end], block[: end - start])
        if offset is not None:
            return start + offset
    return None


def crc32c(buf: memoryview, seed: int = 0) -> int:
    """CRC-32C with the crc32c package's (and DSA's) seed convention.

    The DSA extension's CRC (SSE4.2 where the CPU has it) when it is built;
    else the crc32c package, imported on first use: its import reads its
    own version through ``importlib.metadata`` (10-40 ms, the first CRC of
    a merge paid it), which no command should pay for one checksum."""
    return _crc32c_impl()(buf, seed)


@functools.cache
def _crc32c_impl():
    ext = extension()
    if ext is not None:
        return ext.crc32c
    from crc32c import crc32c as package

    return package


def rotate(pattern: bytes, phase: int) -> bytes:
    """The pattern as seen from byte ``phase`` of a filled region."""
    phase %= 8
    return pattern[phase:] + pattern[:phase]


def expand_pattern(pattern: bytes | int) -> bytes:
    """Accept 1, 2, 4 or 8 bytes (or a byte value) and return 8 bytes."""
    try:
        pattern = bytes([pattern]) if isinstance(pattern, int) else bytes(pattern)
    except (TypeError, ValueError) as exc:
        raise DsaArgumentError(f"a fill pattern is a byte value (0-255) or 1, 2, 4 or 8 bytes, not {pattern!r}") from exc
    if len(pattern) not in (1, 2, 4, 8):
        raise DsaArgumentError(f"a fill pattern is 1, 2, 4 or 8 bytes, not {len(pattern)}")
    return pattern * (8 // len(pattern))


def create_delta(original: memoryview, modified: memoryview) -> bytes:
    """Delta record turning ``original`` into ``modified``: one 10-byte entry
    (u16 granule offset, 8 new bytes) per differing 8-byte granule."""
    out = bytearray()
    n = len(original)
    for start in range(0, n, 4096):
        end = min(n, start + 4096)
        if bytearray(original[start:end]) == modified[start:end]:
            continue
        for off in range(start, end, DELTA_GRANULE):
            new = modified[off : off + DELTA_GRANULE]
            if bytearray(original[off : off + DELTA_GRANULE]) != new:
                out += struct.pack("<H", off // DELTA_GRANULE) + new
    return bytes(out)


def check_delta(delta: memoryview, size: int) -> None:
    """Raise :class:`DeltaRecordError` as the device would for this record."""
    if len(delta) % DELTA_ENTRY or len(delta) > size // DELTA_GRANULE * DELTA_ENTRY:
        raise DeltaRecordError(Status.DELTA_RECORD_SIZE, f"{len(delta)} bytes is not a whole number of entries that fit")
    previous = -1
    for (granule,) in struct.iter_unpack("<H8x", delta):
        if granule <= previous:
            raise DeltaRecordError(Status.DELTA_OFFSETS_NOT_INCREASING, f"granule {granule} after {previous}")
        if granule * DELTA_GRANULE + DELTA_GRANULE > size:
            raise DeltaRecordError(Status.DELTA_OFFSET_OUT_OF_RANGE, f"granule {granule} beyond {size} bytes")
        previous = granule


def apply_delta(dst: memoryview, delta: memoryview) -> None:
    check_delta(delta, len(dst))
    for i in range(0, len(delta), DELTA_ENTRY):
        off = struct.unpack_from("<H", delta, i)[0] * DELTA_GRANULE
        dst[off : off + DELTA_GRANULE] = delta[i + 2 : i + DELTA_ENTRY]
