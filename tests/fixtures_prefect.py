"""Prefect fixtures: one throwaway Prefect API (SQLite) per test session, state in a temp dir.

The environment is set when this module is imported (conftest registers it as a plugin, before
any test imports prefect) so that Prefect's settings and the server subprocess it spawns both see
a private PREFECT_HOME and no telemetry (which hit "database is locked" errors on SQLite).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="avr-prefect-home-"))
os.environ["PREFECT_HOME"] = str(_PREFECT_HOME)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
# Tests must not depend on (or write to) the developer's own Prefect profile or server.
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_PROFILE", None)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[Path]:
    """A temporary Prefect API for the whole session; yields its PREFECT_HOME."""
    from prefect.testing.utilities import prefect_test_harness

    # The first start creates the SQLite schema: slower than later runs on a busy 2-core box.
    with prefect_test_harness(server_startup_timeout=120):
        yield _PREFECT_HOME
