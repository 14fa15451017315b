"""The CPU engine: works without the extension, agrees with the crc32c package, stays fair."""

import random

import crc32c
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from dmuserd.dsa_offload import DsaArgumentError, _cpu, open_mover
from dmuserd.dsa_offload._native import extension
from dmuserd.dsa_offload._mover import CALL_CHARGE, CHECKPOINT_CREDIT
from no_extension import run_without_extension

WITHOUT_EXTENSION_MAIN = """
    async def main():
        mover = open_mover("auto")
        src = bytes(range(256)) * 1000
        dst = bytearray(len(src))
        await mover.copy(dst, src)
        crc = await mover.crc32c(src, 5)
        try:
            open_mover("emulated")
            emulated = "opened"
        except Exception as exc:
            emulated = type(exc).__name__
        return {"engine": mover.engine, "copied": dst == src, "crc": crc, "emulated": emulated,
                "info": gather()}
"""


def test_everything_but_the_device_works_without_the_extension():
    report = run_without_extension(WITHOUT_EXTENSION_MAIN)
    assert report["engine"] == "cpu" and report["copied"]
    assert report["crc"] == crc32c.crc32c(bytes(range(256)) * 1000, 5)
    assert report["emulated"] == "DsaUnavailable"
    info = report["info"]
    assert info["extension"]["available"] is False and "import" in info["extension"]["error"].lower()
    assert info["auto"]["engine"] == "cpu" and "extension" in info["auto"]["reason"]
    assert info["engines"] == ["cpu"]


async def test_cpu_engine_operations():
    mover = open_mover("cpu")
    src = bytes(range(256)) * 300
    dst, dst2 = bytearray(len(src)), bytearray(len(src))
    await mover.copy(dst, src)
    assert dst == src
    assert await mover.copy_crc32c(dst2, src, 3) == crc32c.crc32c(src, 3) and dst2 == src
    await mover.dualcast(dst, dst2, bytes(len(src)))
    assert not any(dst) and not any(dst2)
    await mover.fill(dst, b"xy")
    assert dst == b"xy" * (len(src) // 2)
    assert await mover.compare_pattern(dst, b"xy") is None
    dst[1001] = 0
    assert await mover.compare_pattern(dst, b"xy") == 1001
    assert mover.stats()["cpu_ops"] == 6 and mover.stats()["fallbacks"] == {}


@pytest.mark.parametrize("what", ["copy", "fill"])
async def test_inline_cpu_work_still_lets_other_tasks_run(what):
    mover = open_mover("cpu")
    src, dst = bytes(65536), bytearray(65536)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0)
        start = ticks
        for _ in range(10 * (CHECKPOINT_CREDIT // (65536 + CALL_CHARGE) + 1)):  # >= 10 checkpoints
            if what == "copy":
                await mover.copy(dst, src)
            else:
                await mover.fill(dst, 7)
        assert ticks - start >= 5  # about one tick per checkpoint
        nursery.cancel_scope.cancel()


async def test_cancellation_is_honoured_on_the_inline_path():
    # The documented rule: inline calls draw from a credit and the call that
    # exhausts it checkpoints before copying, so a cancelled loop of small
    # copies stops within CHECKPOINT_CREDIT // CALL_CHARGE calls, and the
    # call that raised did not copy.
    mover = open_mover("cpu")
    calls = 0
    with trio.CancelScope() as scope:
        scope.cancel()
        while True:
            dst = memoryview(bytearray(10))
            await mover.copy(dst, b"x" * 10)
            calls += 1
    assert scope.cancelled_caught
    assert calls <= CHECKPOINT_CREDIT // CALL_CHARGE
    assert bytes(dst) == bytes(10)


async def test_inline_fast_path_errors_are_typed_and_write_nothing():
    mover = open_mover("cpu")
    dst = memoryview(bytearray(8))
    with pytest.raises(DsaArgumentError, match="differ in length"):
        await mover.copy(dst, b"123")
    with pytest.raises(DsaArgumentError, match="writable"):
        await mover.copy(memoryview(b"12345678"), b"abcdefgh")
    with pytest.raises(DsaArgumentError, match="buffer protocol"):
        await mover.copy(dst, 12345678)
    with pytest.raises(DsaArgumentError, match="contiguous"):
        await mover.copy(memoryview(bytearray(16))[::2], b"abcdefgh")
    assert bytes(dst) == bytes(8)
    await mover.copy(memoryview(bytearray(8)).cast("I"), b"abcdefgh")  # cast, then copied
    stats = mover.stats()
    assert stats["ops"] == stats["cpu_ops"] == 1 and stats["cpu_bytes"] == 8


def _first_difference_reference(a: bytes, b: bytes):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@given(size=st.sampled_from([0, 1, 4095, 65535, 65536, 65537, 200_000]) | st.integers(0, 200_000),
       seed=st.integers(0, 2**32 - 1), draw=st.data())
@settings(max_examples=80, deadline=None)
def test_first_difference_finds_the_first_differing_byte(size, seed, draw):
    """The extension's memcmp path and the pure-Python path agree with a byte-by-byte scan
    (buffers around the 64 KiB chunk and GIL boundaries included)."""
    data = random.Random(seed).randbytes(size)
    other = bytearray(data)
    if size:
        for at in draw.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=3), label="flips"):
            other[at] ^= 0x5A
    want = _first_difference_reference(data, other)
    assert _cpu.first_difference(memoryview(data), memoryview(data)) is None
    assert _cpu.first_difference(memoryview(data), memoryview(other)) == want


@pytest.mark.parametrize("at", [None, 0, 1, 65535, 65536, 65537, 131071, 131072, 199_999])
def test_first_difference_at_chunk_boundaries(at):
    data = random.Random(at).randbytes(200_000)
    other = bytearray(data)
    if at is not None:
        other[at] ^= 1
        if at < len(other) - 1:
            other[-1] ^= 1  # a later difference must not be reported instead
    assert _cpu.first_difference(memoryview(data), memoryview(other)) == at


def test_first_difference_without_the_extension_agrees():
    report = run_without_extension("""
        async def main():
            from dmuserd.dsa_offload import _cpu
            a = bytes(range(256)) * 1024
            found = []
            for at in (None, 0, 65535, 65536, len(a) - 1):
                b = bytearray(a)
                if at is not None:
                    b[at] ^= 1
                found.append(_cpu.first_difference(memoryview(a), memoryview(b)))
            return {"found": found}
    """)
    assert report["found"] == [None, 0, 65535, 65536, 256 * 1024 - 1]


def test_first_difference_refuses_unequal_lengths():
    ext = extension()
    if ext is None:
        pytest.skip("the C extension is not built here (no compiler when installing)")
    with pytest.raises(ValueError, match="equal lengths"):
        ext.first_difference(b"ab", b"a")
