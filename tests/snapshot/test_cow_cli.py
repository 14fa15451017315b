"""``dmuserd cow ...`` run as a user would: a subprocess."""

import json
import random
import subprocess
import sys
from pathlib import Path

from cow_helpers import AOSP_COW, BS, make_images, write

DMUSERD = str(Path(sys.executable).with_name("dmuserd"))


def run(*args):
    return subprocess.run([DMUSERD, "cow", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_inspect_json_on_the_aosp_vector():
    res = run("inspect", "--json", "--ops", "--merge-order", AOSP_COW)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["version"] == "2.0" and info["num_merge_ops"] == 1 and info["compression"] == "none"
    assert info["counts"] == {"copy": 1, "replace": 1, "zero": 10, "label": 2, "cluster": 3, "xor": 1,
                              "sequence": 0}
    assert info["labels"] == [1, 2]
    assert info["footer"]["num_ops"] == 18
    assert [op["type"] for op in info["ops"]][:5] == ["copy", "replace", "label", "xor", "cluster"]
    order = [(op["type"], op["new_block"]) for op in info["merge_order"]]
    assert order == [("copy", 0), ("xor", 50), ("replace", 2)] + [("zero", b) for b in range(5, 15)]
    assert [op["merged"] for op in info["merge_order"]][:2] == [True, False]


def test_inspect_text():
    res = run("inspect", AOSP_COW)
    assert res.returncode == 0 and "Version: 2.0" in res.stdout and "Labels: 1, 2" in res.stdout


def test_create_render_verify(tmp_path):
    base, target = make_images(random.Random(4), 64, 40)
    b, t = write(tmp_path / "b.img", base), write(tmp_path / "t.img", target)
    cow = tmp_path / "t.cow"
    res = run("create", "--base", b, "--target", t, "-o", cow, "--version", "3", "--compression", "lz4", "--xor")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    res = run("render", "--base", b, cow, "-o", tmp_path / "out.img")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out.img").read_bytes() == target
    res = run("verify", "--base", b, "--target", t, cow)
    assert res.returncode == 0 and "equals" in res.stdout
    # a target differing in block 17 only: exit 1 naming the block
    other = bytearray(target)
    other[17 * BS + 5] ^= 0xFF
    res = run("verify", "--base", b, "--target", write(tmp_path / "o.img", bytes(other)), cow)
    assert res.returncode == 1 and "block 17" in res.stdout


def test_corrupt_file_is_one_line_exit_1(tmp_path):
    data = bytearray(open(AOSP_COW, "rb").read())
    data[2097190] = 9  # the first op's type: no such op
    bad = write(tmp_path / "bad.cow", bytes(data))
    res = run("inspect", bad)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith("dmuserd: error:") and "offset 2097190" in lines[0] and "rule op-type" in lines[0]
    res = run("inspect", write(tmp_path / "junk", b"not a cow file at all"))
    assert res.returncode == 1 and "rule magic" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_missing_file_is_one_line_exit_1(tmp_path):
    res = run("inspect", tmp_path / "missing.cow")
    assert res.returncode == 1 and "No such file" in res.stderr and "Traceback" not in res.stderr
