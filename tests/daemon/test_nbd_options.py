"""``nbd:`` export addresses and options: typed errors for anything wrong (fuzzed)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmuserd.backends.memory import MemoryBackend
from dmuserd.daemon.config import parse_export
from dmuserd.daemon.nbd import NbdError, parse_where, settings_for, state_dir_for


class _Target:
    def __init__(self) -> None:
        self.backend = MemoryBackend(1 << 20, 4096)


def test_addresses():
    assert parse_where("/run/x/disk.sock") == ("unix", "/run/x/disk.sock")
    assert parse_where("disk.sock") == ("unix", os.path.abspath("disk.sock"))
    assert parse_where("tcp:127.0.0.1:10809") == ("tcp", ("127.0.0.1", 10809))
    assert parse_where("tcp:[::1]:10809") == ("tcp", ("::1", 10809))
    assert state_dir_for("/run/x/disk.sock").as_posix() == "/run/x/.disk.sock.dmuserd"
    for bad in ("tcp:", "tcp:host", "tcp::10809", "tcp:h:0", "tcp:h:65536", "tcp:h:port", ""):
        with pytest.raises(NbdError):
            parse_where(bad)


def test_options():
    export = parse_export("nbd:/tmp/d.sock,timeout=1.5,threads=16,on-stop=stop")
    got = settings_for(_Target(), export)
    assert (got.timeout, got.threads, got.size, got.block_size) == (1.5, 16, 1 << 20, 4096)
    assert got.caps == "discard,flush,read,write,write_zeroes"
    default = settings_for(_Target(), parse_export("nbd:/tmp/d.sock"))
    assert (default.timeout, default.threads) == (4.0, 8)  # dm-user's default daemon timeout; nbd.DEFAULT_THREADS
    for bad, word in (("timeout=-1", "timeout"), ("timeout=x", "timeout"), ("threads=0", "threads"),
                      ("threads=1000", "threads"), ("color=red", "unknown option")):
        with pytest.raises(NbdError, match=word):
            settings_for(_Target(), parse_export(f"nbd:/tmp/d.sock,{bad}"))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_fuzz_where(text):
    try:
        kind, address = parse_where(text)
    except NbdError as exc:
        assert "nbd:" in str(exc)
        return
    assert kind in ("unix", "tcp")
    if kind == "tcp":
        assert 0 < address[1] < 65536
    state_dir_for(text)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["timeout", "threads", "on-stop", "x"]), st.text(max_size=12), max_size=4))
def test_fuzz_options(options):
    from dmuserd.daemon.config import ExportSpec

    try:
        got = settings_for(_Target(), ExportSpec("nbd", "/tmp/d.sock", options))
    except NbdError as exc:
        assert "nbd:/tmp/d.sock" in str(exc) and str(exc).startswith("export ")
        return
    assert 0 <= got.timeout <= 3600 and 1 <= got.threads <= 128
