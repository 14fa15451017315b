"""Run mover code in a fresh Python that cannot load the C extension."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_PRELUDE = textwrap.dedent("""
    import json, sys, trio
    sys.modules["dmuserd.dsa_offload._dsa"] = None  # as if it had never been built
    from dmuserd.dsa_offload import auto_choice, open_mover
    from dmuserd.dsa_offload.commands import gather
""")


def run_without_extension(main: str) -> dict:
    """Run ``async def main()`` (given as source) there; return what it returned (JSON).

    ``main`` may use ``json``, ``trio``, ``open_mover``, ``auto_choice`` and
    ``gather`` (what ``dmuserd dsa info`` prints).
    """
    script = _PRELUDE + textwrap.dedent(main) + "\nprint(json.dumps(trio.run(main)))\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DMUSERD_LOG_LEVEL": "error"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
