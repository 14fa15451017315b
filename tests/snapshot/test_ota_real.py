"""Issue #18's "done when": a payload with every operation type real OTAs use
(PUFFDIFF with bsdiff and zucchini inner patches, LZ4DIFF_BSDIFF, ZUCCHINI,
the bsdiff pair, SOURCE_COPY, REPLACE_*, ZERO), dm-verity hash tree and FEC
on one partition, signed, in an OTA zip, made by AOSP's own tools
(tests/snapshot/ota_real.py), applies to COW files whose rendered targets
match new_partition_info.hash; `ota verify` says so, and the COW files merge
in place into the old images."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from ota_real import build

DMUSERD = [sys.executable, "-m", "dmuserd"]


def cli(*args) -> str:
    result = subprocess.run(DMUSERD + [str(a) for a in args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ota-real"))


def test_inspect_shows_every_operation_and_the_verity_fields(real):
    text = cli("ota", "inspect", real["zip"])
    for op in real["ops"]["system"] + real["ops"]["vendor"]:
        assert op in text
    assert "verity: hash tree sha256" in text and "FEC 2 roots" in text
    assert "unsupported by dmuserd" not in text


def test_the_zip_applies_verifies_and_merges_into_the_new_images(real, tmp_path):
    cows = tmp_path / "cows"
    out = cli("ota", "apply", real["zip"], "--source-dir", real["old"], "--cow-dir", cows, "--cert", real["cert"])
    assert "signatures: metadata and payload signatures verified" in out
    for name, digest in real["sha256"].items():
        assert f"{cows / (name + '.cow')}: {name}," in out and f"sha256 {digest}" in out
    out = cli("ota", "verify", real["zip"], "--cow-dir", cows, "--source-dir", real["old"], "--cert", real["cert"])
    assert out.count(" OK (sha256 ") == 2
    for name in real["sha256"]:
        merged = tmp_path / f"{name}.img"
        shutil.copy(real["old"] / f"{name}.img", merged)
        cli("cow", "merge", "--base", merged, cows / f"{name}.cow")
        assert merged.read_bytes() == (real["new"] / f"{name}.img").read_bytes()
