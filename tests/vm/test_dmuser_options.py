"""The dm-user export's options, table lines and command-line errors (host; no dm-user kernel needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmuserd.daemon.config import ExportSpec, parse_export
from dmuserd.daemon.dmsetup import DmError, check_name, user_table
from dmuserd.daemon.dmuser import DmUserExport
from dmuserd.errors import DmuserdError

MiB = 1 << 20


def _options(text: str) -> tuple:
    export = DmUserExport.from_spec(parse_export(text), None)
    return export.channels, export.create, export.size


def test_defaults_and_options():
    assert _options("dm-user:disk") == (4, False, None)  # (the size: the backend's)
    assert _options("dm-user:disk,channels=8,create=1,size=16M") == (8, True, 16 * MiB)


@pytest.mark.parametrize("text, words", [
    ("dm-user:d,channels=four", "option channels: 'four' is not an integer"),
    ("dm-user:d,channels=0", "1 to 64"),
    ("dm-user:d,create=maybe", "not a boolean"),
    ("dm-user:d,size=lots", "not a size"),
    ("dm-user:d,chanels=2", "unknown option(s) chanels"),
])
def test_bad_options_are_typed_errors_naming_the_option(text, words):
    with pytest.raises(DmuserdError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _options(text)


def test_table_line():
    assert user_table("disk", 256 * MiB) == "0 524288 user 0 524288 disk"
    with pytest.raises(DmError, match="multiple of 512"):
        user_table("disk", 1000)
    with pytest.raises(DmError, match="letters, digits"):
        user_table("a b", 4096)


@given(st.text(max_size=200), st.integers(min_value=-(2**70), max_value=2**70))
def test_fuzz_table_line_is_a_table_or_a_dm_error(name, size):
    try:
        line = user_table(name, size)
    except DmError:
        return
    assert check_name(name) == name
    fields = line.split(" ")
    assert fields[2] == "user" and fields[-1] == name and int(fields[1]) * 512 == size


async def test_attaching_to_a_missing_device_says_how_to_create_it(nursery):
    from dmuserd.backends import create
    from dmuserd.daemon.config import TargetSpec
    from dmuserd.daemon.runtime import Target

    target = Target(TargetSpec("t", "memory", {"size": "1M"}, []), create("memory", {"size": "1M"}))
    name = "dmuserd-test-no-such-device"
    with pytest.raises(DmError, match=f"dmuserd dm create {name}"):
        await DmUserExport.from_spec(ExportSpec("dm-user", name, {}), None).start(target, nursery)
    assert target.endpoints == {}


async def test_a_size_larger_than_the_backend_is_refused_at_start(nursery):
    from dmuserd.backends import create
    from dmuserd.daemon.config import TargetSpec
    from dmuserd.daemon.runtime import Target

    target = Target(TargetSpec("t", "memory", {"size": "64M"}, []), create("memory", {"size": "64M"}))
    export = DmUserExport.from_spec(parse_export("dm-user:d,size=2G"), None)
    with pytest.raises(DmuserdError, match="export dm-user:d,size=2G: size 2147483648 is larger than the backend"):
        await export.start(target, nursery)


def test_cli_errors_are_one_line():
    for argv in (["dm", "create", "a/b", "--size", "1M"], ["dm", "create", "x", "--size", "1000"]):
        proc = subprocess.run([sys.executable, "-m", "dmuserd", *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("dmuserd: error: "), proc.stderr
