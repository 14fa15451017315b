"""Fixtures of tests/backends: the local Ceph cluster (ceph_harness) and the daemon harnesses of tests/daemon."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

import pytest  # noqa: E402

from ceph_harness import ceph_cluster, is_last_user, stop_after_last_user, stop_clusters  # noqa: E402,F401
from nbd_harness import nbd_session  # noqa: E402,F401 (a fixture of test_rbd_served)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    stop_after_last_user(items)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    # After the test's own fixtures are torn down: the cluster goes with its last user.
    if is_last_user(item):
        stop_clusters()
