"""What the merge refuses: unsafe COW files (before touching the base), and
damaged headers or scratch windows at resume (typed errors, base left as is).
Plus the offline command line."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cow_helpers import BS, build_v2, build_v3, pattern_block, write
from merge_testlib import interrupt_in_window, merge_progress, sha256, torture_cow
from dmuserd.snapshot._merge_engine import MergeIO, read_state
from dmuserd.snapshot._merge_scratch import ScratchLayout
from dmuserd.snapshot.cow import CowFormatError, CowReader, OpType
from dmuserd.snapshot.merge import MergeError, MergeResumeError, MergeUnsafeError, merge_cow, plan_merge

DMUSERD = [sys.executable, "-m", "dmuserd"]


def _base(tmp_path, blocks=16):
    return write(tmp_path / "base.img", b"".join(pattern_block(i) for i in range(blocks)))


def _unsafe_cows(tmp_path):
    """COW files an in-place merge must refuse, by name."""
    out = {}
    # block 1 := base 2, then block 0 := base 1 (already overwritten by the first op)
    out["source-overwritten"] = tmp_path / "order.cow"
    build_v2(out["source-overwritten"], [(OpType.SEQUENCE, 0, None, struct.pack("<II", 1, 0)),
                                         (OpType.COPY, 1, 2), (OpType.COPY, 0, 1)], buffer_size=64 << 10)
    out["xor-reads-overwritten"] = tmp_path / "xor.cow"
    build_v3(out["xor-reads-overwritten"], [(OpType.COPY, 3, 7), (OpType.XOR, 5, 3 * BS - 100, bytes(BS))],
             sequence=[3, 5], buffer_size=64 << 10)
    out["no-scratch"] = tmp_path / "noscratch.cow"
    build_v2(out["no-scratch"], [(OpType.COPY, 0, 5), (OpType.REPLACE, 2, None, bytes(BS))], buffer_size=0)
    (tmp_path / "noscratch.cow.merge-journal").mkdir()  # and no journal can be written beside it
    out["past-the-base"] = tmp_path / "big.cow"
    build_v2(out["past-the-base"], [(OpType.ZERO, 20, 0)], buffer_size=64 << 10)
    return out


@pytest.mark.parametrize("case", ["source-overwritten", "xor-reads-overwritten", "no-scratch", "past-the-base"])
async def test_unsafe_cow_is_refused_before_touching_the_base(tmp_path, case):
    base = _base(tmp_path)
    cow = _unsafe_cows(tmp_path)[case]
    before, cow_before = sha256(base), sha256(cow)
    with pytest.raises(MergeUnsafeError, match="untouched"):
        await merge_cow(base, cow, offload="cpu")
    assert sha256(base) == before and sha256(cow) == cow_before
    # the command line says it in one line, exit status 1, no traceback
    res = subprocess.run(DMUSERD + ["cow", "merge", "--base", base, cow], capture_output=True, text=True)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("dmuserd: error:") and "Traceback" not in res.stderr
    assert "cannot be merged in place" in res.stderr
    assert sha256(base) == before and sha256(cow) == cow_before


def test_plan_counts_ordered_ops_and_window_capacity(tmp_path):
    t = torture_cow(tmp_path, 41, nblocks=256)
    with CowReader(t["cow"], check_merge=False) as reader:
        plan = plan_merge(reader, 256 * BS)
        assert plan.ordered == t["counts"]["copy"] + t["counts"]["xor"]
        assert all(plan.op(k).is_ordered for k in range(plan.ordered))
        assert not any(plan.op(k).is_ordered for k in range(plan.ordered, plan.total_ops))
    # snapuserd's figures for the default 2 MiB scratch: 8 KiB of metadata, 510 blocks
    layout = ScratchLayout(38, 2 << 20, BS)
    assert (layout.meta_size, layout.data_offset, layout.capacity) == (8192, 38 + 8192, 510)
    assert ScratchLayout(38, 0, BS).capacity == 0


async def _interrupted(tmp_path, seed=42):
    t = torture_cow(tmp_path, seed, nblocks=256, buffer_size=64 << 10)
    base, cow = tmp_path / "work.img", tmp_path / "work.cow"
    await interrupt_in_window(t, base, cow)
    return t, base, cow


def _poke(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("damage", ["window-data", "state-byte", "entry-block", "entry-offset", "num-merge-ops",
                                    "no-end-marker"])
async def test_damaged_resume_state_is_a_typed_error(tmp_path, damage):
    t, base, cow = await _interrupted(tmp_path)
    layout = ScratchLayout(38, 64 << 10, BS)
    if damage == "window-data":
        _poke(cow, layout.data_offset + 5, b"\xff\x00")
    elif damage == "state-byte":
        _poke(cow, layout.state_offset, b"\x07")
    elif damage == "entry-block":
        _poke(cow, layout.meta_offset, struct.pack("<Q", 999))
    elif damage == "entry-offset":
        _poke(cow, layout.meta_offset + 8, struct.pack("<Q", 12345))
    elif damage == "num-merge-ops":
        _poke(cow, 26, struct.pack("<Q", 10**9))
    else:
        _poke(cow, layout.meta_offset, b"\x01" * (layout.tag_offset - layout.meta_offset))
    base_before = sha256(base)
    with pytest.raises(MergeResumeError, match="damaged"):
        await merge_cow(base, cow, offload="cpu")
    assert sha256(base) == base_before
    res = subprocess.run(DMUSERD + ["cow", "merge", "--base", base, cow], capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr and "damaged" in res.stderr, res.stderr
    assert sha256(base) == base_before


async def test_damaged_magic_at_resume_is_a_format_error(tmp_path):
    t, base, cow = await _interrupted(tmp_path)
    _poke(cow, 0, b"XXXXXXXX")
    base_before = sha256(base)
    with pytest.raises(CowFormatError, match="magic"):
        await merge_cow(base, cow, offload="cpu")
    assert sha256(base) == base_before


async def test_window_without_our_crc_is_accepted(tmp_path):
    """A window written by snapuserd has no CRC record: it is trusted as is."""
    t, base, cow = await _interrupted(tmp_path)
    layout = ScratchLayout(38, 64 << 10, BS)
    _poke(cow, layout.tag_offset, bytes(8))
    result = await merge_cow(base, cow, offload="cpu")
    assert result.resumed_window
    assert base.read_bytes() == t["target_bytes"]


_FUZZ_LAYOUT = ScratchLayout(38, 16 << 10, BS)
_entry = st.tuples(st.sampled_from([0, 1, 2, 3, 5, 999, 2**63]),
                   st.sampled_from([0, 7, 12345] + [_FUZZ_LAYOUT.data_offset + k * BS for k in range(4)]))
_window = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda entries, end: b"".join(struct.pack("<QQ", *e) for e in entries) + (bytes(16) if end else b""),
              st.lists(_entry, max_size=6), st.booleans()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_window, st.integers(0, 4), st.one_of(st.none(), st.integers(0, 2**32 - 1)), st.binary(max_size=64))
def test_fuzz_scratch_window(tmp_path, meta, merged, crc, data):
    """Any bytes in a state-2 window: a resumable state or MergeResumeError."""
    cow = tmp_path / "fuzz.cow"
    if not cow.exists():
        build_v2(cow, [(OpType.COPY, 1, 0), (OpType.COPY, 0, 5), (OpType.XOR, 2, 2 * BS + 7, bytes(BS)),
                       (OpType.ZERO, 3, 0)], buffer_size=16 << 10)
    layout = _FUZZ_LAYOUT
    area = layout.tag_offset - layout.meta_offset
    with open(cow, "r+b") as f:
        f.seek(26)
        f.write(struct.pack("<Q", merged))
        f.seek(layout.state_offset)
        f.write(b"\x02" + meta[:area].ljust(area, b"\0"))
        f.write(bytes(8) if crc is None else layout.tag_bytes(crc))
        f.write(data.ljust(layout.capacity * BS, b"\0"))
    from dmuserd.dsa_offload._cpu import crc32c

    with CowReader(cow, check_merge=False) as reader, open(cow, "rb") as fd:
        plan = plan_merge(reader, 16 * BS)
        try:
            state = read_state(MergeIO(-1, fd.fileno()), reader, plan, crc=crc32c)
        except MergeResumeError:
            return
    assert state.pending is not None and state.merged_ops == merged
    window = state.pending.blocks
    assert state.pending.first == merged
    assert window == [plan.op(k).new_block for k in range(merged, merged + len(window))]
    assert all(plan.op(k).is_ordered for k in range(merged, merged + len(window)))


def test_cow_merge_command(tmp_path):
    t = torture_cow(tmp_path, 43, nblocks=256, version=3, compression="zstd", buffer_size=64 << 10)
    res = subprocess.run(DMUSERD + ["cow", "merge", "--base", t["base"], t["cow"], "--offload", "emulated"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"merged {t['total_ops']} ops" in res.stdout
    assert sha256(t["base"]) == t["target_sha"]
    assert merge_progress(t["cow"])[0] == t["total_ops"]
    again = subprocess.run(DMUSERD + ["cow", "merge", "--base", t["base"], t["cow"]], capture_output=True, text=True)
    assert again.returncode == 0 and "already merged" in again.stdout
    assert sha256(t["base"]) == t["target_sha"]
    # inspect shows every op merged
    inspect = subprocess.run(DMUSERD + ["cow", "inspect", t["cow"]], capture_output=True, text=True)
    assert f"Merge ops: {t['total_ops']}" in inspect.stdout
    # a missing base is one line
    res = subprocess.run(DMUSERD + ["cow", "merge", "--base", tmp_path / "nope.img", t["cow"]],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "nope.img" in res.stderr and "Traceback" not in res.stderr


def test_cow_merge_resumes_after_interruption(tmp_path):
    """Killed partway (SIGKILL at its first commit), the command resumes and finishes."""
    t = torture_cow(tmp_path, 44, nblocks=512, buffer_size=64 << 10)
    code = (
        "import os, signal, sys, trio\n"
        "from dmuserd.snapshot.merge import merge_cow\n"
        "def p(plan, done):\n"
        "    if 0 < done < plan.total_ops: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"trio.run(lambda: merge_cow({str(t['base'])!r}, {str(t['cow'])!r}, offload='cpu', on_progress=p))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr
    done = merge_progress(t["cow"])[0]
    assert 0 < done < t["total_ops"]
    res = subprocess.run(DMUSERD + ["cow", "merge", "--base", t["base"], t["cow"]], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"resumed after {done} ops" in res.stdout
    assert sha256(t["base"]) == t["target_sha"]


async def test_two_merges_of_one_cow_are_refused(tmp_path):
    import fcntl
    import os

    from dmuserd.snapshot.merge import MergeBusyError

    t = torture_cow(tmp_path, 45, nblocks=64)
    fd = os.open(t["cow"], os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(MergeBusyError):
            await merge_cow(t["base"], t["cow"], offload="cpu")
    finally:
        os.close(fd)
    assert isinstance(MergeBusyError("x"), MergeError)
    await merge_cow(t["base"], t["cow"], offload="cpu")
    assert sha256(t["base"]) == t["target_sha"]


def test_offline_progress_bar(tmp_path, capsys):
    from dmuserd.snapshot.merge import merge_cow_offline

    t = torture_cow(tmp_path, 46, nblocks=256, buffer_size=64 << 10)
    result = merge_cow_offline(t["base"], t["cow"], offload="cpu", progress=True)
    assert result.merged_now == t["total_ops"]
    assert "cow merge:" in capsys.readouterr().err
    assert sha256(t["base"]) == t["target_sha"]
    # no bar when asked for none (or when stderr is not a terminal)
    merge_cow_offline(t["base"], t["cow"], offload="cpu", progress=False)
    assert "cow merge" not in capsys.readouterr().err
