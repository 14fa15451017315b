"""OTA payloads applied as COW files: the AOSP vectors render to the new
images for COW v2 and v3, the COW files merge in place into the old images,
merge operations become Copy/Xor ops in a safe order, an interrupted
conversion resumes at its label, and the CLI does all this."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cow_helpers import merge_in_place
from ota_vectors import DELTA, FULL, HASHES, NEW, OLD, source_dir, sha256, synthetic_payload

from dmuserd.snapshot.cow import CowReader, OpType as CowOp
from dmuserd.snapshot.merge import merge_cow
from dmuserd.snapshot.ota import apply_payload
from dmuserd.snapshot.payload import PayloadError
from dmuserd.snapshot.view import SnapshotView

DMUSERD = [sys.executable, "-m", "dmuserd"]


def render(cow, base, size: int) -> bytes:
    with CowReader(cow) as reader, SnapshotView(reader, base, size=size) as view:
        return view.read(0, size)


@pytest.mark.parametrize("version,compression", [(2, "none"), (2, "gz"), (3, "lz4"), (3, "zstd")])
@pytest.mark.parametrize("kind", ["delta", "full"])
def test_vectors_render_the_new_images(tmp_path, kind, version, compression):
    src = source_dir(tmp_path) if kind == "delta" else None
    out = tmp_path / "out"
    results = apply_payload(DELTA if kind == "delta" else FULL, cow_dir=out, source_dir=src, version=version,
                            compression=compression)
    assert [r.name for r in results] == ["kernel", "root"]
    for r in results:
        # rendered independently of the converter's own check
        data = render(r.cow, src / f"{r.name}.img" if src else os.devnull, r.size)
        assert sha256(data) == HASHES[r.name] == r.sha256
        with CowReader(r.cow) as reader:
            assert reader.version == version
            assert reader.compression.name.lower() == compression
            # a label after each install operation (v3 keeps the newest four)
            labels = list(range(r.operations + 1))
            assert reader.labels == (labels if version == 2 else labels[-4:])
    assert sorted(os.listdir(out)) == ["kernel.cow", "root.cow"]  # no temporary files left
    if kind == "delta":
        kernel = {r.name: r for r in results}["kernel"]
        # SOURCE_COPY 37,38,38,38 -> 37..40: two self-copies skipped, two Copy ops
        assert kernel.counts["copy"] == 2
        with CowReader(kernel.cow) as reader:
            assert sorted((op.new_block, op.source) for op in reader.data_ops if op.type == CowOp.COPY) == [
                (39, 38), (40, 38)]


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("kind", ["delta", "full"])
async def test_vectors_merge_in_place_into_the_old_images(tmp_path, kind, version):
    src = source_dir(tmp_path) if kind == "delta" else None
    results = apply_payload(DELTA if kind == "delta" else FULL, cow_dir=tmp_path / "out", source_dir=src,
                            version=version, compression="lz4")
    for r in results:
        base = tmp_path / f"{r.name}.merged"
        old = OLD[r.name].read_bytes() if src else b""
        # an in-place merge does not grow a partition: resize it first, as the device does
        base.write_bytes(old + bytes(max(0, r.size - len(old))))
        result = await merge_cow(base, r.cow, offload="cpu")
        assert result.merged_now == result.total_ops > 0
        assert sha256(base.read_bytes()[: r.size]) == HASHES[r.name]
        assert base.read_bytes()[: r.size] == NEW[r.name].read_bytes()


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("merge_ops", [True, False], ids=["merge-ops", "computed-order"])
async def test_merge_operations_become_ordered_copies_and_xors(tmp_path, version, merge_ops):
    old, new = synthetic_payload(tmp_path / "p.bin", merge_ops=merge_ops)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "system.img").write_bytes(old)
    (r,) = apply_payload(tmp_path / "p.bin", cow_dir=tmp_path / "out", source_dir=tmp_path / "old",
                         version=version)
    assert render(r.cow, tmp_path / "old" / "system.img", len(new)) == new
    with CowReader(r.cow) as reader:
        by_block = {op.new_block: op for op in reader.data_ops}
        if merge_ops:
            # COW_COPY shifted up by one: merged from the top down (WriteMergeSequence's reverse rule)
            assert reader.sequence == [4, 3, 2, 1, 12, 13]
            assert [(b, by_block[b].source) for b in (1, 2, 3, 4)] == [(1, 0), (2, 1), (3, 2), (4, 3)]
            assert by_block[12].type == CowOp.XOR and by_block[12].source == 12 * 4096
            assert by_block[13].type == CowOp.XOR and by_block[13].source == 5 * 4096 + 100
            # the xor source of block 15 runs off the old partition: a Replace, not in the sequence
            assert by_block[15].type == CowOp.REPLACE
            # the swap 8 <-> 10 has no COW_COPY: Replace ops holding the source blocks
            assert by_block[8].type == by_block[10].type == CowOp.REPLACE
        else:
            # no merge operations: the order is computed; the swap's cycle is broken with one Replace
            assert reader.sequence[:4] == [4, 3, 2, 1]
            assert sorted(op.type.name for op in (by_block[8], by_block[10])) == ["COPY", "REPLACE"]
            assert not any(op.type == CowOp.XOR for op in reader.data_ops)
        assert 14 not in by_block  # copied onto itself: no op
    # both merge engines (the reference and the real one) end with the new image
    assert merge_in_place(old, r.cow) == new
    base = tmp_path / "merged.img"
    base.write_bytes(old)
    await merge_cow(base, r.cow, offload="cpu")
    assert base.read_bytes() == new


def test_cow_settings_come_from_the_manifest_unless_asked(tmp_path):
    vabc = dict(vabc_enabled=True, vabc_compression_param="zstd", cow_version=3, compression_factor=16384)
    old, new = synthetic_payload(tmp_path / "p.bin", vabc=vabc)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "system.img").write_bytes(old)
    (r,) = apply_payload(tmp_path / "p.bin", cow_dir=tmp_path / "a", source_dir=tmp_path / "old")
    with CowReader(r.cow) as reader:
        assert (reader.version, reader.compression.name, reader.header.max_compression_size) == (3, "ZSTD", 16384)
    (r,) = apply_payload(tmp_path / "p.bin", cow_dir=tmp_path / "b", source_dir=tmp_path / "old", version=2,
                         compression="gz,1")
    with CowReader(r.cow) as reader:
        assert (reader.version, reader.compression.name) == (2, "GZ")
    assert render(r.cow, tmp_path / "old" / "system.img", len(new)) == new
    synthetic_payload(tmp_path / "q.bin", vabc=dict(cow_version=4))
    with pytest.raises(PayloadError, match="asks for COW version 4; dmuserd writes 2 and 3"):
        apply_payload(tmp_path / "q.bin", cow_dir=tmp_path / "c", source_dir=tmp_path / "old")
    (r,) = apply_payload(tmp_path / "q.bin", cow_dir=tmp_path / "c", source_dir=tmp_path / "old", version=3)
    assert r.sha256 == sha256(new)


@pytest.mark.parametrize("version", [2, 3])
def test_interrupted_conversion_resumes_at_its_label(tmp_path, version):
    src = source_dir(tmp_path)
    whole = apply_payload(DELTA, cow_dir=tmp_path / "whole", source_dir=src, version=version,
                          partitions=["kernel"])[0]

    def interrupt(partition, index):
        if index == 6:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        apply_payload(DELTA, cow_dir=out, source_dir=src, version=version, partitions=["kernel"],
                      on_operation=interrupt)
    (partial,) = os.listdir(out)
    assert partial.startswith(".kernel.cow.") and partial.endswith(".partial")
    with open(out / partial, "ab") as f:
        f.write(os.urandom(5000))  # a torn write after the last label: dropped on resume
    seen = []
    (resumed,) = apply_payload(DELTA, cow_dir=out, source_dir=src, version=version, partitions=["kernel"],
                               on_operation=lambda p, i: seen.append(i))
    assert resumed.resumed_at == 7  # label 7: operations 0..6 were done
    assert seen == list(range(7, 14))
    assert os.listdir(out) == ["kernel.cow"]
    # the resumed file is the uninterrupted one, byte for byte
    assert (out / "kernel.cow").read_bytes() == open(whole.cow, "rb").read()
    # other settings do not resume this file: a stale partial is replaced
    with pytest.raises(KeyboardInterrupt):
        apply_payload(DELTA, cow_dir=out, source_dir=src, version=version, partitions=["kernel"],
                      on_operation=interrupt)
    (again,) = apply_payload(DELTA, cow_dir=out, source_dir=src, version=version, compression="gz",
                             partitions=["kernel"])
    assert again.resumed_at is None and sorted(os.listdir(out)) == ["kernel.cow"]


def test_cli_inspect_apply_verify(tmp_path):
    src = source_dir(tmp_path)
    out = tmp_path / "out"
    info = json.loads(subprocess.run(DMUSERD + ["ota", "inspect", DELTA, "--json"], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["kind"] == "delta" and info["minor_version"] == 6
    kernel, root = info["partitions"]
    assert kernel["operation_types"] == {"BROTLI_BSDIFF": 1, "ZERO": 6, "REPLACE_BZ": 6, "SOURCE_COPY": 1}
    assert (kernel["new_size"], root["old_size"], root["new_size"]) == (4194304, 4096, 12288)
    assert root["new_sha256"] == HASHES["root"]
    text = subprocess.run(DMUSERD + ["ota", "inspect", FULL], check=True, capture_output=True, text=True).stdout
    assert "(full, version 2, minor 0)" in text and "2 operations (REPLACE_BZ 2)" in text

    done = subprocess.run(DMUSERD + ["ota", "apply", DELTA, "--source-dir", src, "--cow-dir", out,
                                     "--partitions", "root", "--cow-version", "3", "--compression", "zstd,5"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{out / 'root.cow'}: root, 12288 bytes, sha256 {HASHES['root']}" in done.stdout
    assert os.listdir(out) == ["root.cow"]
    ok = subprocess.run(DMUSERD + ["ota", "verify", DELTA, "--cow-dir", out, "--source-dir", src,
                                   "--partitions", "root"], capture_output=True, text=True)
    assert ok.returncode == 0 and "root OK" in ok.stdout
    # the new images verify; the old ones do not (exit 1, the differing hash named)
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    for name, path in NEW.items():
        (new_dir / name).write_bytes(path.read_bytes())
    assert subprocess.run(DMUSERD + ["ota", "verify", FULL, "--image-dir", new_dir],
                          capture_output=True).returncode == 0
    bad = subprocess.run(DMUSERD + ["ota", "verify", FULL, "--image-dir", src], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "kernel DIFFERS" in bad.stdout and "root DIFFERS" in bad.stdout and "only 4096 of 12288" in bad.stdout
