"""Prefect fixtures: one throwaway Prefect API (SQLite) per test session, state in a temp dir.

The environment is set when this module is imported (conftest registers it as a plugin, before
any test imports prefect) so that Prefect's settings and the server subprocess it spawns both see
a private PREFECT_HOME and no telemetry (which hit "database is locked" errors on SQLite).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="avr-prefect-home-"))
os.environ["PREFECT_HOME"] = str(_PREFECT_HOME)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
# Tests must not depend on (or write to) the developer's own Prefect profile or server.
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_PROFILE", None)


# The PostgreSQL the multi-worker tests give their Prefect server: user@host:port, trust auth,
# with a database `test` to connect to. The machine's own by default; another with AVR_TEST_POSTGRES.
POSTGRES = os.environ.get("AVR_TEST_POSTGRES", "postgres@127.0.0.1:5432")


async def run_postgres(sql: str, database: str = "test") -> Any:
    """Run one statement on the machine's PostgreSQL; the first value of its first row, if any."""
    import asyncpg

    connection = await asyncpg.connect(f"postgresql://{POSTGRES}/{database}", timeout=5)
    try:
        return await connection.fetchval(sql)
    finally:
        await connection.close()


@pytest.fixture(scope="module")
def postgres_database_url() -> Iterator[str | None]:
    """A fresh PostgreSQL database for a Prefect server (dropped afterwards), as a production
    server keeps its state; None where no PostgreSQL answers (the server then uses SQLite)."""
    import asyncpg

    name = f"avr_prefect_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(run_postgres(f'CREATE DATABASE "{name}"'))
    except (OSError, TimeoutError, asyncpg.PostgresError) as err:
        # Said, not silent: these tests then check the server on SQLite only.
        warnings.warn(
            f"PostgreSQL at {POSTGRES} not usable ({type(err).__name__}: {err}); the Prefect "
            "server of these tests keeps its state in SQLite",
            stacklevel=1,
        )
        yield None
        return
    try:
        yield f"postgresql+asyncpg://{POSTGRES}/{name}"
    finally:
        asyncio.run(run_postgres(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[Path]:
    """A temporary Prefect API for the whole session; yields its PREFECT_HOME."""
    from prefect.testing.utilities import prefect_test_harness

    # The first start creates the SQLite schema: slower than later runs on a busy 2-core box.
    with prefect_test_harness(server_startup_timeout=120):
        yield _PREFECT_HOME
