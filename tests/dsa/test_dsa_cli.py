"""``dmuserd dsa info`` as a user runs it: a subprocess."""

import json
import os
import subprocess
import sys

from fake_sysfs import build


def run_info(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "dmuserd", "dsa", "info", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_info_json_reports_extension_and_auto_engine(tmp_path, ext):
    empty = tmp_path / "none"
    empty.mkdir()
    report = json.loads(run_info("--json", env={"DMUSERD_DSA_SYSFS": str(empty)}))
    assert report["extension"]["available"] is True and report["extension"]["error"] is None
    assert set(report["cpu"]) >= {"movdir64b", "enqcmd", "waitpkg"}
    assert report["queues"] == []
    assert report["auto"]["engine"] == "cpu"
    assert "emulated" in report["engines"]


def test_info_json_on_a_fake_tree(tmp_path, ext):
    sysfs, devdir = build(tmp_path, {"wq0.0": {}, "wq0.1": {"type": "kernel"}}, cdevs=("wq0.0", "wq0.1"))
    report = json.loads(run_info("--json", "--sysfs", str(sysfs), "--devdir", str(devdir)))
    assert report["auto"]["engine"] == "dsa" and "wq0.0" in report["auto"]["reason"]
    usable = {q["name"]: q["usable"] for q in report["queues"]}
    assert usable == {"wq0.0": True, "wq0.1": False}


def test_info_text_explains(tmp_path, ext):
    sysfs, devdir = build(tmp_path, {"wq0.0": {"state": "disabled"}}, cdevs=("wq0.0",))
    out = run_info("--sysfs", str(sysfs), "--devdir", str(devdir))
    assert "extension: built" in out
    assert "wq0.0" in out and "unusable: queue is not enabled" in out
    assert "auto engine: cpu" in out


def test_info_shows_what_was_read_and_what_it_implies(tmp_path, ext):
    hidden = "00000000,00000000,00000000,00000000,00000000,00000000,00000001,000303fd"  # no BATCH
    sysfs, devdir = build(tmp_path, {"wq0.0": {}}, devices={"dsa0": {"op_cap": hidden, "gen_cap": "0x40915f0101"}},
                          cdevs=("wq0.0",))
    out = run_info("--sysfs", str(sysfs), "--devdir", str(devdir))
    assert "read: gen_cap 0x40915f0101, op_cap 0x1000303fd, op_config absent, block_on_fault 0" in out
    assert "offloadable: noop, drain, memmove" in out and "batch no, cache control no" in out
    assert "no BATCH (the kernel hides BATCH where user submission is not safe" in out
    report = json.loads(run_info("--json", "--sysfs", str(sysfs), "--devdir", str(devdir)))
    caps = report["queues"][0]["capabilities"]
    assert caps["batch"] is False and caps["cache_control"] is False and caps["gen_cap"] == "0x40915f0101"
