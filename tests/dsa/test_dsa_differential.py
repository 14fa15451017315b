"""Differential: the cpu and emulated engines agree on random operations.

Sizes straddle the threshold and the (small) max transfer so single
descriptors, split pieces and CPU-side work all occur; some examples also
inject page faults, which the emulated engine must recover from invisibly.
"""

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmuserd.dsa_offload import DeltaRecordError, open_mover

OPS = ["copy", "fill", "compare", "compare_pattern", "crc32c", "copy_crc32c", "dualcast", "create_delta",
       "apply_delta", "batch"]


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
def test_engines_agree(ext, name, size, offset, seed, pattern, flip, fault, data):
    check_engines_agree(ext, name, size, offset, seed, pattern, flip, fault, data)


@pytest.mark.slow
@settings(max_examples=1000, **SETTINGS)
@given(**STRATEGIES)
def test_engines_agree_long(ext, name, size, offset, seed, pattern, flip, fault, data):
    check_engines_agree(ext, name, size, offset, seed, pattern, flip, fault, data)


def check_engines_agree(ext, name, size, offset, seed, pattern, flip, fault, data):
    payload = data.randbytes(size)

    async def run(engine):
        mover = open_mover(engine, threshold=2048, emulator_options={"max_transfer": 16384})
        areas = [bytearray(offset) + bytearray(payload), bytearray(size + offset + 8192), bytearray(size + offset + 8192)]
        src = memoryview(areas[0])[offset:]
        dst = memoryview(areas[1])[offset : offset + size]
        # dualcast's destinations keep equal low 12 bits so the device can take them
        base1, base2 = ext.address_of(areas[1]), ext.address_of(areas[2])
        start2 = offset + ((base1 - base2) % 4096)
        dst2 = memoryview(areas[2])[start2 : start2 + size]
        if engine == "emulated" and fault is not None and size:
            mover.emulator.set_fault(ext.address_of(src) + fault % size, 1)
            mover.emulator.set_fault(ext.address_of(dst) + (fault * 7) % size, 1)
        try:
            result = await apply(mover, name, src, dst, dst2, seed, pattern, flip)
        finally:
            await mover.aclose()
        if mover.emulator is not None:
            assert mover.emulator.stats()["overflows"] == 0
        return result, bytes(areas[1][offset : offset + size]), bytes(dst2)

    assert trio.run(run, "cpu") == trio.run(run, "emulated")
