"""``--offload`` on the cow and ota commands: the emulated engine writes and
finds exactly what the CPU engine does, and its counters show the data went
through the (emulated) device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from merge_testlib import torture_cow
from ota_vectors import DELTA, HASHES, source_dir

DMUSERD = [sys.executable, "-m", "dmuserd"]
ENV = {**os.environ, "DMUSERD_LOG_LEVEL": "error"}


def _run(*args, ok=(0,)) -> subprocess.CompletedProcess:
    res = subprocess.run(DMUSERD + [str(a) for a in args], capture_output=True, text=True, timeout=120, env=ENV)
    assert res.returncode in ok, res.stderr
    return res


def _json(*args, ok=(0,)) -> dict:
    return json.loads(_run(*args, "--json", ok=ok).stdout)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return torture_cow(tmp_path_factory.mktemp("cowoff"), 11, nblocks=768, version=3, compression="lz4")


def _offloaded(stats: dict) -> int:
    return stats.get("offloaded_bytes", 0)


def test_create_render_verify_emulated_equal_cpu(images, tmp_path):
    t = images
    outputs = {}
    for engine in ("cpu", "emulated"):
        cow = tmp_path / f"{engine}.cow"
        created = _json("cow", "create", "--base", t["base"], "--target", t["target"], "-o", cow, "--version", "3",
                        "--compression", "lz4", "--xor", "--offload", engine)
        img = tmp_path / f"{engine}.img"
        rendered = _json("cow", "render", "--base", t["base"], t["cow"], "-o", img, "--offload", engine)
        verified = _json("cow", "verify", "--base", t["base"], "--target", t["target"], cow, "--offload", engine)
        assert rendered["bytes"] == len(t["target_bytes"]) and img.read_bytes() == t["target_bytes"]
        assert verified["equal"] is True and verified["first_different_block"] is None
        outputs[engine] = (cow.read_bytes(), img.read_bytes(), {k: created[k] for k in ("copy", "xor", "zero", "replace")})
        for result in (created, rendered, verified):
            assert result["mover"]["engine"] == engine
            if engine == "emulated":
                assert _offloaded(result["mover"]) > 0 and result["mover"]["emulator"]["descriptors"] > 0
            else:
                assert _offloaded(result["mover"]) == 0 and result["mover"]["cpu_ops"] > 0
    assert outputs["cpu"] == outputs["emulated"]


def test_verify_finds_the_same_block_on_both_engines(images, tmp_path):
    t = images
    wrong = tmp_path / "wrong.img"
    data = bytearray(t["target_bytes"])
    data[517 * 4096 + 9] ^= 0xFF
    wrong.write_bytes(data)
    found = {engine: _json("cow", "verify", "--base", t["base"], "--target", wrong, t["cow"], "--offload", engine,
                           ok=(1,)) for engine in ("cpu", "emulated")}
    assert found["cpu"]["first_different_block"] == found["emulated"]["first_different_block"] == 517
    text = _run("cow", "verify", "--base", t["base"], "--target", wrong, t["cow"], "--offload", "emulated", ok=(1,))
    assert "differs from" in text.stdout and "mover: emulated" in text.stdout


def test_ota_apply_and_verify_emulated_equal_cpu(tmp_path):
    src = source_dir(tmp_path)
    cows = {}
    for engine in ("cpu", "emulated"):
        out = tmp_path / engine
        done = _run("ota", "apply", DELTA, "--source-dir", src, "--cow-dir", out, "--offload", engine)
        assert f"sha256 {HASHES['kernel']}" in done.stdout and f"mover: {engine}" in done.stdout
        ok = _run("ota", "verify", DELTA, "--cow-dir", out, "--source-dir", src, "--offload", engine)
        assert "kernel OK" in ok.stdout and "root OK" in ok.stdout
        for text in (done.stdout, ok.stdout):
            line = next(line for line in text.splitlines() if line.startswith("mover: "))
            offloaded = int(line.split("offloaded (")[1].split(" bytes")[0])
            assert (offloaded > 0) == (engine == "emulated"), line
        cows[engine] = {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}
    assert cows["cpu"] == cows["emulated"] and sorted(cows["cpu"]) == ["kernel.cow", "root.cow"]
