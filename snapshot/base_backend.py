"""A snapshot base that is a backend (an RBD image, ...) rather than a file.

The ``snapshot`` backend's ``base`` is normally a path or an image locator
(:mod:`dmuserd.images`). It may instead name any backend, written as a
backend spec whose options are separated by ``:`` (a ``,`` would end the
``base`` option)::

    --backend snapshot:base=rbd:pool=rbd:image=system_a:conf=/etc/ceph/ceph.conf,cow=system.cow

Then the base's bytes are read straight from that backend (librbd for
``rbd``, no file or FUSE mount in between) and an online merge writes the
backend in place: its ``write`` then ``flush`` is the merge's durable write,
so a backend that does both can be merged into (the merge refuses one that
cannot, saying why).

Two adapters, so that neither :class:`~dmuserd.snapshot.view.SnapshotView`
nor the merge engine needs to know: :class:`BackendImage` is the base as an
:class:`~dmuserd.images.Image` for the view, :class:`BackendMergeIO` the
merge's :class:`~dmuserd.snapshot._merge_engine.MergeIO` with ``"base"``
going to the backend. Both are called from trio worker threads (where the
view and the merge engine do their blocking I/O) and hand each call to the
backend's async method on the event loop (``trio.from_thread.run``): the
backend's own timeouts, errors and statistics apply. They must not be
called on the event loop itself (the snapshot backend reads such a base
only in worker threads).

A path that exists is always a file, whatever its name.
"""

from __future__ import annotations

import os

import structlog
import trio

from dmuserd.backends import Backend, BackendError, Op, backend_class
from dmuserd.backends.registry import available
from dmuserd.images._image import Image, fill_zeros
from dmuserd.snapshot._merge_engine import MergeIO
from dmuserd.snapshot._merge_errors import MergeUnsafeError

log = structlog.get_logger("dmuserd.snapshot")

#: separates the backend's options inside the one ``base=`` value
OPTION_SEP = ":"


def parse_base_spec(base) -> tuple[str, dict[str, str]] | None:
    """``"rbd:pool=p:image=i"`` → ``("rbd", {"pool": "p", "image": "i"})``; None for a path or locator.

    A base names a backend when it is not an existing path and its first
    ``:``-separated word is a registered backend name followed by
    ``key=value`` words.
    """
    if not isinstance(base, str) or OPTION_SEP not in base or os.path.exists(base):
        return None
    name, *words = base.split(OPTION_SEP)
    if name not in available() or not words or not all("=" in w and not w.startswith("=") for w in words):
        return None
    options: dict[str, str] = {}
    for word in words:
        key, _, value = word.partition("=")
        options[key.strip()] = value.strip()
    return name, options


def open_base(base):
    """The :class:`BackendImage` of the backend ``base`` names, opened; any other ``base`` as it is.

    Raises :class:`BackendError` naming the base when the backend cannot open.
    """
    named = parse_base_spec(base)
    if named is None:
        return base
    name, options = named
    try:
        backend = backend_class(name).from_options(options)
    except BackendError as exc:
        raise BackendError(f"snapshot backend: base {base}: {exc}") from None
    return BackendImage(backend, base)


def release_backend(backend: Backend) -> None:
    """Close ``backend`` from synchronous code (a constructor that failed after opening it).

    Inside a trio run the close runs as a system task; outside one, in a run of its own.
    """

    async def close() -> None:
        try:
            await backend.close()
        except Exception:  # noqa: BLE001 - already failing: the first error is the one to report
            log.exception("closing the snapshot base failed", backend=backend.name)

    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        trio.run(close)
        return
    trio.lowlevel.spawn_system_task(close)


def merge_refusal(backend: Backend, spec: str) -> MergeUnsafeError | None:
    """Why a merge cannot write ``backend`` in place, or None when it can (write and flush)."""
    missing = [op.value for op in (Op.WRITE, Op.FLUSH) if not backend.supports(op)]
    if not missing:
        return None
    return MergeUnsafeError(f"the base {spec} cannot {' or '.join(missing)} (read-only?): a merge writes the base "
                            "in place and flushes it; open it writable to merge")


def _aligned(backend: Backend, offset: int, length: int) -> tuple[int, int]:
    """The smallest range of whole backend blocks covering ``offset``, ``length``."""
    bs = backend.block_size
    start = offset - offset % bs
    end = -(-(offset + length) // bs) * bs
    return start, end - start


async def _read_into(backend: Backend, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``offset`` (any alignment, within the backend)."""
    start, length = _aligned(backend, offset, len(buf))
    if (start, length) == (offset, len(buf)):
        await backend.readinto(offset, buf)
        return
    whole = bytearray(length)
    await backend.readinto(start, memoryview(whole))
    skip = offset - start
    buf[:] = whole[skip : skip + len(buf)]


class BackendImage(Image):
    """A backend as a read-only :class:`~dmuserd.images.Image` (see the module doc).

    ``readinto`` blocks its worker thread while the backend reads on the
    event loop; bytes past the backend's end read as zeros.
    """

    def __init__(self, backend: Backend, spec: str) -> None:
        self.backend = backend
        self.kind = backend.name
        self.path = spec
        self.size = backend.size
        self.block_size = backend.block_size

    def readinto(self, buf: memoryview, offset: int, flags: int = 0) -> None:
        end = min(len(buf), max(0, self.size - offset))
        if end:
            trio.from_thread.run(_read_into, self.backend, buf[:end], offset)
        if end < len(buf):
            fill_zeros(buf[end:])

    def describe(self) -> dict:
        return {**super().describe(), "backend": self.backend.describe()}

    def __str__(self) -> str:
        return self.path


class BackendMergeIO(MergeIO):
    """:class:`MergeIO` whose ``"base"`` is a backend: reads, writes, and
    ``fsync`` as the backend's ``flush`` (what makes its writes durable).
    The COW file (and the journal) stay files."""

    def __init__(self, backend: Backend, cow_fd: int) -> None:
        super().__init__(-1, cow_fd)
        self.backend = backend

    def preadv(self, which: str, views: list[memoryview], offset: int) -> None:
        if which != "base":
            return super().preadv(which, views, offset)
        for view in views:
            trio.from_thread.run(_read_into, self.backend, view, offset)
            offset += len(view)

    def pwritev(self, which: str, views: list[memoryview], offset: int) -> None:
        if which != "base":
            return super().pwritev(which, views, offset)
        data = b"".join(views)
        start, length = _aligned(self.backend, offset, len(data))
        if (start, length) != (offset, len(data)):  # the merge writes whole COW blocks: never seen
            raise MergeUnsafeError(f"a merge write of {len(data)} bytes at {offset} is not aligned to the base's "
                                   f"{self.backend.block_size}-byte blocks")
        trio.from_thread.run(self.backend.write, offset, data)

    def fsync(self, which: str) -> None:
        if which != "base":
            return super().fsync(which)
        trio.from_thread.run(self.backend.flush)
