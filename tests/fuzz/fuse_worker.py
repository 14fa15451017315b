"""Runs file operations on a FUSE-exported disk for test_fuzz_fuse.py, in a process of its own.

One JSON request per stdin line, one JSON answer per stdout line. A request
is ``{"path": FILE, "groups": [[FLAGS, [OP, ...]], ...]}``: each group opens
FILE with FLAGS (a list of ``os.O_*`` names) and runs its ops in order, all
groups at once (a thread each). The answer lists, per group, the open's
outcome and each op's: ``["ok", VALUE]`` or ``["err", ERRNO]``.

The test kills this process when an answer does not come (a FUSE request
the daemon never answers leaves its caller waiting; SIGKILL ends the wait),
which is why the operations do not run in the test process.

Ops: ``["pread", off, n]`` (VALUE: [length, sha256 hex]),
``["pwrite", off, n, byte]``, ``["pwritev", off, [n, ...], byte]``,
``["fallocate", mode, off, n]``, ``["ftruncate", n]``, ``["truncate", n]``,
``["fsync"]``, ``["fdatasync"]``, ``["fstat"]`` (VALUE: st_size),
``["lseek", off, whence]``, ``["fadvise", off, n, advice]``,
``["copy_range", off_in, off_out, n]``, ``["mmap", off, n]``,
``["path_op", NAME]`` (file system calls on the mount: create, unlink,
rename, mkdir, symlink, link, chmod, chown, utime, xattrs, listdir).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import sys
import threading

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def _run_op(fd: int, path: str, op: list):
    name, args = op[0], op[1:]
    if name == "pread":
        data = os.pread(fd, args[1], args[0])
        return [len(data), hashlib.sha256(data).hexdigest()]
    if name == "pwrite":
        return os.pwrite(fd, bytes([args[2]]) * args[1], args[0])
    if name == "pwritev":
        return os.pwritev(fd, [bytes([args[2]]) * n for n in args[1]], args[0])
    if name == "fallocate":
        if _fallocate(fd, args[0], args[1], args[2]) != 0:
            raise OSError(ctypes.get_errno(), "fallocate")
        return 0
    if name == "ftruncate":
        os.ftruncate(fd, args[0])
        return 0
    if name == "truncate":
        os.truncate(path, args[0])
        return 0
    if name == "fsync":
        os.fsync(fd)
        return 0
    if name == "fdatasync":
        os.fdatasync(fd)
        return 0
    if name == "fstat":
        return os.fstat(fd).st_size
    if name == "lseek":
        return os.lseek(fd, args[0], args[1])
    if name == "fadvise":
        os.posix_fadvise(fd, args[0], args[1], args[2])
        return 0
    if name == "copy_range":
        return os.copy_file_range(fd, fd, args[2], args[0], args[1])
    if name == "mmap":
        with mmap.mmap(fd, args[1], offset=args[0], access=mmap.ACCESS_READ) as m:
            return len(m[:])
    if name == "path_op":
        return _path_op(path, args[0])
    raise ValueError(f"unknown op {name}")


def _path_op(path: str, what: str):
    directory = os.path.dirname(path)
    other = os.path.join(directory, "fuzz-new")
    if what == "create":
        os.close(os.open(other, os.O_CREAT | os.O_WRONLY, 0o600))
    elif what == "unlink":
        os.unlink(path)
    elif what == "rename":
        os.rename(path, other)
    elif what == "mkdir":
        os.mkdir(other)
    elif what == "symlink":
        os.symlink(path, other)
    elif what == "link":
        os.link(path, other)
    elif what == "chmod":
        os.chmod(path, 0o777)
    elif what == "chown":
        os.chown(path, 1, 1)
    elif what == "utime":
        os.utime(path, (0, 0))
    elif what == "setxattr":
        os.setxattr(path, "user.fuzz", b"x" * 100)
    elif what == "getxattr":
        os.getxattr(path, "user.fuzz")
    elif what == "listxattr":
        os.listxattr(path)
    elif what == "removexattr":
        os.removexattr(path, "user.fuzz")
    elif what == "listdir":
        return sorted(os.listdir(directory))
    elif what == "stat_missing":
        os.stat(os.path.join(directory, "no-such-file"))
    elif what == "statvfs":
        return os.statvfs(directory).f_bsize
    else:
        raise ValueError(f"unknown path op {what}")
    return 0


def _run_group(path: str, flags: list, ops: list) -> dict:
    mode = 0
    for name in flags:
        mode |= getattr(os, name)
    try:
        fd = os.open(path, mode)
    except OSError as exc:
        return {"open": ["err", exc.errno], "ops": []}
    results = []
    try:
        for op in ops:
            try:
                results.append(["ok", _run_op(fd, path, op)])
            except OSError as exc:
                results.append(["err", exc.errno or errno.EIO])
            except (ValueError, OverflowError) as exc:  # refused by Python before any syscall
                results.append(["py", str(exc)])
    finally:
        os.close(fd)
    return {"open": ["ok", None], "ops": results}


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        path = request["path"]
        answers: list = [None] * len(request["groups"])

        def run(i: int, flags: list, ops: list) -> None:
            answers[i] = _run_group(path, flags, ops)

        threads = [threading.Thread(target=run, args=(i, f, o)) for i, (f, o) in enumerate(request["groups"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sys.stdout.write(json.dumps(answers) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
