"""Desktop Virtual A/B: a device's old build (a super image, raw or sparse, two slots; a factory-image
zip of sparse images) and an incremental OTA zip in, the updated partitions out, served over FUSE,
mounted read-only through loop devices (ext4 and EROFS with lz4), byte-exact to the new build
(``ota verify`` and SHA-256 of the loop devices), their files equal to the new build's.
Bad input (an unknown slot, a partition missing from super, a corrupt LP header, a sparse image
whose chunks overrun, a truncated zip) is one line naming the file, the offset and the rule, and
writes nothing."""

from __future__ import annotations

import filecmp
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import desktop_vab

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))
from daemon_harness import DMUSERD, mounted, need_root_tools, run  # noqa: E402

material = desktop_vab.material  # the fixtures
plain_logging = desktop_vab.plain_logging


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Served:
    """``dmuserd ota serve`` in a subprocess, exporting over FUSE."""

    def __init__(self, workdir: Path, *args) -> None:
        self.fuse = workdir / "fuse"
        self.control = workdir / "control.sock"
        self.log_path = workdir / "serve.log"
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(DMUSERD + ["ota", "serve", *map(str, args), "--export", f"fuse:{self.fuse}",
                                                "--control-socket", str(self.control)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.loops: list[str] = []

    def wait(self, names, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ota serve exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            if self.control.exists() and all((self.fuse / n).exists() for n in names):
                return
            time.sleep(0.05)
        raise AssertionError(f"ota serve not ready in {timeout} s:\n{self.log_path.read_text()}")

    def loop(self, name: str) -> str:
        device = run("losetup", "-r", "--find", "--show", self.fuse / name).stdout.strip()
        self.loops.append(device)
        return device

    def stop(self) -> int:
        for device in self.loops:
            run("losetup", "-d", device, check=False)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if os.path.ismount(self.fuse):
            run("umount", "-l", self.fuse, check=False)
        return self.proc.returncode


def _same_tree(mnt: Path, tree: Path) -> None:
    for path in sorted(tree.rglob("*")):
        if path.is_file():
            twin = mnt / path.relative_to(tree)
            assert twin.read_bytes() == path.read_bytes(), f"{twin} differs from {path}"
    cmp = filecmp.dircmp(mnt / "etc", tree / "etc")
    assert not cmp.left_only and not cmp.right_only, (cmp.left_only, cmp.right_only)


@pytest.mark.parametrize("source,slot", [("super", "a"), ("super_sparse", "a"), ("factory", None)])
def test_served_partitions_mount_and_equal_the_new_build(material, tmp_path, source, slot):
    need_root_tools("losetup", "mount")
    names = {"system": "system_b", "vendor": "vendor_b"} if slot else {"system": "system", "vendor": "vendor"}
    args = [material["ota"], "--source", material[source]] + (["--slot", slot] if slot else [])
    served = Served(tmp_path, *args)
    try:
        served.wait(names.values())
        for part, name in names.items():
            device = served.loop(name)
            with open(device, "rb") as f:
                assert _sha(f.read()) == _sha(material["new"][part]), f"{name} is not the new {part}"
            fstype = "ext4" if part == "system" else "erofs"
            assert run("blkid", "-o", "value", "-s", "TYPE", device).stdout.strip() == fstype
            with mounted(device, tmp_path / f"mnt_{part}") as mnt:
                _same_tree(mnt, material["trees"]["new"])
        verify = run(*DMUSERD, "ota", "verify", material["ota"], "--image-dir", served.fuse,
                     *(["--slot", slot] if slot else []), check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert verify.stdout.count(" OK (sha256 ") == 2
    finally:
        assert served.stop() == 0, (tmp_path / "serve.log").read_text()


def test_apply_then_verify_and_render_from_super(material, tmp_path, capsys):
    from dmuserd.daemon.cli import main

    out = tmp_path / "out"
    assert main(["ota", "apply", str(material["ota"]), "--source", str(material["super_sparse"]), "--slot", "a",
                 "--cow-dir", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["system.cow", "vendor.cow"]
    capsys.readouterr()
    assert main(["ota", "verify", str(material["ota"]), "--cow-dir", str(out), "--source", str(material["super"]),
                 "--slot", "a"]) == 0
    assert capsys.readouterr().out.count(" OK (sha256 ") == 2
    # the COW renders over the old partition named inside super, and over the sparse factory image
    for base in (f"{material['super']}::vendor_a", f"{material['factory']}::vendor.img"):
        assert main(["cow", "render", "--base", base, str(out / "vendor.cow"), "-o", str(tmp_path / "v.img"),
                     "--size", str(len(material["new"]["vendor"]))]) == 0
        assert (tmp_path / "v.img").read_bytes() == material["new"]["vendor"]
    # and cow merge refuses a base it cannot write in place
    for base in (f"{material['super']}::vendor_a", str(material["dir"] / "vendor.simg")):
        capsys.readouterr()
        assert main(["cow", "merge", "--base", base, str(out / "vendor.cow")]) == 1
        err = _not_logs(capsys.readouterr().err)
        assert len(err) == 1 and "only a raw image can take" in err[0], err


_not_logs = desktop_vab.not_logs
_one_line_error = desktop_vab.one_line_error


def test_bad_input_is_one_line_and_writes_nothing(material, tmp_path, capsys):
    import zipfile

    from lp_writer import SuperBuilder, metadata_offset

    ota = str(material["ota"])
    out = tmp_path / "out"

    def apply(*source):
        return ["ota", "apply", ota, "--cow-dir", str(out), *source]

    _one_line_error(capsys, apply("--source", str(material["super"]), "--slot", "c"), "super.img has no slot c")
    # a partition missing from super
    b = SuperBuilder(size=16 << 20)
    b.add_partition("system_a", material["old"]["system"])
    b.write(tmp_path / "small_super.img")
    _one_line_error(capsys, apply("--source", str(tmp_path / "small_super.img"), "--slot", "a"),
                    "partition 'vendor'", "no partition 'vendor_a' in slot a", "system_a")
    # a super image with several slots needs --slot
    _one_line_error(capsys, apply("--source", str(material["super"])), "pass --slot")
    # a corrupt LP header: both copies of slot a's metadata
    image = bytearray(material["super"].read_bytes())
    b2 = SuperBuilder(size=len(image))
    for backup in (False, True):
        image[metadata_offset(b2, 0, backup) + 20] ^= 0xFF
    (tmp_path / "bad_super.img").write_bytes(image)
    _one_line_error(capsys, apply("--source", str(tmp_path / "bad_super.img"), "--slot", "a"),
                    str(tmp_path / "bad_super.img"), f"offset {metadata_offset(b2, 0) + 12}",
                    "rule header-checksum")
    # a sparse image whose chunks overrun
    folder = tmp_path / "old"
    folder.mkdir()
    simg = bytearray((material["dir"] / "system.simg").read_bytes())
    simg[16:20] = (int.from_bytes(simg[16:20], "little") - 1).to_bytes(4, "little")  # total_blks one short
    (folder / "system.img").write_bytes(simg)
    (folder / "vendor.img").write_bytes(material["old"]["vendor"])
    line = _one_line_error(capsys, apply("--source", str(folder)), str(folder / "system.img"), "rule overrun")
    assert "offset " in line
    # a truncated factory zip
    data = material["factory"].read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) - 100])
    _one_line_error(capsys, apply("--source", str(tmp_path / "cut.zip")), str(tmp_path / "cut.zip"),
                    "rule zip-directory", "offset ")
    # a factory zip without the partition
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("boot.img", b"\0" * 4096)
    _one_line_error(capsys, apply("--source", str(tmp_path / "other.zip")), "partition 'system'",
                    "looked for system.img, system")
    assert not out.exists() or not [p for p in os.listdir(out) if not p.startswith(".")], os.listdir(out)
    assert not out.exists() or not os.listdir(out)
