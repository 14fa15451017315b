"""The reader's C bulk path (``snapshot/_cow_native.c``) gives what its Python bulk path gives.

test_merge_fastpaths compares the bulk path with the per-op path; with the
extension built, the bulk path is the C one. Here both bulk paths read the
same clustered files, valid and mutated (the fuzz test's mutations), to the
same op table and positions, or fail with the same error.
"""

from __future__ import annotations

import os
import tempfile
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cow_fuzz import mutate, mutation, sample
from test_merge_fastpaths import _read

from dmuserd.snapshot import _cow_reader
from dmuserd.snapshot._cow_reader import CowReader

pytestmark = pytest.mark.skipif(_cow_reader._NATIVE is None,
                                reason="the optional _cow_native extension is not built (no C compiler at install)")


def _same_both_ways(data: bytes):
    """What the reader makes of ``data`` (test_merge_fastpaths' ``_read``, bulk path on) with the C
    bulk path and with the Python one: the same."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "c")
        with open(path, "wb") as f:
            f.write(data)
        native = _read(path, True)
        with mock.patch.object(_cow_reader, "_NATIVE", None):
            python = _read(path, True)
    assert native == python
    return native


def test_clustered_samples_read_the_same_in_c():
    for kind in ("v2-lz4-clusters", "v2-gz"):
        result = _same_both_ways(sample(kind))
        assert result[0] == "ok" and len(result[1]["type"]) > 8


def test_c_path_is_taken():
    """The C path runs for a clustered file (a reader that never called it would pass the comparison)."""
    calls = []
    real = _cow_reader._NATIVE

    class Spy:
        def plain_v2(self, *args):
            calls.append(args[1])
            return real.plain_v2(*args)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "c")
        with open(path, "wb") as f:
            f.write(sample("v2-lz4-clusters"))
        with mock.patch.object(_cow_reader, "_NATIVE", Spy()):
            CowReader(path).close()
    assert calls and sum(calls) > 8


@settings(max_examples=150, deadline=5000, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["v2-lz4-clusters", "v2-gz"]), m=mutation)
def test_mutated_clustered_files_read_the_same_in_c(kind, m):
    _same_both_ways(mutate(sample(kind), m))
