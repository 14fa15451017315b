"""SIGTERM with I/O in flight: acknowledged writes are on disk, nothing is left."""

from __future__ import annotations

import os
import subprocess
import threading

from daemon_harness import need_root_tools, wait_until

BLOCK = 64 * 1024


def test_sigterm_with_io_in_flight(serve, tmp_path):
    need_root_tools("losetup")
    image = tmp_path / "backing.img"
    daemon = serve(f"file:path={image},size=256M,create=1")
    loop = daemon.attach_loop(direct_io=True)
    # A writer that prints each block's index after the block is durable
    # (O_DIRECT|O_DSYNC: acknowledged means on the device).
    writer = subprocess.Popen(
        [
            "python3", "-c",
            "import os,sys\n"
            f"fd=os.open({loop!r}, os.O_WRONLY|os.O_DIRECT|os.O_DSYNC)\n"
            "import mmap\n"
            f"buf=mmap.mmap(-1,{BLOCK})\n"
            "i=0\n"
            "while True:\n"
            f"    buf[:8]=i.to_bytes(8,'little')*1; buf[8:{BLOCK}]=bytes([i%251])*({BLOCK}-8)\n"
            f"    os.pwrite(fd, buf, i*{BLOCK})\n"
            "    print(i, flush=True); i+=1\n"
            f"    if i*{BLOCK} >= 256*1024*1024: i=0\n",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    acknowledged: list[int] = []

    def collect() -> None:
        for line in writer.stdout:
            acknowledged.append(int(line))

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    # The stop comes once blocks are acknowledged (not after a guessed time: the writer may start slowly).
    wait_until(lambda: len(acknowledged) > 5 or writer.poll() is not None, "the writer's first blocks", 60)
    assert writer.poll() is None, writer.stderr.read()
    rc = daemon.terminate(timeout=30)
    writer.wait(30)
    collector.join(30)
    assert rc == 0, daemon.log_text()
    assert len(acknowledged) > 5
    with open(image, "rb") as f:
        for i in acknowledged[-50:]:
            f.seek(i * BLOCK)
            block = f.read(BLOCK)
            assert block[:8] == i.to_bytes(8, "little"), f"acknowledged block {i} missing from the backing file"
            assert block[8:] == bytes([i % 251]) * (BLOCK - 8)
    # The daemon took its mount and the loop device on its file with it.
    assert not os.path.ismount(daemon.fuse_dir)
    backing = subprocess.run(["losetup", "-n", "-O", "BACK-FILE", loop], capture_output=True, text=True).stdout
    assert str(daemon.path) not in backing
