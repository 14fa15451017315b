"""The poller never watches a record that can be freed under it.

With WAITPKG the poller UMONITORs/UMWAITs on the newest in-flight record
without holding the queue's lock. Before, a descriptor was put on the
in-flight list before the portal write; when a shared queue refused it, the
submitting thread took it back and freed it (record included) while the
poller could be watching it: a read of freed memory. Now an operation joins
the list only once the device took it.

This machine may lack WAITPKG, so the queue's ``soft_watch`` knob makes the
poller watch by reading, as UMWAIT does; valgrind reports the invalid read.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import time
    from dmuserd.dsa_offload import _dsa
    # A shared queue of one: the first descriptor stays in flight (slow device);
    # the second is refused, 64 attempts of 3 ms each, while the poller watches.
    emu = _dsa.Emulator(mode="shared", size=1, delay_us=600_000, refuse_delay_us=3000)
    queue = _dsa.Queue(emulator=emu, size=2, soft_watch=True)
    first = queue.submit(4, dst=bytearray(4096), size=4096, pattern=1)
    time.sleep(0.05)
    second = queue.submit(4, dst=bytearray(4096), size=4096, pattern=2)
    assert first is not None and second is None
    queue.close()
    print("done")
""")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_a_refused_descriptor_is_never_watched_by_the_poller(ext, tmp_path):
    script = tmp_path / "refused.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(["valgrind", "--error-exitcode=0", sys.executable, str(script)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONMALLOC": "malloc"})
    assert "done" in proc.stdout, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    bad = [lines[i : i + 4] for i, line in enumerate(lines) if "Invalid read" in line
           and any("_dsa.c" in nxt or "poller_main" in nxt or "backoff" in nxt for nxt in lines[i + 1 : i + 4])]
    assert not bad, "\n".join("\n".join(b) for b in bad)
