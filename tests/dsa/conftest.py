"""Fixtures for the DSA offload tests: the extension, emulators, movers on them.

Every emulated mover is checked on the way out: a dedicated queue that was
ever overflowed (more descriptors than its size in flight) fails the test,
because real hardware would have dropped the extra descriptors silently.
"""

from __future__ import annotations

import pytest

from dmuserd.dsa_offload import extension, load_error, open_mover


@pytest.fixture
def ext():
    module = extension()
    if module is None:
        pytest.fail(f"the _dsa extension did not build/load: {load_error()}")
    return module


@pytest.fixture
def make_mover(ext):
    """make_mover(engine="emulated", threshold=..., **emulator options) -> Mover."""
    movers = []

    def make(engine="emulated", threshold=4096, block_on_fault=False, **options):
        if engine == "emulated":
            options["block_on_fault"] = block_on_fault
        mover = open_mover(engine, threshold=threshold, emulator_options=options, block_on_fault=block_on_fault)
        movers.append(mover)
        return mover

    yield make
    for mover in movers:
        mover.close()
        if mover.emulator is not None:
            stats = mover.emulator.stats()
            assert stats["overflows"] == 0, f"dedicated queue overflowed: {stats}"
            assert stats["max_occupancy"] <= mover.emulator.size


def addr(ext, buf, offset=0) -> int:
    return ext.address_of(buf) + offset
