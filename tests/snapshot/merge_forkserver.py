"""A fork server for the merge torture test: real merge processes, cheap to start.

Run as ``python merge_forkserver.py``. Each input line
``merge BASE COW ENGINE MARKS`` forks a child that runs the offline merge
(:func:`dmuserd.snapshot.merge.merge_cow`) and exits 0 when done, 3 on a
typed error (message on stderr). The server answers ``pid N`` at once; on
the next line ``wait`` it reaps the child and answers ``exit STATUS``
(``-9``: killed by SIGKILL). Until then the child, even once exited, stays
a zombie, so its pid cannot be reused by another process before a test's
``kill`` reaches it. The child
appends ``S`` to the file MARKS when the merge starts and ``R`` once the
interrupted merge is recovered (the first progress report), so a test can
tell a kill inside the resume from a later one.

Forking a process that already imported everything makes a merge process
cost milliseconds, so a test can SIGKILL hundreds of them.
"""

from __future__ import annotations

import os
import sys

import crc32c  # noqa: F401 - imported here once, not in every child
import lz4.block  # noqa: F401
import trio

from dmuserd.dsa_offload import open_mover  # noqa: F401 - loads the mover's modules once, not in every child
from dmuserd.daemon import logs
from dmuserd.errors import DmuserdError
from dmuserd.snapshot.merge import merge_cow


def _child(base: str, cow: str, engine: str, marks: str) -> int:
    fd = os.open(marks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"S")
    reported = False

    def progress(plan, done):
        nonlocal reported
        if not reported:
            reported = True
            os.write(fd, b"R")

    try:
        trio.run(lambda: merge_cow(base, cow, offload=engine, on_progress=progress))
    except DmuserdError as exc:
        print(f"merge failed: {exc}", file=sys.stderr, flush=True)
        return 3
    return 0


def main() -> None:
    logs.configure("error")
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd != "merge":
            print(f"error unknown command {cmd}", flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                code = _child(*args)
            finally:
                os._exit(code)
        print(f"pid {pid}", flush=True)
        sys.stdin.readline()  # "wait"
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    main()
