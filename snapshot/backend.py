"""The ``snapshot`` backend: serve ``base + COW`` read-only.

``--backend snapshot:base=OLD.img,cow=NEW.cow[,size=N][,label=L][,cache=32M][,merged=yes|no][,offload=auto]``

What snapuserd shows as the snapshot device before the merge: every read
is resolved by :class:`~dmuserd.snapshot.view.SnapshotView` (base block,
Copy, Replace, Zero, Xor). Writes are refused with an error, as snapuserd
does for a device it only reads: the COW file is the update, not a scratch
area. The logical block size is 512 so reads at any sector work, even
those not aligned to the COW's 4 KiB blocks.

Options: ``base`` and ``cow`` (paths, required; ``base`` may be an Android
sparse image or any locator of :mod:`dmuserd.images`, such as
``super.img::system_a``, which can be served but not merged); ``size`` the target size
(not recorded in a COW file; default the base's); ``label`` to read an
unfinished COW file up to a label; ``cache`` the bytes of decompressed
chunks kept; ``merged``: whether the first ``num_merge_ops`` ops of the
merge order are already merged into the base (default: yes, as snapuserd
assumes; ``no`` serves a pristine copy of the base, and cannot merge);
``offload`` the data mover engine (``auto``, ``dsa``, ``emulated``, ``cpu``)
for serving and for an online merge; ``base_merge`` a separate device the
online merge writes, holding the same blocks as ``base`` through another
path (Android's ``<p>-base`` next to ``<p>-src``, snapuserd's
``base_path_merge``): of the same size; merged blocks, and everything once
merged, are read from it.

A ``base`` may also name a backend, its options separated by ``:``
(``base=rbd:pool=rbd:image=system_a:conf=/etc/ceph/ceph.conf``): the base
is then read from that backend directly (librbd, no file in between) and
an online merge writes and flushes it in place
(:mod:`~dmuserd.snapshot.base_backend`); its status is ``base_backend``.

Serving: each read is planned by :meth:`SnapshotView.gather` (base runs read
straight into the reply) and completed by the target's data mover, one
batch per read: Replace/Xor data and window blocks copied into place, zero
runs filled. The mover's counters are ``describe()["mover"]``
(``dmuserd status --json``: ``targets.NAME.mover``; the online merge uses
the same mover, so ``targets.NAME.merge.mover`` shows the same counters).

Online merge: :attr:`SnapshotBackend.merge` is the target's
:class:`~dmuserd.snapshot.merge_control.MergeControl`. Once the merge is
done, reads go straight to the base.
"""

from __future__ import annotations

import structlog
import trio

from dmuserd.backends import Backend, BackendError, Op, Options
from dmuserd.errors import DmuserdError
from dmuserd.images import ImageError
from dmuserd.snapshot._cow_reader import CowReader
from dmuserd.snapshot.base_backend import BackendImage, open_base, release_backend
from dmuserd.snapshot.merge_control import MergeControl, MergeState
from dmuserd.snapshot.view import DEFAULT_CACHE_BYTES, MergeBaseError, SnapshotView

#: reads at most this big, touching no compressed chunk, stay on the event loop
_INLINE_READ = 4096


class SnapshotReadOnly(DmuserdError):
    """A write reached the read-only snapshot backend."""


