"""Logging left as the tests found it: some run ``dmuserd`` in process, which points structlog at the
test's captured output (closed once the test ends)."""

from __future__ import annotations

import pytest
import structlog


@pytest.fixture(autouse=True)
def _plain_logging():
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
