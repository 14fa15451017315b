"""A device's old build in the forms an OTA engineer gets it, and an incremental OTA zip for it.

:func:`build` makes, from small real file systems (ext4 from ``mkfs.ext4 -d``,
EROFS with lz4 from ``mkfs.erofs``), two partitions ``system`` (ext4) and
``vendor`` (EROFS) in an old and a new version, and lays the old build out as

* ``super.img``: a Virtual A/B super image (our LP writer, tests/images/lp_writer.py),
  two metadata slots, ``system_a``/``vendor_a`` holding the old images (system in two
  extents), ``system_b``/``vendor_b`` empty; ``super_sparse.img``: the same made sparse
  by ``img2simg``;
* ``factory.zip``: a factory image: ``system.img`` and ``vendor.img`` as Android sparse
  images (``img2simg``), deflated, and a ``super_empty.img``;
* ``ota.zip``: the delta payload old → new for both (tests/snapshot/ota_vectors.py),
  packaged as ota_from_target_files does.

Used by tests/snapshot/test_ota_desktop.py, test_ota_merge_super.py (which import the ``material``
fixture and ``plain_logging`` from here) and the desktop_vab bench scenario.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE.parent / "images"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from lp_writer import SuperBuilder  # noqa: E402
from ota_vectors import delta_payload, ota_zip  # noqa: E402

TOOLS = ("mkfs.ext4", "mkfs.erofs", "img2simg")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """:func:`build`'s material, once per test module (skipped, saying which packages, without the tools)."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (e2fsprogs, erofs-utils, android-sdk-libsparse-utils: "
                    "scripts/system-packages.txt)")
    return build(tmp_path_factory.mktemp("vab"))


def not_logs(stderr: str) -> list[str]:
    """stderr's lines but the log lines (JSON objects: logs go to stderr too)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("{")]


def one_line_error(capsys, argv, *needles) -> str:
    """``dmuserd ARGV`` in process fails with exit status 1 and one line on stderr holding every needle."""
    from dmuserd.daemon.cli import main

    capsys.readouterr()
    assert main(argv) == 1
    err = not_logs(capsys.readouterr().err)
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


@pytest.fixture(autouse=True)
def plain_logging():
    """In-process ``dmuserd`` runs point structlog at the test's captured output: reset it after each test."""
    yield
    import structlog

    structlog.reset_defaults()


def _tree(root: Path, seed: int, files: int, changed_from: Path | None = None) -> None:
    """``files`` files of random bytes; with ``changed_from``, every third one new, the rest as there."""
    r = random.Random(seed)
    (root / "etc").mkdir(parents=True)
    for i in range(files):
        path = root / "etc" / f"f{i:03d}.bin"
        if changed_from is not None and i % 3:
            path.write_bytes((changed_from / "etc" / path.name).read_bytes())
        else:
            path.write_bytes(r.randbytes(r.randrange(1000, 40000)))
    (root / "build.prop").write_text(f"ro.build.id={'NEW' if changed_from else 'OLD'}\n")
    # compressible text, so EROFS stores lz4 clusters
    (root / "etc" / "notes.txt").write_text("".join(f"line {i} of {seed}: {'x' * (i % 50)}\n" for i in range(3000)))


def _run(*args) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def _pad(path: Path, block: int = 4096) -> bytes:
    data = path.read_bytes()
    return data + bytes(-len(data) % block)


def build(directory, *, files: int = 40, ext4_size: str = "6M") -> dict:
    """Everything in ``directory``; returns paths and the new images' bytes (see the module docstring)."""
    d = Path(directory)
    trees = {}
    for version, seed in (("old", 1), ("new", 2)):
        trees[version] = d / f"tree_{version}"
        _tree(trees[version], seed, files, changed_from=trees["old"] if version == "new" else None)
    images = {}
    for version in ("old", "new"):
        ext4 = d / f"system_{version}.ext4"
        _run("mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "^has_journal", "-d", trees[version],
             "-L", f"system_{version}", ext4, ext4_size)
        erofs = d / f"vendor_{version}.erofs"
        _run("mkfs.erofs", "-zlz4", "-T0", "--quiet", erofs, trees[version])
        images[version] = {"system": _pad(ext4), "vendor": _pad(erofs)}
    old, new = images["old"], images["new"]

    b = SuperBuilder(size=32 << 20, slots=2, minor=2, flags=1)
    ga = b.add_group("google_dynamic_partitions_a", 24 << 20)
    gb = b.add_group("google_dynamic_partitions_b", 24 << 20)
    b.add_partition("system_a", old["system"], group=ga, pieces=2)
    b.add_partition("vendor_a", old["vendor"], group=ga)
    b.add_partition("system_b", b"", group=gb)
    b.add_partition("vendor_b", b"", group=gb)
    b.write(d / "super.img")
    _run("img2simg", d / "super.img", d / "super_sparse.img")

    with zipfile.ZipFile(d / "factory.zip", "w") as z:
        for name in ("system", "vendor"):
            raw = d / f"{name}.raw"
            raw.write_bytes(old[name])
            _run("img2simg", raw, d / f"{name}.simg")
            z.write(d / f"{name}.simg", f"{name}.img", compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("super_empty.img", b.empty(d / "super_empty.img"), compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("android-info.txt", "require board=test\n")

    delta_payload(d / "payload.bin", {"system": (old["system"], new["system"]),
                                      "vendor": (old["vendor"], new["vendor"])})
    ota_zip(d / "ota.zip", d / "payload.bin")
    return {"dir": d, "super": d / "super.img", "super_sparse": d / "super_sparse.img", "factory": d / "factory.zip",
            "ota": d / "ota.zip", "old": old, "new": new, "trees": trees}
