"""Real crashes for resume tests: run a flow in a child process, SIGKILL its whole process group
once a given shard file exists, and fingerprint shard files to prove they were not rewritten."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

__all__ = ["file_states", "flow_run_processes", "kill_once_committed"]

PROJECT_DIR = Path(__file__).resolve().parents[1]


def file_states(directory: Path) -> dict[str, tuple[int, str]]:
    """mtime (ns) and sha256 of every shard file in a step directory."""
    return {
        path.name: (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(directory.glob("part-*.parquet"))
    }


def flow_run_processes(flow_run_id: str) -> list[int]:
    """Pids of the processes that run a Prefect flow run on this machine: a process worker starts
    each flow run with PREFECT__FLOW_RUN_ID in its environment (the worker itself has none)."""
    needle = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if needle in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
    return pids


def kill_once_committed(
    script: str, argument: str, shard_file: Path, api_url: str, deadline_s: float = 480
) -> None:
    """Run `python -c script argument` against the Prefect API at `api_url`; SIGKILL its process
    group as soon as `shard_file` exists (a crash: no cleanup, no finally blocks run)."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, argument],
        env={**os.environ, "PREFECT_API_URL": api_url},
        cwd=PROJECT_DIR,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + deadline_s
    try:
        while not shard_file.exists():
            if child.poll() is not None:
                stderr = child.stderr.read().decode() if child.stderr else ""
                pytest.fail(f"child exited early: {stderr[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{shard_file.name} was not committed within {deadline_s:.0f} s")
            time.sleep(0.05)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
