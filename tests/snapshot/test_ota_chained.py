"""Chained and partial updates (issue #18, item 6): a second incremental applies
on top of the first one's target, rendered or served, and a payload that
updates some partitions leaves the others alone."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest
from ota_vectors import BS, delta_payload, pattern

DMUSERD = [sys.executable, "-m", "dmuserd"]


def cli(*args) -> str:
    result = subprocess.run(DMUSERD + [str(a) for a in args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def images():
    """Three builds of two partitions: v1 → v2 → v3."""
    v1 = {"system": b"".join(pattern(i) for i in range(12)), "vendor": b"".join(pattern(100 + i) for i in range(6))}
    v2 = {"system": v1["system"][: 3 * BS] + pattern(500) + v1["system"][4 * BS :],
          "vendor": bytes(BS) + v1["vendor"][BS:]}
    system3 = bytearray(v2["system"])
    system3[5 * BS + 10 : 5 * BS + 20] = b"third edit"
    v3 = {"system": bytes(system3), "vendor": v2["vendor"][: 5 * BS] + pattern(900)}
    return v1, v2, v3


def write_images(directory, parts: dict) -> None:
    directory.mkdir(exist_ok=True)
    for name, data in parts.items():
        (directory / f"{name}.img").write_bytes(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_second_incremental_applies_to_the_rendered_first(tmp_path):
    v1, v2, v3 = images()
    write_images(tmp_path / "v1", v1)
    delta_payload(tmp_path / "a.bin", {n: (v1[n], v2[n]) for n in v1})
    delta_payload(tmp_path / "b.bin", {n: (v2[n], v3[n]) for n in v1})
    cli("ota", "apply", tmp_path / "a.bin", "--cow-dir", tmp_path / "cow1", "--source-dir", tmp_path / "v1")
    (tmp_path / "v2").mkdir()
    for name in v1:
        cli("cow", "render", tmp_path / "cow1" / f"{name}.cow", "--base", tmp_path / "v1" / f"{name}.img",
            "-o", tmp_path / "v2" / f"{name}.img", "--size", len(v2[name]))
    out = cli("ota", "apply", tmp_path / "b.bin", "--cow-dir", tmp_path / "cow2", "--source-dir", tmp_path / "v2")
    assert f"sha256 {sha(v3['system'])}" in out and f"sha256 {sha(v3['vendor'])}" in out
    out = cli("ota", "verify", tmp_path / "b.bin", "--cow-dir", tmp_path / "cow2", "--source-dir", tmp_path / "v2")
    assert out.count(" OK (sha256") == 2


def test_the_second_incremental_refuses_the_wrong_source(tmp_path):
    v1, v2, v3 = images()
    write_images(tmp_path / "v1", v1)
    delta_payload(tmp_path / "b.bin", {n: (v2[n], v3[n]) for n in v1})
    result = subprocess.run(DMUSERD + ["ota", "apply", str(tmp_path / "b.bin"), "--cow-dir", str(tmp_path / "c"),
                                       "--source-dir", str(tmp_path / "v1")], capture_output=True, text=True)
    assert result.returncode != 0 and "not the old 'system' image the payload was made for" in result.stderr


def test_a_second_incremental_applies_to_the_served_first(tmp_path):
    """The first update served over FUSE (as an OTA engineer looks at it) is the second's source."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("serving over FUSE needs root and /dev/fuse")
    v1, v2, v3 = images()
    write_images(tmp_path / "v1", v1)
    delta_payload(tmp_path / "a.bin", {n: (v1[n], v2[n]) for n in v1})
    delta_payload(tmp_path / "b.bin", {n: (v2[n], v3[n]) for n in v1})
    served = tmp_path / "served"
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(DMUSERD + ["ota", "serve", str(tmp_path / "a.bin"), "--source-dir", str(tmp_path / "v1"),
                                       "--export", f"fuse:{served}", "--control-socket", str(tmp_path / "c.sock")],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "c.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
        out = cli("ota", "apply", tmp_path / "b.bin", "--cow-dir", tmp_path / "cow2", "--source-dir", served)
        assert f"sha256 {sha(v3['system'])}" in out and f"sha256 {sha(v3['vendor'])}" in out
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_a_partial_update_touches_only_its_partitions(tmp_path):
    v1, v2, _v3 = images()
    write_images(tmp_path / "v1", v1)
    delta_payload(tmp_path / "p.bin", {"vendor": (v1["vendor"], v2["vendor"])}, partial=True)
    info = cli("ota", "inspect", tmp_path / "p.bin", "--json")
    assert '"partial_update": true' in info and '"name": "system"' not in info
    out = cli("ota", "apply", tmp_path / "p.bin", "--cow-dir", tmp_path / "cow", "--source-dir", tmp_path / "v1")
    assert "vendor" in out and sorted(os.listdir(tmp_path / "cow")) == ["vendor.cow"]
    out = cli("ota", "verify", tmp_path / "p.bin", "--cow-dir", tmp_path / "cow", "--source-dir", tmp_path / "v1")
    assert "vendor OK" in out and "system" not in out
