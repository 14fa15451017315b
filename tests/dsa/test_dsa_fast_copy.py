"""The mover's inline fast path in C (``_dsa.Inline``): same results, errors,
counters and cancellation rule as the Python path it stands in for.

``Mover._copy_py(mover, ...)`` / ``Mover._fill_py(mover, ...)`` (the
class's own ``async def`` methods) are the Python path; ``mover.copy`` /
``mover.fill`` are the extension's C methods when it is built (``Inline`` is
the mover's base class). Both use the same state (credit, limits, inline
counters: members of that base), so they can be compared call for call.
"""

import collections.abc
import random
import sys

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmuserd.dsa_offload import DsaArgumentError, Mover, open_mover
from dmuserd.dsa_offload._mover import CALL_CHARGE, CHECKPOINT_CREDIT
from no_extension import run_without_extension

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def counters(mover):
    stats = mover.stats()
    return {key: stats[key] for key in ("ops", "cpu_ops", "cpu_bytes", "offloaded_ops", "fallbacks")}


async def test_the_cpu_engine_uses_the_c_path_when_built(ext):
    mover = open_mover("cpu")
    assert isinstance(mover, ext.Inline)
    # Plain class lookup finds the C methods: nothing on the instance replaces them.
    assert type(mover).copy is ext.Inline.copy and type(mover).fill is ext.Inline.fill
    assert "copy" not in vars(mover) and "fill" not in vars(mover)
    assert mover.copy.__self__ is mover and mover.fill.__self__ is mover
    # A small copy returns the finished awaitable, not a coroutine object.
    result = mover.copy(bytearray(4), b"abcd")
    assert result is ext.DONE and isinstance(result, collections.abc.Coroutine)
    assert await result is None


@settings(max_examples=150, **SETTINGS)
@given(size=st.one_of(st.integers(0, 300), st.integers(300, 200_000)), dst_off=st.integers(0, 4200),
       src_off=st.integers(0, 4200), nogil=st.booleans(), same_buffer=st.booleans(), seed=st.integers(0, 1 << 32))
def test_copy_matches_the_python_path(ext, size, dst_off, src_off, nogil, same_buffer, seed):
    """Every size and alignment, overlapping or not, with and without the GIL."""
    data = random.Random(seed)
    initial = data.randbytes(size + 4200 + 64)
    other = data.randbytes(size + 4200 + 64)

    async def run(fast: bool):
        mover = open_mover("cpu", cpu_thread_threshold=None)
        if nogil:
            mover._nogil = 64  # exercise the GIL-releasing branch on small sizes
        area = bytearray(initial)
        src_area = area if same_buffer else bytearray(other)
        dst = memoryview(area)[dst_off : dst_off + size]
        src = memoryview(src_area)[src_off : src_off + size]
        before = mover._credit
        if fast:
            await mover.copy(dst, src)
        else:
            await Mover._copy_py(mover, dst, src)
        return bytes(area), counters(mover), before - mover._credit

    fast, slow = trio.run(run, True), trio.run(run, False)
    assert fast == slow
    assert fast[1]["cpu_bytes"] == size and fast[2] == size + CALL_CHARGE


PATTERNS = st.one_of(st.integers(0, 255), st.binary(min_size=1, max_size=1), st.binary(min_size=2, max_size=2),
                     st.binary(min_size=4, max_size=4), st.binary(min_size=8, max_size=8), st.none())


@settings(max_examples=150, **SETTINGS)
@given(size=st.one_of(st.integers(0, 300), st.integers(300, 200_000)), offset=st.integers(0, 63),
       pattern=PATTERNS, nogil=st.booleans())
