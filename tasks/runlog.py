"""What a run leaves for people: Prefect artifacts, the run record and one record per step.

Each step writes its own small record (`RunLayout.step_record`), so steps that run in parallel on
several workers never read-modify-write one shared file. The run record (`run.json`) is written
once per attempt by the flow that starts the run.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel

from avr_core.layout import RunLayout, StepRef
from avr_core.lease import RunLease, RunLeaseLostError
from avr_core.reporting import markdown_table, render_step_markdown
from avr_core.results import StepResult, TrainResult
from avr_core.storage import DatasetStore
from tasks.engines import open_store, settings

__all__ = [
    "artifact_key",
    "check_run_lease",
    "code_version",
    "hold_run",
    "publish_step_report",
    "publish_training_report",
    "record_run_start",
    "record_step",
    "start_run_task",
]


def artifact_key(run: str, name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{run}-{name}".lower()).strip("-")


def publish_step_report(run: str, result: StepResult) -> None:
    """A markdown artifact with the step's table (visible in the Prefect UI)."""
    create_markdown_artifact(
        markdown=render_step_markdown(result),
        key=artifact_key(run, f"{result.stage}-{result.step}"),
        description=f"{result.name} of run {run}",
    )


def publish_training_report(run: str, result: TrainResult, seconds: float) -> None:
    """A markdown artifact naming the trained model and what it was trained on."""
    rows = [
        ("kind", result.kind),
        ("base model", result.base_model),
        ("dataset", result.dataset_uri),
        ("rows", str(result.rows)),
        ("optimizer steps", "-" if result.global_step is None else str(result.global_step)),
        ("tokens trained on", "-" if result.tokens_seen is None else str(result.tokens_seen)),
        ("final model", result.final_uri),
        ("seconds", f"{seconds:.1f}"),
    ]
    create_markdown_artifact(
        markdown=f"### {result.train_step}\n\n" + markdown_table(rows, ("", "")),
        key=artifact_key(run, result.train_step),
        description=f"training step {result.train_step} of run {run}",
    )


def code_version() -> dict[str, str | None]:
    """Git commit of the source tree (a checkout, or AVR_GIT_COMMIT baked into the image)."""
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            or None
        )
    # The Docker image has no .git: its build bakes the commit into the environment.
    commit = commit or settings().git_commit
    try:
        version: str | None = metadata.version("avr-factory")
    except metadata.PackageNotFoundError:
        version = None
    return {"git_commit": commit, "package_version": version}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def record_run_start(store: DatasetStore, run: str, flow: str, config: BaseModel) -> None:
    """Write run.json at the start of an attempt: config, code version, earlier attempts."""
    layout = RunLayout(run)
    previous = store.read_json(layout.run_record) or {}
    now = _now()
    store.write_json(
        layout.run_record,
        {
            "run": run,
            "flow": flow,
            "config": config.model_dump(mode="json"),
            "code_version": code_version(),
            "started_at": now,
            "attempts": [*previous.get("attempts", []), {"flow": flow, "started_at": now}],
        },
    )


@task(name="start-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def start_run_task(storage_root: str, run: str, flow_name: str, config: BaseModel) -> str:
    """Check the store is writable and record the run's config and code version; returns the
    run record's URI."""
    store = open_store(storage_root)
    store.check_reachable()
    record_run_start(store, run, flow_name, config)
    return store.uri(RunLayout(run).run_record)


# Leases this process holds, by (storage root, run): steps check theirs between shards.
_HELD: dict[tuple[str, str], RunLease] = {}


def check_run_lease(storage_root: str, run: str) -> None:
    """Raise `RunLeaseLostError` if this process held the run's lease and lost it.

    A holder presumed dead (no heartbeat for the stale time) whose lease another run took over
    must stop writing at the next shard instead of interleaving with the new holder.
    """
    lease = _HELD.get((storage_root, run))
    if lease is not None and lease.lost:
        raise RunLeaseLostError(lease.lost)


@contextlib.contextmanager
def hold_run(storage_root: str, run: str, flow_name: str) -> Iterator[RunLease]:
    """Hold the run's lease (one writer per run) for the body of a flow.

    A second flow writing the same run name fails here, before it writes anything, naming the
    holder; the lease is renewed in the background and released when the body ends.
    """
    config = settings()
    store = open_store(storage_root, config)
    lease = RunLease(
        store.files,
        run,
        flow_name,
        flow_run_id=flow_run.get_id(),
        stale_after_s=config.lease_stale_seconds,
        heartbeat_s=config.lease_heartbeat_seconds,
    )
    key = (store.root, run)
    with lease:
        _HELD[key] = lease
        try:
            yield lease
        finally:
            _HELD.pop(key, None)


def record_step(
    store: DatasetStore, run: str, ref: StepRef, seconds: float, summary: BaseModel
) -> None:
    """Write one finished step's record: its summary, wall time and finish time."""
    record: dict[str, Any] = {
        **summary.model_dump(mode="json"),
        "wall_seconds": round(seconds, 3),
        "finished_at": _now(),
    }
    store.write_json(RunLayout(run).step_record(ref), record)
