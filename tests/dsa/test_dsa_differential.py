"""The mover on the emulated device against oracles written here, in plain Python.

(This used to compare the emulated engine with the CPU engine; both finish
work with the same CPU code, so a device that quietly left everything to
the CPU fallback, or a descriptor-level error the fallback covered, went
unseen. Descriptor-level behaviour is checked against the spec model in
test_dsa_spec_model.py; here the mover's results are checked against
independent oracles, and the device must have done the work: no fallback
but the documented ones.)

Sizes straddle the threshold and the (small) max transfer so single
descriptors, split pieces and CPU-side work all occur; some examples also
inject page faults, which the device must recover from invisibly.
"""

import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmuserd.dsa_offload import DeltaRecordError, open_mover

OPS = ["copy", "fill", "compare", "compare_pattern", "crc32c", "copy_crc32c", "dualcast", "create_delta",
       "apply_delta", "batch"]

_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ (0x82F63B78 if _c & 1 else 0)
    _TABLE.append(_c)


def crc32c_oracle(data: bytes, seed: int = 0) -> int:
    """CRC-32C, reflected, seed and result inverted (the crc32c package's convention), by table."""
    reg = ~seed & 0xFFFFFFFF
    for byte in bytes(data):
        reg = (reg >> 8) ^ _TABLE[(reg ^ byte) & 0xFF]
    return ~reg & 0xFFFFFFFF


