"""Read-only images read in place: the :class:`Image` interface and raw files.

Everything in :mod:`dmuserd.images` that holds a partition's bytes is an
:class:`Image`: ``size`` bytes that :meth:`Image.readinto` copies out at any
offset. Images stack: a logical partition of a ``super`` image maps its
extents onto the super image, which may be an Android sparse image, which
may be a stored entry of a zip file, which is a range of a raw file. Each
layer translates offsets and hands the pieces down, so nothing is unpacked.

``readinto(buf, offset, flags)`` passes ``flags`` to the ``preadv2`` calls
at the bottom: with ``os.RWF_NOWAIT`` a read that would wait for the disk
raises :class:`BlockingIOError` instead (the caller retries it in a worker
thread, as the ``file`` backend does). A read may stop part-way through
then; reading again from the start is always correct.
"""

from __future__ import annotations

import os
import stat

from dmuserd.errors import DmuserdError

#: zeros handed out for holes (any read of zeros is split in pieces this big)
_ZEROS = bytes(1 << 20)


class ImageError(DmuserdError):
    """An image that cannot be used: missing, unreadable, or the wrong kind."""


class ImageFormatError(ImageError):
    """An image breaks a rule of its format.

    ``kind`` names the format (``"sparse image"``, ``"super image"``,
    ``"zip"``), ``path`` the file, ``offset`` the byte offset in it where the
    fault is seen, ``rule`` a short stable name of the rule broken and
    ``detail`` the specifics.
    """

    hint = "the image is corrupt, truncated or not of this kind: fetch or make it again"

    def __init__(self, kind: str, path, offset: int, rule: str, detail: str) -> None:
        self.kind = kind
        self.path = str(path)
        self.offset = offset
        self.rule = rule
        self.detail = detail
        super().__init__(f"{kind} {self.path}, offset {offset}: {detail} (rule {rule}); {self.hint}")


def fill_zeros(buf: memoryview) -> None:
    """Zero ``buf`` (any length)."""
    n = len(buf)
    done = 0
    while done < n:
        step = min(n - done, len(_ZEROS))
        buf[done : done + step] = _ZEROS[:step]
        done += step


def fill_pattern(buf: memoryview, pattern: bytes, phase: int = 0) -> None:
    """Fill ``buf`` with ``pattern`` repeated, starting ``phase`` bytes into it."""
    n = len(buf)
    if not n:
        return
    if not any(pattern):
        fill_zeros(buf)
        return
    unit = pattern[phase:] + pattern[:phase]
    run = unit * (min(n, 1 << 16) // len(unit) + 1)
    step = len(run) - len(run) % len(unit)  # whole units, so the phase carries over
    done = 0
    while done < n:
        take = min(n - done, step)
        buf[done : done + take] = run[:take]
        done += take


class Image:
    """``size`` bytes read at any offset; see the module docstring.

    ``path`` names the image in messages (a file, or a locator such as
    ``super.img::system_a``); ``kind`` says what it is (``raw``, ``sparse``,
    ``partition``, ``zip entry``); ``block_size`` its natural granularity.
    """

    kind = "image"
    path: str = ""
    size: int = 0
    block_size: int = 512

    def readinto(self, buf: memoryview, offset: int, flags: int = 0) -> None:
        """Fill ``buf`` with the bytes at ``offset``; bytes past ``size`` read as zeros."""
        raise NotImplementedError

    def pread(self, length: int, offset: int) -> bytes:
        """``length`` bytes at ``offset`` (zeros past the end)."""
        buf = bytearray(length)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def raw_file(self) -> tuple[int, int] | None:
        """``(fd, start)`` when the image is a plain range of one file (readable with preadv), else None."""
        return None

    def close(self) -> None:
        """Release the file descriptors (of the layers below too)."""

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "size": self.size}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RawImage(Image):
    """``size`` bytes of a file or block device from byte ``start`` (default: all of it).

    Opens ``path`` read-only, or takes ``fd`` (then closed with the image
    when ``owns_fd``).
    """

    kind = "raw"

    def __init__(self, path, *, fd: int | None = None, start: int = 0, size: int | None = None,
                 owns_fd: bool = True) -> None:
        self.path = os.fspath(path)
        if fd is None:
            try:
                # O_NONBLOCK: opening a FIFO named as an image must not block (it is refused below)
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
                os.set_blocking(fd, True)
            except OSError as exc:
                raise ImageError(f"cannot open {self.path}: {exc.strerror}; check the path and its permissions") \
                    from None
            owns_fd = True
        self.fd = fd
        self._owns = owns_fd
        try:
            mode = os.fstat(fd).st_mode
            total = 0 if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) else os.lseek(fd, 0, os.SEEK_END)  # block devices too
        except OSError as exc:
            self.close()
            raise ImageError(f"cannot read {self.path}: {exc.strerror}") from None
        if stat.S_ISDIR(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            self.close()
            raise ImageError(f"{self.path} is a directory, a FIFO or a socket, not an image: name a file or a "
                             "block device")
        self.start = start
        self.file_size = total
        self.size = max(0, total - start) if size is None else size

    def readinto(self, buf: memoryview, offset: int, flags: int = 0) -> None:
        n = len(buf)
        done = 0
        end = min(n, max(0, self.size - offset))
        while done < end:
            got = os.preadv(self.fd, [buf[done:end]], self.start + offset + done, flags)
            if not got:  # the file shrank under us: what is not there reads as zeros
                break
            done += got
        if done < n:
            fill_zeros(buf[done:])

    def raw_file(self) -> tuple[int, int] | None:
        return self.fd, self.start

    def close(self) -> None:
        if self._owns and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def describe(self) -> dict:
        info = super().describe()
        if self.start:
            info["start"] = self.start
        return info


def write_atomically(output, write) -> None:
    """Run ``write(fd)`` on a temporary file next to ``output``, fsync it, rename it into place."""
    output = os.fspath(output)
    directory = os.path.dirname(os.path.abspath(output))
    temp = os.path.join(directory, f".{os.path.basename(output)}.{os.getpid()}.partial")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        write(fd)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temp, output)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
