"""Fixtures that run the real daemon (``dmuserd serve``) and real block tools."""

from __future__ import annotations

import pytest

from daemon_harness import ServedDaemon, need_root_tools
from nbd_harness import nbd_session  # noqa: F401 - the NBD tests' fixture, found here by pytest


@pytest.fixture
def serve(tmp_path):
    """``serve(backend_spec)`` starts a daemon; everything is torn down after."""
    started: list[ServedDaemon] = []

    def start(backend: str, name: str = "disk", export_options: str = "") -> ServedDaemon:
        need_root_tools("losetup")
        daemon = ServedDaemon(tmp_path, backend, name, export_options)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.cleanup()