def pattern8(pattern) -> bytes:
    raw = bytes([pattern]) if isinstance(pattern, int) else bytes(pattern)
    return raw * (8 // len(raw))


def first_difference(a: bytes, b: bytes):
    return next((i for i in range(len(a)) if a[i] != b[i]), None)


def delta_oracle(original: bytes, modified: bytes) -> bytes:
    return b"".join(struct.pack("<H", off // 8) + modified[off : off + 8] for off in range(0, len(original), 8)
                    if original[off : off + 8] != modified[off : off + 8])


def oracle(name, src, dst, dst2, seed, pattern, flip):
    """What ``apply`` must produce: (result, dst bytes, dst2 bytes), computed here."""
    src, dst, dst2 = bytes(src), bytearray(dst), bytearray(dst2)
    n = len(src)
    if name == "copy":
        return None, bytes(src), bytes(dst2)
    if name == "fill":
        return None, (pattern8(pattern) * (n // 8 + 1))[:n], bytes(dst2)
    if name == "compare":
        other = bytearray(src)
        if flip is not None and n:
            other[flip % n] ^= 0x5A
        return first_difference(src, other), bytes(other), bytes(dst2)
    if name == "compare_pattern":
        filled = bytearray((pattern8(pattern) * (n // 8 + 1))[:n])
        if flip is not None and n:
            filled[flip % n] ^= 0x01
        return first_difference(filled, (pattern8(pattern) * (n // 8 + 1))[:n]), bytes(filled), bytes(dst2)
    if name == "crc32c":
        return crc32c_oracle(src, seed), bytes(dst), bytes(dst2)
    if name == "copy_crc32c":
        return crc32c_oracle(src, seed), bytes(src), bytes(dst2)
    if name == "dualcast":
        return None, bytes(src), bytes(src)
    m8 = n - n % 8
    if name == "create_delta":
        modified = bytearray(src[:m8])
        for i in range(0, m8, max(1, (flip or 0) % 97 + 1) * 8):
            modified[i] ^= 1
        return delta_oracle(src[:m8], bytes(modified)), bytes(dst), bytes(dst2)
    if name == "apply_delta":
        modified = bytearray(src[:m8])
        if flip is not None and m8:
            modified[flip % m8] ^= 0xFF
        delta = delta_oracle(bytes(dst[:m8]), bytes(modified))
        dst[:m8] = modified
        if len(delta) >= 20:  # the rotated record's offsets are no longer increasing
            return ("refused", 7, delta), bytes(dst), bytes(dst2)
        rotated = delta[10:] + delta[:10]
        for i in range(0, len(rotated), 10):
            off = struct.unpack_from("<H", rotated, i)[0] * 8
            dst[off : off + 8] = rotated[i + 2 : i + 10]
        return delta, bytes(dst), bytes(dst2)
    if name == "batch":
        half = n // 2
        other = bytearray(src[half:])
        if flip is not None and len(other):
            other[flip % len(other)] ^= 0x10
        dst[:half] = src[:half]
        dst[half:] = (pattern8(pattern) * (n // 8 + 2))[: n - half]
        return [None, crc32c_oracle(src, seed), None, first_difference(src[half:], other)], bytes(dst), bytes(dst2)
    raise AssertionError(name)


# Fallbacks the mover documents for this workload: small work stays on the CPU.
EXPECTED_FALLBACKS = {"below_threshold"}


async def apply(mover, name, src, dst, dst2, seed, pattern, flip):
    if name == "copy":
        return await mover.copy(dst, src)
    if name == "fill":
        return await mover.fill(dst, pattern)
    if name == "compare":
        dst[:] = src
        if flip is not None and len(dst):
            dst[flip % len(dst)] ^= 0x5A
        return await mover.compare(src, dst)
    if name == "compare_pattern":
        await mover.fill(dst, pattern)
        if flip is not None and len(dst):
            dst[flip % len(dst)] ^= 0x01
        return await mover.compare_pattern(dst, pattern)
    if name == "crc32c":
        return await mover.crc32c(src, seed)
    if name == "copy_crc32c":
        return await mover.copy_crc32c(dst, src, seed)
    if name == "dualcast":
        return await mover.dualcast(dst, dst2, src)
    n = len(src) - len(src) % 8
    if name == "create_delta":
        modified = bytearray(src[:n])
        for i in range(0, n, max(1, (flip or 0) % 97 + 1) * 8):
            modified[i] ^= 1
        return await mover.create_delta(src[:n], modified)
    if name == "apply_delta":
        modified = bytearray(src[:n])
        if flip is not None and n:
            modified[flip % n] ^= 0xFF
        delta = await mover.create_delta(dst[:n], modified)
        await mover.apply_delta(dst[:n], delta)
        try:  # a corrupt record is refused the same way by both
            await mover.apply_delta(dst[:n], delta[10:] + delta[:10])
        except DeltaRecordError as exc:
            return ("refused", exc.status, delta)
        return delta
    if name == "batch":
        half = len(src) // 2
        other = bytearray(src[half:])
        if flip is not None and len(other):
            other[flip % len(other)] ^= 0x10
        # Batched requests are independent (no order among them), as in DSA.
        return await mover.batch([("copy", dst[:half], src[:half]), ("crc32c", src, seed), ("fill", dst[half:], pattern),
                                  ("compare", src[half:], other)])
    raise AssertionError(name)


STRATEGIES = dict(
    name=st.sampled_from(OPS),
    size=st.one_of(st.integers(0, 300), st.integers(4000, 70000)),
    offset=st.integers(0, 63),
    seed=st.integers(0, 0xFFFFFFFF),
    pattern=st.one_of(st.integers(0, 255), st.binary(min_size=8, max_size=8), st.binary(min_size=2, max_size=2)),
    flip=st.one_of(st.none(), st.integers(0, 1 << 20)),
    fault=st.one_of(st.none(), st.integers(0, 1 << 20)),
    data=st.randoms(use_true_random=False),
)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@settings(max_examples=80, **SETTINGS)
@given(**STRATEGIES)
def test_mover_matches_the_oracles(ext, name, size, offset, seed, pattern, flip, fault, data):
    check_against_oracles(ext, name, size, offset, seed, pattern, flip, fault, data)


@pytest.mark.slow
@settings(max_examples=1000, **SETTINGS)
@given(**STRATEGIES)
def test_mover_matches_the_oracles_long(ext, name, size, offset, seed, pattern, flip, fault, data):
    check_against_oracles(ext, name, size, offset, seed, pattern, flip, fault, data)


def check_against_oracles(ext, name, size, offset, seed, pattern, flip, fault, data):
    payload = data.randbytes(size)

    async def run():
        mover = open_mover("emulated", threshold=2048, emulator_options={"max_transfer": 16384})
        areas = [bytearray(offset) + bytearray(payload), bytearray(size + offset + 8192), bytearray(size + offset + 8192)]
        src = memoryview(areas[0])[offset:]
        dst = memoryview(areas[1])[offset : offset + size]
        # dualcast's destinations keep equal low 12 bits so the device can take them
        base1, base2 = ext.address_of(areas[1]), ext.address_of(areas[2])
        start2 = offset + ((base1 - base2) % 4096)
        dst2 = memoryview(areas[2])[start2 : start2 + size]
        expected = oracle(name, src, dst, dst2, seed, pattern, flip)
        if fault is not None and size:
            mover.emulator.set_fault(ext.address_of(src) + fault % size, 1)
            mover.emulator.set_fault(ext.address_of(dst) + (fault * 7) % size, 1)
        try:
            result = await apply(mover, name, src, dst, dst2, seed, pattern, flip)
        finally:
            await mover.aclose()
        stats = mover.stats()
        assert stats["emulator"]["overflows"] == 0
        assert set(stats["fallbacks"]) <= EXPECTED_FALLBACKS, stats["fallbacks"]
        return (result, bytes(areas[1][offset : offset + size]), bytes(dst2)), expected

    got, expected = trio.run(run)
    assert got == expected
