"""``dmuserd ota merge``: an OTA merged into a super image, into a copy or in place.

The desktop Virtual A/B material (ext4 ``system``, EROFS ``vendor``; raw and sparse super) merges into
``system_b``/``vendor_b`` over ``system_a``/``vendor_a``'s sectors: ``ota verify`` on the new super and
``super inspect`` show the new layout, the partitions equal the new build byte for byte and mount
read-only through loop devices. A partition that grows gets sectors from free space (never ones a
shrunk partition gave up: the merge still reads them), one that shrinks loses its tail; a group or a
super without room is refused before anything is written. A merge SIGKILLed at random instants
resumes, run after run, to the exact target. Bad input is one line, nothing written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

import desktop_vab
from lp_writer import SuperBuilder, metadata_offset
from ota_vectors import BS, PartitionBuilder, ota_zip, write_payload

from dmuserd.images import open_image, open_super
from dmuserd.snapshot import _payload_proto as proto
from dmuserd.snapshot.payload import OpType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))
from daemon_harness import mounted, need_root_tools, run  # noqa: E402

material = desktop_vab.material  # the fixtures
plain_logging = desktop_vab.plain_logging


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read(locator) -> bytes:
    with open_image(locator) as image:
        return image.pread(image.size, 0)


def _merge(*args) -> list[str]:
    return ["ota", "merge", *map(str, args)]


@pytest.mark.parametrize("source", ["super", "super_sparse"])
def test_merge_into_a_copy_is_the_new_build(material, tmp_path, capsys, source):
    from dmuserd.daemon.cli import main

    need_root_tools("losetup", "mount")
    before = _file_sha(material[source])
    new = tmp_path / "new-super.img"
    assert main(_merge(material["ota"], "--source", material[source], "--slot", "a", "--output", new)) == 0
    out = capsys.readouterr().out
    assert f"{new}::system_b: system" in out and f"{new}::vendor_b: vendor" in out
    assert _file_sha(material[source]) == before, "the source super image changed"
    assert not Path(f"{new}.partial").exists() and not Path(f"{new}.ota-merge").exists()
    # ota verify reads the target slot's partitions through the new metadata
    assert main(["ota", "verify", str(material["ota"]), "--image-dir", str(new), "--slot", "a"]) == 0
    assert capsys.readouterr().out.count(" OK (sha256 ") == 2
    assert main(["super", "inspect", str(new), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    slot_a, slot_b = info["slots"]
    parts_b = {p["name"]: p for p in slot_b["partitions"]}
    assert sorted(parts_b) == ["system_b", "vendor_b"]
    assert [g["name"] for g in slot_b["groups"]] == ["default", "google_dynamic_partitions_b"]
    for name in ("system", "vendor"):
        assert parts_b[f"{name}_b"]["size"] == len(material["new"][name])
        assert parts_b[f"{name}_b"]["group"] == "google_dynamic_partitions_b"
        assert _read(f"{new}::{name}_b") == material["new"][name]
        # the new partitions lie in the old ones' sectors (slot a's metadata is left as it was)
        old = {p["name"]: p for p in slot_a["partitions"]}[f"{name}_a"]
        assert parts_b[f"{name}_b"]["extents"][0]["start_sector"] == old["extents"][0]["start_sector"]
    # mountable: the partitions taken out of the new super, on read-only loop devices
    assert main(["super", "extract", str(new), "--slot", "b", "-o", str(tmp_path / "out")]) == 0
    for name, fstype in (("system", "ext4"), ("vendor", "erofs")):
        device = run("losetup", "-r", "--find", "--show", tmp_path / "out" / f"{name}_b.img").stdout.strip()
        try:
            assert run("blkid", "-p", "-o", "value", "-s", "TYPE", device).stdout.strip() == fstype
            with mounted(device, tmp_path / f"mnt_{name}") as mnt:
                assert (mnt / "build.prop").read_text() == "ro.build.id=NEW\n"
                for path in (material["trees"]["new"] / "etc").iterdir():
                    assert (mnt / "etc" / path.name).read_bytes() == path.read_bytes()
        finally:
            run("losetup", "-d", device, check=False)


# --- a partition that grows (by copies that move blocks) and one that shrinks -------------------------------------


def _moving_material(d: Path, *, group_max: int = 24 << 20, super_size: int = 16 << 20) -> dict:
    """super.img with app_a (1000 blocks) and data_a (200 blocks); an OTA where app grows to 1500 blocks (its old
    blocks moved up by 5: copy chains, a few bsdiffs, new blocks replaced) and data shrinks to 120."""
    r = random.Random(7)
    old = {"app": r.randbytes(1000 * BS), "data": r.randbytes(200 * BS)}
    app = [r.randbytes(BS) for _ in range(5)] + [old["app"][i * BS : (i + 1) * BS] for i in range(1000)]
    app += [r.randbytes(BS) for _ in range(1500 - len(app))]
    changed = set(range(7, 1000, 17))
    for i in changed:  # a few changed blocks, patched from their old selves
        app[i] = app[i][:100] + b"changed" + app[i][107:]
    data = bytearray(old["data"][: 120 * BS])
    data[50 * BS : 50 * BS + 4] = b"new!"
    new = {"app": b"".join(app), "data": bytes(data)}
    manifest = proto.DeltaArchiveManifest(block_size=BS, minor_version=8)
    blobs: list[bytes] = []
    b = PartitionBuilder(manifest, "app", old["app"], new["app"], blobs)
    for i in range(1500):
        if i in changed:
            b.bsdiff([(i, 1)], [(i - 5, 1)])
        elif 5 <= i < 1005:
            b.op(OpType.SOURCE_COPY, [(i, 1)], [(i - 5, 1)])
        else:
            b.replace([(i, 1)])
    b = PartitionBuilder(manifest, "data", old["data"], new["data"], blobs)
    b.op(OpType.SOURCE_COPY, [(0, 50)], [(0, 50)])
    b.bsdiff([(50, 1)], [(50, 1)])
    b.op(OpType.SOURCE_COPY, [(51, 69)], [(51, 69)])
    write_payload(d / "payload.bin", manifest, blobs)
    ota_zip(d / "ota.zip", d / "payload.bin")
    sb = SuperBuilder(size=super_size, slots=2)
    ga = sb.add_group("main_a", group_max)
    gb = sb.add_group("main_b", group_max)
    sb.add_partition("app_a", old["app"], group=ga)
    sb.add_partition("data_a", old["data"], group=ga)
    sb.add_partition("app_b", b"", group=gb)
    sb.add_partition("data_b", b"", group=gb)
    sb.write(d / "super.img")
    return {"super": d / "super.img", "ota": d / "ota.zip", "old": old, "new": new}


def _sectors(meta, name) -> list[tuple[int, int]]:
    return [(e.target_data, e.target_data + e.num_sectors) for e in meta.partition(name).extents]


def test_in_place_merge_grows_and_shrinks_partitions(tmp_path, capsys):
    from dmuserd.daemon.cli import main

    m = _moving_material(tmp_path)
    with open_super(m["super"]) as sup:
        old_meta = sup.metadata("a")
    assert main(_merge(m["ota"], "--source", m["super"], "--slot", "a", "--in-place",
                       "--cow-dir", tmp_path / "cows")) == 0
    out = capsys.readouterr().out
    assert f"app_b: app, {1000 * BS} -> {1500 * BS} bytes" in out and f"data_b: data, {200 * BS} -> {120 * BS}" in out
    assert sorted(os.listdir(tmp_path / "cows")) == ["app.cow", "data.cow"]  # kept: the user's directory
    for name in ("app", "data"):
        assert _read(f"{m['super']}::{name}_b") == m["new"][name]
    with open_super(m["super"]) as sup:
        meta = sup.metadata("b")
        assert sup.metadata("a").partitions == old_meta.partitions  # the source slot's metadata is untouched
        for copy in ("primary", "backup"):  # both copies of slot b hold the new layout
            assert sup._parse_metadata(1, dict((c, o) for o, c in sup.metadata_offsets(1))[copy], copy) \
                .partitions == meta.partitions
    app, data = _sectors(meta, "app_b"), _sectors(meta, "data_b")
    old_app, old_data = _sectors(old_meta, "app_a"), _sectors(old_meta, "data_a")
    assert app[0] == (old_app[0][0], app[0][1]) and app[0][1] > old_app[0][1]  # the old extent lengthened
    assert len(app) == 2 and app[1][0] % 2048 == 0  # then an aligned piece of free space
    assert data == [(old_data[0][0], old_data[0][0] + 120 * BS // 512)]
    for first, end in app:  # never in data_a's old sectors, which the merge of data still read
        assert end <= old_data[0][0] or first >= old_data[0][1]
    assert main(["ota", "verify", str(m["ota"]), "--image-dir", str(m["super"]), "--slot", "a"]) == 0
    # once done, running it again (as after a kill right at the end) finds it merged and writes nothing
    capsys.readouterr()
    before = _file_sha(m["super"])
    assert main(_merge(m["ota"], "--source", m["super"], "--slot", "a", "--in-place")) == 0
    assert capsys.readouterr().out.count("(merged already)") == 2
    assert _file_sha(m["super"]) == before and not Path(f"{m['super']}.ota-merge").exists()


@pytest.mark.parametrize("what,kwargs,needle", [
    ("group", {"group_max": 3 << 20}, "its group 'main_b' allows 3145728 bytes"),
    ("super", {"super_size": 7 << 20}, "super has"),
])
def test_no_room_to_grow_is_refused_before_anything_is_written(tmp_path, capsys, what, kwargs, needle):
    from dmuserd.daemon.cli import main

    m = _moving_material(tmp_path, **kwargs)
    before = _file_sha(m["super"])
    assert main(_merge(m["ota"], "--source", m["super"], "--slot", "a", "--in-place")) == 1
    err = desktop_vab.not_logs(capsys.readouterr().err)
    assert len(err) == 1 and needle in err[0] and "'app_b' cannot grow" in err[0], err
    assert _file_sha(m["super"]) == before
    assert not Path(f"{m['super']}.ota-merge").exists()


# --- SIGKILL at random instants -------------------------------------------------------------------------------------


@pytest.mark.parametrize("into", ["in-place", "output"])
def test_merge_killed_at_random_instants_resumes_to_the_target(tmp_path, into):
    """Forked merge processes (everything imported once, so a run is the merge's own work) SIGKILLed at random
    instants, mostly inside the merge phase, each followed by more runs until one completes; in place, and into
    a copy (``OUTPUT.partial`` until it is done, the source never written)."""
    from dmuserd.snapshot._ota_merge import STATE_NAME, merge_ota

    m = _moving_material(tmp_path)
    pristine = m["super"].read_bytes()
    output = tmp_path / "new.img" if into == "output" else None
    target = output or m["super"]
    cows = tmp_path / "cows"
    want_kills = 24 if output is None else 12  # (the copy makes a run of the second longer)
    state = cows / STATE_NAME
    errors = tmp_path / "child-error.txt"

    def one(kill_after: float | None) -> tuple[int, bool, float | None, float]:
        """A run, SIGKILLed after ``kill_after`` s: (exit status, whether the state file is there after it,
        when the state file appeared, how long the run took)."""
        had = state.exists()
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: one merge, no return into pytest
            code = 0
            try:
                merge_ota(m["ota"], source=m["super"], slot="a", output=output, cow_dir=cows, offload="cpu",
                          verify=False)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                errors.write_text(repr(exc))
                code = 3
            os._exit(code)
        seen, status = None, None
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
                break
            if seen is None and not had and state.exists():
                seen = time.monotonic() - started
            if kill_after is not None and time.monotonic() - started >= kill_after:
                os.kill(pid, signal.SIGKILL)  # still our unreaped child: the pid cannot have been reused
                status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])  # 0 if it finished first
            time.sleep(0.001)
        assert status in (0, -signal.SIGKILL), errors.read_text() if errors.exists() else status
        return status, state.exists(), seen, time.monotonic() - started

    def check() -> None:
        for name in ("app", "data"):
            assert _read(f"{target}::{name}_b") == m["new"][name], f"{name}_b is not the new build"
        if output is not None:
            assert m["super"].read_bytes() == pristine and not Path(f"{output}.partial").exists()

    def fresh() -> None:
        m["super"].write_bytes(pristine)
        for path in [*(cows.iterdir() if cows.exists() else ()), *tmp_path.glob("new.img*")]:
            path.unlink()

    code, _, merge_starts, full = one(None)  # a whole run: how long one takes, and when its merge phase starts
    assert code == 0 and merge_starts is not None
    check()
    fresh()
    rng = random.Random(11)
    kills = in_merge = completed = 0
    resume = full - merge_starts  # how long a resumed run takes at most (refined by the runs)
    for _ in range(400):  # (ends as soon as enough kills landed: the cap only matters on a loaded machine)
        # (the last fifth of a run is mostly the final hash check: few kills are drawn there)
        if state.exists():  # a resume: anywhere in it
            kill_after = rng.uniform(0, 0.8 * resume)
        else:  # a fresh run: mostly in its merge phase (the COW files are made by `ota apply`'s resumable code)
            kill_after = rng.uniform(merge_starts * (0.3 if rng.random() < 0.2 else 0.9),
                                     merge_starts + 0.8 * (full - merge_starts))
        resuming = state.exists()
        code, merging, _, took = one(kill_after)
        if code == 0:
            if resuming:
                resume = min(resume, took)
            check()
            completed += 1
            fresh()
            continue
        kills += 1
        in_merge += merging
        if kills >= want_kills and in_merge >= want_kills // 2:
            break
    assert one(None)[0] == 0
    check()
    print({"kills": kills, "killed_while_merging": in_merge, "completed": completed, "one_run_s": round(full, 2)})
    assert kills >= want_kills * 2 // 3 and in_merge >= want_kills // 3, (kills, in_merge)


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_writes_nothing(material, tmp_path, capsys):
    from dmuserd.daemon.cli import main

    new = tmp_path / "new.img"

    def refused(argv, *needles) -> None:
        desktop_vab.one_line_error(capsys, argv, *needles)
        assert not new.exists() and not Path(f"{new}.partial").exists() and not Path(f"{new}.ota-merge").exists()

    ota, sup = material["ota"], material["super"]
    refused(_merge(ota, "--source", sup, "--slot", "c", "--output", new), "super.img has no slot c")
    refused(_merge(ota, "--source", sup, "--slot", "x1", "--output", new), "not a slot name")
    # a partition missing from super: the line lists what the slot has
    b = SuperBuilder(size=16 << 20)
    b.add_partition("system_a", material["old"]["system"])
    b.add_partition("system_b")
    b.write(tmp_path / "small.img")
    refused(_merge(ota, "--source", tmp_path / "small.img", "--slot", "a", "--output", new),
            "no partition 'vendor_a' in slot a", "system_a, system_b", "--partitions")
    # a corrupt LP header: both copies of slot a's metadata
    image = bytearray(sup.read_bytes())
    for backup in (False, True):
        image[metadata_offset(SuperBuilder(size=len(image)), 0, backup) + 20] ^= 0xFF
    (tmp_path / "bad.img").write_bytes(image)
    refused(_merge(ota, "--source", tmp_path / "bad.img", "--slot", "a", "--output", new),
            str(tmp_path / "bad.img"), f"offset {metadata_offset(b, 0) + 12}", "rule header-checksum")
    # a corrupt geometry: both copies
    image = bytearray(sup.read_bytes())
    image[4096 + 8] ^= 1
    image[8192 + 8] ^= 1
    (tmp_path / "badgeo.img").write_bytes(image)
    refused(_merge(ota, "--source", tmp_path / "badgeo.img", "--slot", "a", "--output", new),
            "offset 4104", "rule geometry-checksum")
    # a sparse super cannot be written in place
    before = _file_sha(material["super_sparse"])
    refused(_merge(ota, "--source", material["super_sparse"], "--slot", "a", "--in-place"),
            "is an Android sparse image", "--output")
    assert _file_sha(material["super_sparse"]) == before
    # a truncated OTA zip
    data = ota.read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) - 100])
    refused(_merge(tmp_path / "cut.zip", "--source", sup, "--slot", "a", "--output", new), str(tmp_path / "cut.zip"))
    # the output exists already
    new.write_bytes(b"mine")
    capsys.readouterr()
    assert main(_merge(ota, "--source", sup, "--slot", "a", "--output", new)) == 1
    assert "exists" in desktop_vab.not_logs(capsys.readouterr().err)[0] and new.read_bytes() == b"mine"
