"""Every built-in backend through the conformance suite a plug-in author uses (dmuserd.backends.testing).

One class per backend and configuration; the checks themselves are BackendConformance's test methods.
Read-only backends (sparse, super, snapshot) are compared with the raw image they stand for;
the file backend is also run on a real loop device with 4 KiB logical blocks (BLKDISCARD, BLKZEROOUT,
BLKSSZGET), and its example plug-in is checked by its own test (docs/examples/pattern-backend).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dmuserd.backends import Backend, Extent, Op, create
from dmuserd.backends.faulty import FaultyBackend
from dmuserd.backends.file import FileBackend
from dmuserd.backends.memory import MemoryBackend
from dmuserd.backends.testing import BackendConformance

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS / "images"), str(TESTS / "snapshot")]

from cow_helpers import make_images  # noqa: E402
from lp_writer import SuperBuilder  # noqa: E402

SIZE = 8 << 20
EXAMPLE = TESTS.parent / "docs" / "examples" / "pattern-backend"


class ZerosAtFirst:
    """A backend that starts out all zeros."""

    def expected(self, workdir: Path, offset: int, length: int) -> bytes | None:
        return bytes(length)


class ImageContent:
    """A backend that stands for the raw image at ``workdir / "raw.img"`` (written by make_backend)."""

    def expected(self, workdir: Path, offset: int, length: int) -> bytes | None:
        with open(workdir / "raw.img", "rb") as f:
            return os.pread(f.fileno(), length, offset)


# -- RAM-like --------------------------------------------------------------------------


class TestMemory(ZerosAtFirst, BackendConformance):
    discard_zeroes = True

    def make_backend(self, workdir: Path) -> Backend:
        return MemoryBackend(SIZE)

    def options(self, workdir: Path) -> dict[str, str]:
        return {"size": "8M"}


class TestMemory4K(TestMemory):
    def make_backend(self, workdir: Path) -> Backend:
        return MemoryBackend(SIZE, block_size=4096)

    def options(self, workdir: Path) -> dict[str, str]:
        return {"size": "8M", "block_size": "4K"}


class TestMemoryOneBlock(ZerosAtFirst, BackendConformance):
    """The smallest device there is: every check's ranges fit in one 4 KiB block."""

    discard_zeroes = True

    def make_backend(self, workdir: Path) -> Backend:
        return MemoryBackend(4096, block_size=4096)


class TestNull(ZerosAtFirst, BackendConformance):
    keeps_data = False

    def make_backend(self, workdir: Path) -> Backend:
        return create("null", {"size": "8M"})

    def options(self, workdir: Path) -> dict[str, str]:
        return {"size": "8M"}


class TestZero(ZerosAtFirst, BackendConformance):
    def make_backend(self, workdir: Path) -> Backend:
        return create("zero", {"size": "8M", "block_size": "4K"})

    def options(self, workdir: Path) -> dict[str, str]:
        return {"size": "8M", "block_size": "4K"}


class TestFaulty(ZerosAtFirst, BackendConformance):
    """The wrapper itself, with injected failures where the suite never reaches (so: none)."""

    discard_zeroes = True

    def make_backend(self, workdir: Path) -> Backend:
        return FaultyBackend(MemoryBackend(SIZE), [], set(Op))

    def options(self, workdir: Path) -> dict[str, str]:
        return {"size": "8M", "ops": "read/write/flush/discard/write_zeroes"}


# -- files and block devices ---------------------------------------------------------------


class TestFile(ZerosAtFirst, BackendConformance):
    durable = True
    discard_zeroes = True

    def make_backend(self, workdir: Path) -> Backend:
        return FileBackend(str(workdir / "disk.img"), size=SIZE, create=True)

    def options(self, workdir: Path) -> dict[str, str]:
        return {"path": str(workdir / "disk.img"), "size": "8M", "create": "1"}


class TestFileDirect(ZerosAtFirst, BackendConformance):
    """O_DIRECT: no page cache, so a re-opened backend reads what reached the disk."""

    durable = True
    discard_zeroes = True

    def make_backend(self, workdir: Path) -> Backend:
        try:
            os.close(os.open(workdir / "probe", os.O_RDWR | os.O_CREAT | os.O_DIRECT))
        except OSError as exc:
            pytest.skip(f"the file system of {workdir} takes no O_DIRECT ({exc.strerror})")
        return FileBackend(str(workdir / "disk.img"), size=SIZE, create=True, direct=True)

    def options(self, workdir: Path) -> dict[str, str]:
        return {"path": str(workdir / "disk.img"), "size": "8M", "create": "1", "direct": "1"}


