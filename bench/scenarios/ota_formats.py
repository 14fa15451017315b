"""Real-OTA formats against AOSP's own tools: PUFFDIFF apply and dm-verity tree + FEC.

* **PUFFDIFF.** A payload of one partition holding gzip'd text files (16 of
  about 0.45 MB compressed; quick: 4), each changed in a few lines, every one
  a PUFFDIFF operation made by AOSP's ``puffin``. Anchor: ``puffin
  --operation=puffpatch`` applying the same patches to the same source
  bytes, one process per patch as update_engine's tests run it (its start-up,
  a few ms, is in its time). Ours: ``dmuserd ota apply`` of the payload (a
  whole command: start-up, COW writing and the SHA-256 verification
  included), and the patches alone in-process (``apply_diff``).
  Issue #18's target: apply ≥ 0.5× puffin's speed.
* **Verity.** A random 1 GiB image (quick: 64 MiB); the hash tree (sha256,
  salted) and the FEC (2 roots). Anchor: ``veritysetup format
  --fec-device`` on the same image, the layout update_engine writes. Ours:
  :func:`dmuserd.snapshot._verity.verity_writes` over the image, reading
  it with ``pread``. Target: ≤ 2× veritysetup's time (ratio ≥ 0.5).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import best_seconds

TITLE = "OTA formats: PUFFDIFF apply vs AOSP puffin, verity tree + FEC vs veritysetup (1 GiB; quick 64 MiB)"

BS = 4096
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TOOLS = next((p for p in (SHARED / "tools" / "aosp" / "bin", Path("/work/shared/tools/aosp/bin")) if p.is_dir()),
             SHARED / "tools" / "aosp" / "bin")


def _text(seed: int, lines: int) -> bytes:
    return b"".join(b"%d: record %d of file %d, %s\n" % (i * 7919 % 10007, i, seed, b"value" * (i % 13))
                    for i in range(lines))


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BS)


def _puffdiff_payload(work: Path, files: int):
    """payload.bin + old/system.img of ``files`` PUFFDIFF operations; the (source, patch, size) of each."""
    from dmuserd.snapshot import _payload_proto as proto
    from dmuserd.snapshot.payload import OpType

    old_parts, new_parts, ops = [], [], []
    for n in range(files):
        text = _text(n, 60000)
        changed = text.replace(b"record 30000 ", b"RECORD 30000 ").replace(b"record 100 ", b"rec 100 ") + b"end\n"
        old_gz, new_gz = gzip.compress(text, 6, mtime=0), gzip.compress(changed, 6, mtime=0)
        width = max(len(_pad(old_gz)), len(_pad(new_gz)))
        old, new = old_gz + bytes(width - len(old_gz)), new_gz + bytes(width - len(new_gz))
        (work / "p.src").write_bytes(old)
        (work / "p.dst").write_bytes(new)
        subprocess.run([str(TOOLS / "puffin"), "--operation=puffdiff", f"--src_file={work / 'p.src'}",
                        f"--dst_file={work / 'p.dst'}", f"--patch_file={work / 'p'}", "--src_file_type=raw",
                        "--dst_file_type=raw", f"--src_deflates_byte=10:{len(old_gz) - 18}",
                        f"--dst_deflates_byte=10:{len(new_gz) - 18}"], check=True, capture_output=True)
        ops.append((old, (work / "p").read_bytes(), new))
        old_parts.append(old)
        new_parts.append(new)
    old_img, new_img = b"".join(old_parts), b"".join(new_parts)
    manifest = proto.DeltaArchiveManifest(block_size=BS, minor_version=8)
    part = manifest.partitions.add(partition_name="system")
    part.old_partition_info.size = len(old_img)
    part.old_partition_info.hash = hashlib.sha256(old_img).digest()
    part.new_partition_info.size = len(new_img)
    part.new_partition_info.hash = hashlib.sha256(new_img).digest()
    block, offset, blobs = 0, 0, []
    for old, patch, _new in ops:
        n = len(old) // BS
        op = part.operations.add(type=int(OpType.PUFFDIFF), data_offset=offset, data_length=len(patch))
        op.src_extents.add(start_block=block, num_blocks=n)
        op.dst_extents.add(start_block=block, num_blocks=n)
        op.data_sha256_hash = hashlib.sha256(patch).digest()
        blobs.append(patch)
        block, offset = block + n, offset + len(patch)
    raw = manifest.SerializeToString()
    import struct

    (work / "payload.bin").write_bytes(struct.pack(">4sQQI", b"CrAU", 2, len(raw), 0) + raw + b"".join(blobs))
    (work / "old").mkdir(exist_ok=True)
    (work / "old" / "system.img").write_bytes(old_img)
    return ops, new_img


def _puffdiff(quick: bool, repeat: int) -> dict:
    from dmuserd.snapshot._payload_data import apply_diff
    from dmuserd.snapshot.payload import OpType

    with tempfile.TemporaryDirectory(prefix="dmuserd-bench-puff-") as tmp:
        work = Path(tmp)
        ops, new_img = _puffdiff_payload(work, 4 if quick else 16)
        for i, (old, patch, _new) in enumerate(ops):
            (work / f"src{i}").write_bytes(old)
            (work / f"patch{i}").write_bytes(patch)

        def puffin() -> None:
            for i in range(len(ops)):
                subprocess.run([str(TOOLS / "puffin"), "--operation=puffpatch", f"--src_file={work / f'src{i}'}",
                                f"--dst_file={work / f'out{i}'}", f"--patch_file={work / f'patch{i}'}"],
                               check=True, capture_output=True)

        def engine() -> None:
            for old, patch, new in ops:
                assert apply_diff(OpType.PUFFDIFF, patch, old, len(new)) == new

        def apply(*extra) -> None:
            shutil.rmtree(work / "cow", ignore_errors=True)
            subprocess.run([sys.executable, "-m", "dmuserd", "ota", "apply", str(work / "payload.bin"),
                            "--source-dir", str(work / "old"), "--cow-dir", str(work / "cow"), *extra],
                           check=True, capture_output=True)

        t_puffin = best_seconds(puffin, repeat)
        for i, (_old, _patch, new) in enumerate(ops):
            assert (work / f"out{i}").read_bytes() == new, "puffin's output differs from the new file"
        t_engine = best_seconds(engine, repeat)
        t_apply = best_seconds(apply, repeat)
        t_apply_nv = best_seconds(lambda: apply("--no-verify"), repeat)
        mb = len(new_img) / 1e6
        patch_bytes = sum(len(p) for _o, p, _n in ops)
    return {
        "figures": {"puffdiff_ota_apply_mbps": round(mb / t_apply, 2),
                    "puffdiff_ota_apply_no_verify_mbps": round(mb / t_apply_nv, 2),
                    "puffdiff_patches_in_process_mbps": round(mb / t_engine, 2)},
        "anchors": {"puffin_puffpatch_mbps": round(mb / t_puffin, 2)},
        "ratios": {"ota_apply_vs_puffin": round(t_puffin / t_apply, 3),
                   "ota_apply_no_verify_vs_puffin": round(t_puffin / t_apply_nv, 3),
                   "patches_in_process_vs_puffin": round(t_puffin / t_engine, 3)},
        "targets": {"ota_apply_vs_puffin": 0.5},
        "note": f"{len(ops)} PUFFDIFF ops, {mb:.1f} MB of new gzip data, {patch_bytes} bytes of patches",
    }


def _verity(quick: bool, repeat: int) -> dict:
    from dmuserd.snapshot import _verity as v

    size = (64 if quick else 1024) << 20
    blocks = size // BS
    tree = v.hash_tree_blocks(blocks, BS, "sha256")
    fec = v.fec_blocks(blocks + tree, 2)
    salt = bytes(range(32))
    params = v.VerityParams("bench", BS, blocks + tree + fec,
                            v.HashTreeSpec(v.BlockRange(0, blocks), v.BlockRange(blocks, tree), "sha256", salt),
                            v.FecSpec(v.BlockRange(0, blocks + tree), v.BlockRange(blocks + tree, fec), 2))
    with tempfile.TemporaryDirectory(prefix="dmuserd-bench-verity-") as tmp:
        data = os.path.join(tmp, "data.img")
        with open(data, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        image = os.path.join(tmp, "verity.img")

        def veritysetup() -> None:
            shutil.copyfile(data, image)
            started = time.perf_counter()
            subprocess.run(["veritysetup", "format", image, image, "--format=1", "--no-superblock",
                            f"--hash-offset={size}", f"--data-blocks={blocks}", "--data-block-size=4096",
                            "--hash-block-size=4096", f"--salt={salt.hex()}", f"--fec-device={image}",
                            f"--fec-offset={size + tree * BS}", "--fec-roots=2"], check=True, capture_output=True)
            return time.perf_counter() - started

        fd = os.open(data, os.O_RDONLY)
        out: list = []

        def ours() -> None:
            out[:] = list(v.verity_writes(params, lambda start, count: os.pread(fd, count * BS, start * BS)))

        try:
            t_veritysetup = min(veritysetup() for _ in range(repeat))  # the copy is not timed
            t_ours = best_seconds(ours, repeat)
        finally:
            os.close(fd)
        with open(image, "rb") as f:
            for block, piece in out:
                f.seek(block * BS)
                assert f.read(len(piece)) == piece, f"our verity blocks at {block} differ from veritysetup's"
    mb = size / 1e6
    return {
        "figures": {"verity_tree_fec_mbps": round(mb / t_ours, 1)},
        "anchors": {"veritysetup_format_fec_mbps": round(mb / t_veritysetup, 1)},
        "ratios": {"verity_vs_veritysetup": round(t_veritysetup / t_ours, 3)},
        "targets": {"verity_vs_veritysetup": 0.5},
        "note": f"{size >> 20} MiB random data, sha256 tree ({tree} blocks), FEC 2 roots ({fec} blocks), "
                f"page-cached; native RS step: {v._verity_rs is not None}",
    }


def run(quick: bool) -> dict:
    from bench.run import Skip

    if not (TOOLS / "puffin").exists():
        raise Skip(f"AOSP's puffin is not at {TOOLS} (../shared/tools/aosp beside the checkout)")
    if shutil.which("veritysetup") is None:
        raise Skip("veritysetup is not installed (cryptsetup-bin)")
    repeat = 2 if quick else 3
    parts = [_puffdiff(quick, repeat), _verity(quick, repeat)]
    result = {"figures": {}, "anchors": {}, "ratios": {}, "targets": {}, "units": {}}
    for part in parts:
        for key in ("figures", "anchors", "ratios", "targets"):
            result[key].update(part[key])
    result["units"] = {k: "MB/s" for k in {**result["figures"], **result["anchors"]}}
    result["notes"] = "; ".join(p["note"] for p in parts) + f"; best of {repeat}"
    return result
