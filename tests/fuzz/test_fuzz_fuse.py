"""Storms of file operations on a FUSE-exported disk, against a served daemon (issue #21).

``dmuserd serve --export fuse:DIR`` (root) puts the target's file in a FUSE
mount; every FUSE request is an input surface (``fuse``). A worker process
(fuse_worker.py: a FUSE request the daemon never answers leaves its caller
waiting, and only that process can be killed) opens the file with any
flags (O_DIRECT, O_SYNC, O_APPEND, O_TRUNC, ...) from up to four threads
at once and runs: pread/pwrite/pwritev at hostile offsets and sizes (past
the end, near 2**63, unaligned to the 4 KiB blocks, zero), fallocate with
every mode, ftruncate and truncate to any size, fsync/fdatasync, lseek
with SEEK_DATA/SEEK_HOLE, fadvise, copy_file_range, mmap, and the file
system calls a file system must refuse (create, unlink, rename, mkdir,
links, xattrs, chmod/chown/utime).

What must hold, besides the daemon living on: a READ of the data written
before the storm returns it (writes only aim at the scratch area or past
the end); a read never returns more than the file has; the file's size
never changes; fsync succeeds; no write succeeds past the end.
"""

from __future__ import annotations

import hashlib
import json
import select
import subprocess
import sys
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_lib import HANG_SECONDS, REF_DATA, REF_SIZE, SCRATCH, SIZE, Hang, MiB, storm_settings

WORKER = Path(__file__).resolve().parent / "fuse_worker.py"
MAX_OFF = 2**63 - 1

_BASE_FLAGS = st.sampled_from([["O_RDONLY"], ["O_WRONLY"], ["O_RDWR"], ["O_RDWR"], ["O_RDWR"]])
_EXTRA_FLAGS = st.lists(st.sampled_from(["O_DIRECT", "O_SYNC", "O_DSYNC", "O_APPEND", "O_TRUNC", "O_NOATIME",
                                         "O_NONBLOCK", "O_EXCL", "O_CREAT", "O_DIRECTORY", "O_PATH", "O_CLOEXEC"]),
                        max_size=3, unique=True)
_READ_OFFSETS = st.one_of(st.integers(0, SIZE + 8192),
                          st.sampled_from([SIZE - 1, SIZE, SIZE + 1, 2**31, 2**32, 2**40, 2**62, MAX_OFF - 4096,
                                           MAX_OFF]),
                          st.integers(0, MAX_OFF))
_WRITE_OFFSETS = st.one_of(st.integers(SCRATCH, SIZE + 8192),
                           st.sampled_from([SIZE - 1, SIZE, SIZE + 1, 2**32, 2**62, MAX_OFF - 4096, MAX_OFF]),
                           st.integers(SCRATCH, MAX_OFF))
_SIZES = st.one_of(st.sampled_from([0, 1, 511, 512, 4095, 4096, 4097, 65536, 131072, 131073, 1 * MiB, 4 * MiB]),
                   st.integers(0, 70_000))
_MODES = st.one_of(st.sets(st.sampled_from([0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80])).map(sum),
                   st.integers(0, 2**31 - 1), st.just(-1))
_LENGTHS64 = st.one_of(st.integers(-1, SIZE + 8192), st.sampled_from([2**62, MAX_OFF]))
_PATH_OPS = ["create", "unlink", "rename", "mkdir", "symlink", "link", "chmod", "chown", "utime", "setxattr",
             "getxattr", "listxattr", "removexattr", "listdir", "stat_missing", "statvfs"]


@st.composite
def _fallocate(draw):
    mode = draw(_MODES)
    if mode in (0, 1):  # preallocation changes no data: anywhere
        offset = draw(st.one_of(st.integers(-1, SIZE + 8192), st.sampled_from([2**62, MAX_OFF])))
    else:
        offset = draw(st.one_of(st.integers(SCRATCH, SIZE + 8192), st.sampled_from([2**62, MAX_OFF])))
    return ["fallocate", mode, offset, draw(_LENGTHS64)]