class TestFaultyOverFile(ZerosAtFirst, BackendConformance):
    """The wrapper passes durability on: flush and FUA reach the file."""

    durable = True
    discard_zeroes = True

    def make_backend(self, workdir: Path) -> Backend:
        return FaultyBackend(FileBackend(str(workdir / "disk.img"), size=SIZE, create=True), [], set(Op))


class TestFileReadOnly(ImageContent, BackendConformance):
    def make_backend(self, workdir: Path) -> Backend:
        raw = workdir / "raw.img"
        if not raw.exists():
            raw.write_bytes(random.Random(5).randbytes(SIZE // 2))
        return FileBackend(str(raw), readonly=True)

    def options(self, workdir: Path) -> dict[str, str]:
        return {"path": str(workdir / "raw.img"), "readonly": "1"}


class TestFileOnLoop4K(ZerosAtFirst, BackendConformance):
    """A real block device with 4 KiB logical blocks: BLKSSZGET gives the block size, BLKDISCARD and
    BLKZEROOUT do discard and write-zeroes. The loop device goes away with the backend's last close."""

    durable = True
    discard_zeroes = True  # loop punches a hole in its backing file

    def make_backend(self, workdir: Path) -> Backend:
        if os.geteuid() != 0 or shutil.which("losetup") is None or not os.path.exists("/dev/loop-control"):
            pytest.skip("needs root, losetup (util-linux) and /dev/loop-control for a loop device")
        backing = workdir / "backing.img"
        if not backing.exists():
            with open(backing, "wb") as f:
                f.truncate(SIZE)
        loop = subprocess.run(["losetup", "--find", "--show", "--sector-size", "4096", str(backing)],
                              capture_output=True, text=True, check=True).stdout.strip()
        try:
            backend = FileBackend(loop)
        finally:
            # Busy (the backend holds it open): marked to detach itself at its last close.
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
        assert backend.is_block_device and backend.block_size == 4096 and backend.size == SIZE
        return backend


class TestRbd(ZerosAtFirst, BackendConformance):
    """An RBD image on the session's local cluster (tests/backends/ceph_harness), one new image per check.

    A discard need not zero: librbd skips the parts of a discard that do not cover whole objects."""

    durable = True

    @pytest.fixture(autouse=True)
    def _cluster(self, ceph_cluster):
        self.cluster = ceph_cluster

    def make_backend(self, workdir: Path) -> Backend:
        return create("rbd", self.options(workdir))

    def options(self, workdir: Path) -> dict[str, str]:
        return {"pool": self.cluster.pool, "image": workdir.name, "conf": self.cluster.conf, "create": "8M"}


# -- read-only images ---------------------------------------------------------------------


def _mixed_image(seed: int, blocks: int, bs: int = 4096) -> bytes:
    """Random blocks, zero runs and runs of one repeated word (RAW, DONT_CARE/FILL chunks in a sparse image)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < blocks * bs:
        kind, run = rng.randrange(3), rng.randrange(1, 40) * bs
        out += rng.randbytes(run) if kind == 0 else bytes(run) if kind == 1 else rng.randbytes(4) * (run // 4)
    return bytes(out[: blocks * bs])


class TestSparse(ImageContent, BackendConformance):
    def make_backend(self, workdir: Path) -> Backend:
        from dmuserd.images import RawImage
        from dmuserd.images.sparse import write_sparse

        raw, sparse = workdir / "raw.img", workdir / "sparse.img"
        if not sparse.exists():
            raw.write_bytes(_mixed_image(6, SIZE // 4096))
            with RawImage(str(raw)) as image:
                write_sparse(image, str(sparse), holes=True)
        return create("sparse", {"path": str(sparse)})

    def options(self, workdir: Path) -> dict[str, str]:
        return {"path": str(workdir / "sparse.img")}


class TestSuper(ImageContent, BackendConformance):
    """A partition in two extents with a gap between them, then a zero extent."""

    def make_backend(self, workdir: Path) -> Backend:
        image = workdir / "super.img"
        if not image.exists():
            data = _mixed_image(7, 1024)
            builder = SuperBuilder(size=12 << 20, slots=2)
            group = builder.add_group("main_a", 8 << 20)
            builder.add_partition("system_a", data, group=group, pieces=2, zero_sectors=64)
            builder.write(image)
            (workdir / "raw.img").write_bytes(data + bytes(64 * 512))
        return create("super", self.options(workdir))

    def options(self, workdir: Path) -> dict[str, str]:
        return {"path": str(workdir / "super.img"), "partition": "system_a"}


class TestSnapshot(ImageContent, BackendConformance):
    """base + COW (v3, lz4, xor): reads give the new image."""

    def make_backend(self, workdir: Path) -> Backend:
        from dmuserd.snapshot._cow_tools import create_cow

        cow = workdir / "new.cow"
        if not cow.exists():
            base, target = make_images(random.Random(8), 512, 300)
            (workdir / "base.img").write_bytes(base)
            (workdir / "raw.img").write_bytes(target)
            create_cow(str(workdir / "base.img"), str(workdir / "raw.img"), str(cow), version=3, compression="lz4",
                       xor=True)
        return create("snapshot", self.options(workdir))

    def options(self, workdir: Path) -> dict[str, str]:
        return {"base": str(workdir / "base.img"), "cow": str(workdir / "new.cow"), "offload": "cpu"}


# -- the example plug-in's own test --------------------------------------------------------


def test_the_pattern_example_passes_its_own_conformance_test():
    """As its author would run it: pytest in the example's folder (its pyproject.toml is the rootdir)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE)],
                            cwd=EXAMPLE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout


# -- the suite finds what is wrong ----------------------------------------------------------


class _Forgetful(MemoryBackend):
    """Drops every write to the second 64 KiB chunk."""

    async def write(self, offset, data, fua=False):
        if not (offset < 2 * 65536 and 65536 < offset + len(data)):
            await super().write(offset, data, fua)


class _KeepsTheCallersBuffer(Backend):
    """Stores the caller's buffer itself, not its bytes."""

    def __init__(self) -> None:
        super().__init__(size=1 << 20)
        self.blocks: dict[int, object] = {}

    async def read(self, offset, length):
        return b"".join(bytes(self.blocks.get(b, bytes(512))) for b in range(offset // 512, (offset + length) // 512))

    async def write(self, offset, data, fua=False):
        view = memoryview(data)
        for i in range(0, len(view), 512):
            self.blocks[(offset + i) // 512] = view[i : i + 512]


class _SilentlyReadOnly(MemoryBackend):
    """WRITE disabled, yet a direct write() quietly succeeds."""

    def __init__(self) -> None:
        Backend.__init__(self, size=1 << 20, disabled_ops={Op.WRITE})
        self._chunks = {}


class _HalfReadinto(MemoryBackend):
    """readinto fills only the first half of the buffer it is given."""

    async def readinto(self, offset, buffer):
        half = len(buffer) // 2 // 512 * 512
        buffer[:half] = await self.read(offset, half)


class _Volatile(MemoryBackend):
    """A RAM disk that claims to be durable: made again, it is empty."""


class _AllHoles(MemoryBackend):
    """Reports every range as a hole, written or not."""

    async def extents(self, offset, length):
        return [Extent(length, True)]


@pytest.mark.parametrize(
    ("backend", "attrs", "check", "message"),
    [
        (lambda: _Forgetful(SIZE), {}, "test_read_after_write", "expected write #"),
        (lambda: _Forgetful(SIZE), {}, "test_concurrent_requests", "tasks found wrong data"),
        (_KeepsTheCallersBuffer, {}, "test_writes_at_the_edges", "its buffer zeroed after write"),
        (_SilentlyReadOnly, {}, "test_missing_operations_refused", "a direct call succeeded"),
        (lambda: _HalfReadinto(SIZE), {"expected": lambda self, w, o, n: bytes(n)}, "test_reads_in_range",
         "readinto("),
        (lambda: _Volatile(SIZE), {"durable": True}, "test_durable_after_reopen", "made again after close"),
        (lambda: _AllHoles(SIZE), {}, "test_read_after_write", ": the hole at"),
        (lambda: FaultyBackend(MemoryBackend(SIZE), [(0, 512)], {Op.FLUSH}), {}, "test_flush", "injected flush"),
        (lambda: MemoryBackend(SIZE), {"expected": lambda self, w, o, n: b"x" * n}, "test_reads_in_range",
         "expected other bytes"),
    ],
    ids=["lost-writes", "lost-writes-concurrent", "keeps-buffer", "silent-disabled-op", "half-readinto", "not-durable",
         "holes-over-data", "flush-fails", "wrong-content"],
)
def test_the_suite_finds_a_broken_backend(backend, attrs, check, message):
    suite = type("Broken", (BackendConformance,), {"make_backend": lambda self, workdir: backend(), **attrs})
    with pytest.raises(BaseException) as failed:
        getattr(suite(), check)()
    assert message in repr(failed.value), repr(failed.value)