def test_fill_matches_the_python_path(ext, size, offset, pattern, nogil):
    async def run(fast: bool):
        mover = open_mover("cpu", cpu_thread_threshold=None)
        if nogil:
            mover._nogil = 64
        area = bytearray(b"\x5a" * (size + 128))
        dst = memoryview(area)[offset : offset + size]
        args = (dst,) if pattern is None else (dst, pattern)
        if fast:
            await mover.fill(*args)
        else:
            await Mover._fill_py(mover, *args)
        return bytes(area), counters(mover)

    fast, slow = trio.run(run, True), trio.run(run, False)
    assert fast == slow
    raw = b"\0" if pattern is None else bytes([pattern]) if isinstance(pattern, int) else pattern
    expected = (raw * (size // len(raw) + 1))[:size]
    assert fast[0][offset : offset + size] == expected
    assert fast[0][:offset] == b"\x5a" * offset and fast[0][offset + size :] == b"\x5a" * (128 - offset)


async def test_bad_buffers_get_the_typed_errors_and_nothing_is_written(ext):
    mover = open_mover("cpu")
    dst = bytearray(8)
    cases = [
        ((bytearray(8), b"123"), "differ in length"),
        ((memoryview(b"12345678"), b"abcdefgh"), "writable"),
        ((b"12345678", b"abcdefgh"), "writable"),
        ((dst, 12345678), "buffer protocol"),
        (("a string", b"abcdefgh"), "buffer protocol"),
        ((memoryview(bytearray(16))[::2], b"abcdefgh"), "contiguous"),
        ((dst, memoryview(b"0123456789abcdef")[::2]), "contiguous"),
    ]
    for args, message in cases:
        with pytest.raises(DsaArgumentError, match=message):
            await mover.copy(*args)
    fills = [((memoryview(b"12345678"), 1), "writable"), ((bytearray(8), b"abc"), "1, 2, 4 or 8 bytes"),
             ((bytearray(8), 256), "byte value"), ((bytearray(8), -1), "byte value"), ((dst, "xy"), "byte value"),
             ((memoryview(bytearray(16))[::2], 1), "contiguous")]
    for args, message in fills:
        with pytest.raises(DsaArgumentError, match=message):
            await mover.fill(*args)
    assert dst == bytes(8)
    stats = mover.stats()
    assert stats["ops"] == stats["cpu_ops"] == stats["cpu_bytes"] == 0
    # Not a byte format or not one-dimensional: copied as bytes, like the Python path.
    wide = memoryview(bytearray(8)).cast("I")
    await mover.copy(wide, b"abcdefgh")
    assert wide.tobytes() == b"abcdefgh"
    square = memoryview(bytearray(16)).cast("B", (4, 4))
    await mover.fill(square, b"ab")
    assert square.tobytes() == b"ab" * 8
    assert counters(mover) == {"ops": 2, "cpu_ops": 2, "cpu_bytes": 24, "offloaded_ops": 0, "fallbacks": {}}


async def test_counters_are_exact_after_many_fast_calls(ext):
    mover = open_mover("cpu")
    sizes = [(i * 7919) % 70000 for i in range(3000)]
    src = memoryview(bytes(range(256)) * 300)
    dst = memoryview(bytearray(len(src)))
    for n in sizes:
        await mover.copy(dst[:n], src[:n])
        await mover.fill(dst[: n + 1], n & 0xFF)
    total = sum(sizes) + sum(n + 1 for n in sizes)
    assert counters(mover) == {"ops": 6000, "cpu_ops": 6000, "cpu_bytes": total, "offloaded_ops": 0, "fallbacks": {}}
    # Some of those calls went through the Python path (the ones that drew the
    # credit down to a checkpoint); the counts do not depend on which path ran.
    assert total > CHECKPOINT_CREDIT


async def test_below_threshold_work_on_a_device_engine_is_counted_as_a_fallback(make_mover):
    mover = make_mover("emulated", threshold=4096)
    src, dst = bytes(range(200)) * 20, bytearray(4000)
    for _ in range(10):
        await mover.copy(dst, src)
        await mover.fill(dst, b"xyzw")
    await mover.copy(bytearray(8192), bytes(8192))  # offloaded: not on the inline path
    stats = mover.stats()
    assert stats["ops"] == 21 and stats["offloaded_ops"] == 1 and stats["cpu_ops"] == 20
    assert stats["cpu_bytes"] == 20 * 4000 and stats["fallbacks"] == {"below_threshold": 20}
    assert dst == b"xyzw" * 1000


async def test_work_at_the_inline_limit_leaves_the_c_path(ext):
    # From cpu_thread_threshold up the copy runs in a worker thread (the
    # Python path): counted as CPU work, not as inline work.
    mover = open_mover("cpu", cpu_thread_threshold=4096)
    src = bytes(range(256)) * 32
    dst = memoryview(bytearray(len(src)))
    await mover.copy(dst, src)
    await mover.fill(dst[:4096], b"ab")
    await mover.copy(dst[4096:8000], src[:3904])
    assert dst[:4096] == b"ab" * 2048 and dst[4096:8000] == src[:3904]
    assert mover._inline_ops == 1 and counters(mover)["cpu_bytes"] == 8192 + 4096 + 3904
    mover.cpu_thread_threshold = None  # the limit follows the property
    assert mover._below == sys.maxsize


@pytest.mark.parametrize("what", ["copy", "fill"])
async def test_a_cancelled_loop_of_small_calls_stops_within_the_documented_bound(ext, what):
    mover = open_mover("cpu")
    calls = 0
    with trio.CancelScope() as scope:
        scope.cancel()
        while True:
            dst = memoryview(bytearray(10))
            if what == "copy":
                await mover.copy(dst, b"x" * 10)
            else:
                await mover.fill(dst, b"x")
            calls += 1
    assert scope.cancelled_caught
    assert 0 < calls <= CHECKPOINT_CREDIT // CALL_CHARGE
    assert bytes(dst) == bytes(10)  # the call that raised did nothing
    assert mover._credit == CHECKPOINT_CREDIT  # reset by that checkpoint
    assert mover.stats()["cpu_ops"] == calls


async def test_buffers_are_released_after_every_call(ext):
    mover = open_mover("cpu")
    dst, src = bytearray(100), bytearray(b"s" * 100)
    await mover.copy(dst, src)
    await mover.fill(dst, b"ab")
    with pytest.raises(DsaArgumentError):
        await mover.copy(dst, bytes(99))
    with pytest.raises(DsaArgumentError):
        await mover.fill(dst, b"abc")
    dst += b"more"  # a bytearray with an export held cannot be resized
    src.extend(b"tail")
    del dst[:50]
    view = memoryview(bytearray(64))
    await mover.copy(view, bytes(64))
    await mover.fill(view)
    view.release()  # refuses while anything still holds the view's buffer
    assert len(dst) == 54 and len(src) == 104


async def test_the_finished_awaitable_works_where_trio_wants_a_coroutine(ext):
    mover = open_mover("cpu")
    dst = bytearray(16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mover.copy, dst, b"0123456789abcdef")
    assert dst == b"0123456789abcdef"
    await trio.to_thread.run_sync(lambda: trio.from_thread.run(mover.fill, dst, b"z"))
    assert dst == b"z" * 16
    done = ext.DONE
    refs = sys.getrefcount(done)
    for _ in range(1000):
        await mover.copy(dst, bytes(16))
    assert sys.getrefcount(done) == refs
    with pytest.raises(StopIteration):
        done.send(None)
    with pytest.raises(KeyError):
        done.throw(KeyError("x"))
    assert done.close() is None


async def test_a_closed_mover_refuses_fills_on_both_paths(ext):
    mover = open_mover("cpu")
    await mover.aclose()
    with pytest.raises(DsaArgumentError, match="closed"):
        await mover.fill(bytearray(8))
    with pytest.raises(DsaArgumentError, match="closed"):
        await Mover._fill_py(mover, bytearray(8))


WITHOUT_EXTENSION_MAIN = """
    async def main():
        mover = open_mover("cpu")
        dst = bytearray(4096)
        for i in range(100):
            await mover.copy(memoryview(dst), memoryview(bytes([i]) * 4096))
            await mover.fill(dst, b"ab")
        s = mover.stats()
        return {"inline": type(mover).__mro__[1].__name__, "copy_is_python": type(mover).copy is type(mover).__mro__[1].copy, "filled": dst == b"ab" * 2048,
                "counts": [s["ops"], s["cpu_ops"], s["cpu_bytes"]], "info": gather()}
"""


def test_without_the_extension_the_python_path_counts_the_same_and_info_says_so():
    report = run_without_extension(WITHOUT_EXTENSION_MAIN)
    assert report["inline"] == "_InlineState" and report["copy_is_python"] and report["filled"]
    assert report["counts"] == [200, 200, 200 * 4096]
    assert "python" in report["info"]["inline"].lower()


def test_dsa_info_names_the_inline_path(ext):
    from dmuserd.dsa_offload.commands import gather

    assert "C" in gather()["inline"].split() and "Inline" in gather()["inline"]


def test_a_dropped_mover_is_collected(ext):
    # A mover holds no reference to itself (Inline stores no bound methods):
    # it goes when its last reference does, or at the latest with gc.
    import gc
    import weakref

    mover = open_mover("cpu")
    ref = weakref.ref(mover)
    del mover
    gc.collect()
    assert ref() is None