_OP = st.one_of(
    st.builds(lambda o, n: ["pread", o, n], _READ_OFFSETS, _SIZES),
    st.builds(lambda o, n: ["pread", o, n], st.integers(0, REF_SIZE - 1), st.integers(0, 200_000)),  # reference
    st.builds(lambda o, n, b: ["pwrite", o, n, b], _WRITE_OFFSETS, _SIZES, st.integers(0, 255)),
    st.builds(lambda o, ns, b: ["pwritev", o, ns, b], _WRITE_OFFSETS, st.lists(st.integers(0, 9000), max_size=4),
              st.integers(0, 255)),
    _fallocate(),
    st.builds(lambda n: ["ftruncate", n], st.one_of(st.sampled_from([0, SIZE - 1, SIZE, SIZE + 1, 2**62]),
                                                    st.integers(0, 2 * SIZE))),
    st.builds(lambda n: ["truncate", n], st.sampled_from([0, SIZE, SIZE + 4096])),
    st.just(["fsync"]), st.just(["fdatasync"]), st.just(["fstat"]),
    st.builds(lambda o, w: ["lseek", o, w], _READ_OFFSETS, st.sampled_from([0, 1, 2, 3, 4])),  # SEEK_DATA/HOLE
    st.builds(lambda o, n, a: ["fadvise", o, n, a], _READ_OFFSETS, _SIZES, st.integers(0, 5)),
    st.builds(lambda i, o, n: ["copy_range", i, o, n], st.integers(0, SIZE), st.integers(SCRATCH, SIZE + 4096),
              st.integers(0, 300_000)),
    st.builds(lambda p, n: ["mmap", p * 4096, n], st.integers(0, SIZE // 4096 - 64), st.integers(1, 64 * 4096)),
    st.builds(lambda w: ["path_op", w], st.sampled_from(_PATH_OPS)),
)


@st.composite
def sessions(draw):
    """Up to four groups run at once, each: open flags and a list of operations."""
    groups = []
    for _ in range(draw(st.integers(1, 4))):
        flags = draw(_BASE_FLAGS) + draw(_EXTRA_FLAGS)
        groups.append([flags, draw(st.lists(_OP, min_size=1, max_size=8)) + [["fstat"]]])
    return groups


class FuseWorker:
    """fuse_worker.py, restarted when it had to be killed."""

    def __init__(self) -> None:
        self.proc = None
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def run(self, path: Path, groups) -> list:
        self.proc.stdin.write(json.dumps({"path": str(path), "groups": groups}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], HANG_SECONDS)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.kill()
            self._start()
            raise Hang(f"the file operations did not complete in {HANG_SECONDS:g} s (worker killed)")
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(HANG_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()


def _readable(flags) -> bool:
    return ("O_RDONLY" in flags or "O_RDWR" in flags) and "O_PATH" not in flags


def _check(groups, answers) -> None:
    for (flags, ops), answer in zip(groups, answers):
        if answer["open"][0] != "ok":
            continue  # O_TRUNC, O_DIRECTORY, ...: refused, fine
        # The size is fixed (truncate is EPERM): an open that should truncate cannot succeed,
        # else the caller believes the file empty (and the kernel briefly says so: st_size 0).
        assert "O_TRUNC" not in flags or "O_PATH" in flags, f"open({flags}) succeeded, yet the file was not truncated"
        assert len(answer["ops"]) == len(ops)
        for op, (how, value) in zip(ops, answer["ops"]):
            name = op[0]
            if name == "pread":
                off, n = op[1], op[2]
                if _readable(flags) and off + n <= REF_SIZE:
                    assert how == "ok", f"a read of the reference data failed: {op} {flags} -> {how} {value}"
                if how == "ok":
                    length, digest = value
                    want = max(0, min(n, SIZE - off))
                    assert length <= want, f"{op}: read {length} bytes, the file has {want} there"
                    if off < REF_SIZE and length:
                        end = min(off + length, REF_SIZE)
                        if end == off + length:
                            assert digest == hashlib.sha256(REF_DATA[off:end]).hexdigest(), f"{op}: wrong data"
            elif name in ("pwrite", "pwritev") and how == "ok":
                total = op[2] if name == "pwrite" else sum(op[2])
                assert 0 <= value <= total
                if value and "O_APPEND" not in flags:
                    assert op[1] + value <= SIZE, f"{op}: {value} bytes written past the end"
            elif name == "fstat" and how == "ok":
                assert value == SIZE, f"the file's size changed to {value}"
            elif name in ("fsync", "fdatasync") and "O_PATH" not in flags:
                assert how == "ok", f"{name} failed: {value}"


def test_fuse_storm(fuse_daemon):
    daemon = fuse_daemon
    before = daemon.rejected()
    worker = FuseWorker()

    @storm_settings(ci=120, fuzz=3000)
    @given(sessions())
    @example([[["O_RDWR", "O_DIRECT"], [["pread", SIZE - 1, 4096], ["pread", SIZE - 4096, 8192],
                                        ["pwrite", SIZE - 512, 4096, 7],
                                        ["fallocate", 0x10, SIZE - 4096, 8192], ["fsync"], ["fstat"]]]])
    @example([[["O_RDWR"], [["fallocate", m, SCRATCH + 100, 5000] for m in (0, 1, 2, 3, 0x10, 0x11, 0x8, 0x20, 0x40,
                                                                            0x80, 0x13, -1)] + [["fstat"]]]])
    @example([[["O_WRONLY", "O_TRUNC"], [["fstat"]]], [["O_RDONLY"], [["fstat"]] * 8]])  # open(O_TRUNC) of a fixed size
    @example([[["O_RDONLY"], [["pread", MAX_OFF, 10], ["pread", 2**62, 4096], ["lseek", SIZE + 1, 3],
                              ["lseek", 0, 4], ["fstat"]]]])
    def storm(groups):
        def one():
            _check(groups, worker.run(daemon.disk_file, groups))

        daemon.run_example(one)

    try:
        storm()
    finally:
        worker.close()
    daemon.check_after_storm(before=before)