class SnapshotBackend(Backend):
    """``base + COW``, read-only. See the module docstring."""

    name = "snapshot"
    daemon_options = ("offload",)

    def __init__(self, base, cow, *, size: int | None = None, label: int | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, merged: bool = True, offload: str = "auto",
                 base_merge=None) -> None:
        try:
            self.reader = CowReader(cow, label=label)
        except OSError as exc:
            raise BackendError(f"snapshot backend: cannot open the COW file {cow}: {exc.strerror}") from None
        #: the backend the base is (``base=rbd:pool=P:image=I``, see :mod:`~dmuserd.snapshot.base_backend`),
        #: closed with this one; read and merged into from worker threads only
        self.base_backend = base.backend if isinstance(base, BackendImage) else None
        try:
            self.view = SnapshotView(
                self.reader, base, size=size, cache_bytes=cache_bytes,
                merged_ops=self.reader.num_merge_ops if merged else 0, merge_base=base_merge,
            )
        except OSError as exc:
            self.reader.close()
            raise BackendError(f"snapshot backend: cannot open the base image {exc.filename or base}: "
                               f"{exc.strerror}") from None
        except MergeBaseError as exc:
            self.reader.close()
            raise BackendError(f"snapshot backend: base_merge: {exc}") from None
        except ImageError as exc:  # a missing file, a bad sparse image or super partition
            self.reader.close()
            raise BackendError(f"snapshot backend: base image: {exc}") from None
        except BaseException:
            self.reader.close()
            raise
        try:
            # Read-only: no WRITE in its capabilities (NBD clients see a read-only export, a
            # flush has nothing to make durable); write() stays to say why to direct callers.
            super().__init__(size=self.view.size, block_size=512, disabled_ops={Op.WRITE})
        except BackendError:
            self.view.close()
            self.reader.close()
            raise
        self._paths = {"base": str(base), "cow": str(cow)}
        if base_merge is not None:
            self._paths["base_merge"] = str(base_merge)
        try:
            self.mover = _open_mover(offload)
            # One mover for serving and merging (a dedicated DSA queue has room for one opener).
            self.merge = MergeControl(self.reader, self.view, base, cow, offload=offload, mover=self.mover,
                                      trust_progress=merged, unfinished=label is not None,
                                      merge_base=base_merge, base_backend=self.base_backend)
        except BaseException:
            self.view.close()
            self.reader.close()
            raise
        structlog.get_logger().info(
            "snapshot opened", **self._paths, size=self.size, cow_version=self.reader.version,
            compression=self.reader.compression.name.lower(), ops=self.reader.data_op_count,
        )

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "SnapshotBackend":
        opts = Options(cls.name, options)
        base = opts.str("base", required=True)
        cow = opts.str("cow", required=True)
        size = opts.size("size")
        label = opts.int("label")
        cache = opts.size("cache", DEFAULT_CACHE_BYTES)
        merged = opts.bool("merged", True)
        offload = opts.str("offload", "auto")
        base_merge = opts.str("base_merge")
        opts.finish()
        from dmuserd.dsa_offload import ENGINES

        if offload not in ENGINES:
            raise BackendError(f"backend 'snapshot' option offload: {offload!r} is not one of {', '.join(ENGINES)}")
        base = open_base(base)  # a backend it names, opened; a path stays a path
        try:
            return cls(base, cow, size=size, label=label, cache_bytes=cache, merged=merged, offload=offload,
                       base_merge=base_merge)
        except BaseException:
            if isinstance(base, BackendImage):
                release_backend(base.backend)
            raise

    async def read(self, offset: int, length: int):
        view = self.view
        if self.merge.state is MergeState.MERGED:
            # the base is the target now: the COW is not consulted
            if length <= _INLINE_READ and self.base_backend is None:
                return view.read_base(offset, length)
            return await trio.to_thread.run_sync(view.read_base, offset, length)
        # base/zero/copy blocks of one small read: page-cache preads, on the loop
        inline = length <= _INLINE_READ and self.base_backend is None and self._cheap(offset, length)
        return await view.aread(offset, length, self.mover, in_thread=not inline)

    def _cheap(self, offset: int, length: int) -> bool:
        bs = self.view.block_size
        for block in range(offset // bs, (offset + length - 1) // bs + 1):
            found = None if self.view.is_merged(block) else self.view.op_for_block(block)
            if found is not None and found[0].data_offset is not None:
                return False
        return True

    async def write(self, offset: int, data, fua: bool = False) -> None:
        raise SnapshotReadOnly(
            f"the snapshot of {self._paths['cow']} over {self._paths['base']} is read-only: "
            f"write of {len(data)} bytes at {offset} refused (merge or render the COW file to change the device)"
        )

    async def close(self) -> None:
        try:
            await self.mover.aclose()
        finally:
            self.view.close()
            self.reader.close()
            if self.base_backend is not None:
                await self.base_backend.close()

    def describe(self) -> dict:
        return {
            **super().describe(),
            **self._paths,
            "cow_version": self.reader.version,
            "compression": self.reader.compression.name.lower(),
            "ops": self.reader.data_op_count,
            "merge": self.merge.describe(),
            "mover": self.mover.stats(),
        } | self._base_backend_status()

    def _base_backend_status(self) -> dict:
        """A backend base's own status, and its one-line summary for ``dmuserd status``."""
        if self.base_backend is None:
            return {}
        info = self.base_backend.describe()
        summary = info.get("summary")
        return {"base_backend": info, **({"summary": f"base: {summary}"} if isinstance(summary, str) else {})}


def _open_mover(offload: str):
    """The serving mover; an engine that cannot open is a backend error saying what to use."""
    from dmuserd.dsa_offload import DsaUnavailable, open_mover

    try:
        return open_mover(offload)
    except DsaUnavailable as exc:
        raise BackendError(f"backend 'snapshot' option offload={offload}: {exc}; "
                           "use offload=auto (DSA where usable, else the CPU) or offload=cpu") from None
