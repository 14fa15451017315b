"""The pattern backend against dmuserd's backend conformance suite, plus its own promise.

Run from this folder: ``python -m pytest`` (pytest and dmuserd installed).
"""

from __future__ import annotations

import struct

import trio

from dmuserd.backends import create
from dmuserd.backends.testing import BackendConformance
from dmuserd_pattern import PatternBackend


def pattern(offset: int, length: int) -> bytes:
    """What the device holds at ``offset``: each 8-byte word is its own offset, big-endian."""
    first = offset - offset % 8
    words = b"".join(struct.pack(">Q", n) for n in range(first, offset + length + 8, 8))
    return words[offset - first : offset - first + length]


class TestPattern(BackendConformance):
    def make_backend(self, workdir):
        return PatternBackend(size=8 << 20)

    def expected(self, workdir, offset, length):
        return pattern(offset, length)

    def options(self, workdir):
        return {"size": "8M"}


class TestPattern4K(TestPattern):
    def make_backend(self, workdir):
        return PatternBackend(size=8 << 20, block_size=4096)

    def options(self, workdir):
        return {"size": "8M", "block_size": "4K"}


def test_found_by_its_registry_name_once_installed():
    backend = create("dmuserd_pattern:PatternBackend", {"size": "1M"})
    assert trio.run(backend.read, 4096, 16) == pattern(4096, 16)
