"""Blob decoding shared by every operation (snapshot/_payload_data.py)."""

from __future__ import annotations

import os

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmuserd.snapshot._payload_data import _BROTLI_PIECE, DataError, decompress

BROTLI = 2


@pytest.mark.parametrize("size", [0, 1000, _BROTLI_PIECE - 3, 3 * _BROTLI_PIECE + 17])
@pytest.mark.parametrize("tail", [b"", b"\x03", b"\x00\x00\x00"])
def test_bytes_after_a_brotli_stream_are_ignored_as_aosps_bspatch_does(size, tail):
    """AOSP's bsdiff leaves 2-3 bytes after the extra stream of puffin's inner patches (found by the bench)."""
    data = os.urandom(size // 2) + b"pattern" * (size // 14)
    assert decompress(BROTLI, brotli.compress(data, quality=1) + tail, len(data), "s") == data


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 40), st.binary(max_size=8))
def test_a_cut_or_damaged_brotli_stream_is_a_data_error(data, cut, noise):
    stream = brotli.compress(data)
    for bad in (stream[:-cut], noise + stream[len(noise):]):
        try:
            out = decompress(BROTLI, bad, len(data), "s")
        except DataError:
            continue
        assert len(out) <= len(data)  # whatever decodes stays within the limit


def test_more_output_than_expected_is_refused():
    with pytest.raises(DataError, match="more than"):
        decompress(BROTLI, brotli.compress(b"x" * 5000) + b"\x01", 4999, "s")
