"""Fixtures of tests/backends: the local Ceph cluster (ceph_harness) and the daemon harnesses of tests/daemon."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from ceph_harness import ceph_cluster  # noqa: E402,F401
