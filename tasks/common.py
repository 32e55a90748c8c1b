"""What every task shares: the store, engines, the map-over-shards loop, reports and run.json.

The shard loop is the factory's checkpointing contract (DESIGN section 2): a step's output shard i
is computed from its input shard i, committed as soon as it is done, and never recomputed while a
shard with the same config fingerprint exists. An error in one shard fails only that shard; the
task finishes the others and then raises, listing the failed ones, so a retry or a re-run computes
only what is missing. The manifest is written last.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, TypeVar

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from avr_core.config import ExecutionConfig, ModelSpec
from avr_core.engines.base import Generator, RewardModel
from avr_core.reporting import ShardStats, gain_summary, merge_stats, render_step_markdown
from avr_core.schemas import ArrowRecord
from avr_core.storage import DatasetStore, Manifest

__all__ = [
    "STORAGE_OPTIONS_ENV",
    "ShardsFailedError",
    "StepRef",
    "StepResult",
    "UpstreamMissingError",
    "code_version",
    "map_shards",
    "open_generator",
    "open_reward_model",
    "open_store",
    "publish_step_report",
    "record_run_start",
    "record_step",
    "require_manifest",
    "storage_options_from_env",
]

STORAGE_OPTIONS_ENV = "AVR_STORAGE_OPTIONS"

StepRef = tuple[str, str]  # (stage, step) under runs/{run}/
In = TypeVar("In", bound=ArrowRecord)
Engine = TypeVar("Engine")


class ShardsFailedError(RuntimeError):
    """Some shards of a step failed; the others are committed and will not be recomputed."""


class UpstreamMissingError(RuntimeError):
    """A step's input has no manifest: the step that writes it has not finished."""


# ---- storage and engines -------------------------------------------------------------------


def storage_options_from_env() -> dict[str, Any]:
    """fsspec storage options (endpoint, credentials) from $AVR_STORAGE_OPTIONS as JSON."""
    raw = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"${STORAGE_OPTIONS_ENV} is not valid JSON: {err}") from err
    if not isinstance(options, dict):
        raise ValueError(
            f"${STORAGE_OPTIONS_ENV} must be a JSON object, got {type(options).__name__}"
        )
    return options


def open_store(root: str) -> DatasetStore:
    """The dataset store at `root`, with storage options from the environment."""
    return DatasetStore(root, storage_options_from_env())


def _local_spec(spec: ModelSpec) -> ModelSpec:
    """`spec` with a remote saved model (s3://...) fetched to the local cache first.

    Engines resolve paths without storage credentials; a trained checkpoint in object storage is
    downloaded here, where the options from the environment are known.
    """
    if (
        "://" not in spec.path
        or spec.path.startswith("file://")
        or spec.backend in ("openai", "rules")
    ):
        return spec
    from avr_core.models import resolve_model_dir

    local = resolve_model_dir(spec.path, storage_options_from_env() or None)
    return spec.model_copy(update={"path": str(local)})


def open_generator(spec: ModelSpec, execution: ExecutionConfig) -> Generator:
    """Load the policy named by `spec` (remote checkpoints fetched first)."""
    from avr_core.engines import load_generator

    return load_generator(_local_spec(spec), execution)


def open_reward_model(spec: ModelSpec, execution: ExecutionConfig) -> RewardModel:
    """Load the reward model named by `spec` (remote checkpoints fetched first)."""
    from avr_core.engines import load_reward_model

    return load_reward_model(_local_spec(spec), execution)


GPU_CONCURRENCY_LIMIT = "gpu"


def engine_uses_gpu(spec: ModelSpec | None, execution: ExecutionConfig) -> bool:
    """Whether an engine (or, with spec None, a training child) would run on a local GPU."""
    if spec is not None and spec.backend in ("rules", "openai"):
        return False  # scored by rules or served elsewhere: nothing on this worker's GPU
    if execution.device != "auto":
        return execution.device == "cuda"
    from avr_core.training import visible_cuda_devices  # counts GPUs without initialising CUDA

    return visible_cuda_devices() > 0


@contextlib.contextmanager
def gpu_slot(spec: ModelSpec | None, execution: ExecutionConfig) -> Iterator[None]:
    """Hold a slot of the global `gpu` concurrency limit while an engine or trainer is on a GPU.

    Two engines must never share one GPU: operators create the limit once
    (`prefect gcl create gpu --limit N`, N = GPUs). Without that limit (embedded runs) the slot
    is not enforced (strict=False), and CPU-only work never asks for one.
    """
    if not engine_uses_gpu(spec, execution):
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_CONCURRENCY_LIMIT, occupy=1, strict=False):
        yield


@dataclass
class LazyEngine(Generic[Engine]):
    """Loads an engine on first use (never when every shard is already done) and closes it."""

    load: Callable[[], Engine]
    engine: Engine | None = None
    load_seconds: float = 0.0

    def get(self) -> Engine:
        if self.engine is None:
            started = time.perf_counter()
            self.engine = self.load()
            self.load_seconds = time.perf_counter() - started
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


# ---- the shard loop ------------------------------------------------------------------------


class StepResult(BaseModel):
    """Small summary a task returns: where its output is and what it holds (never the data)."""

    stage: str
    step: str
    uri: str
    fingerprint: str
    rows: int
    shards: int
    shards_computed: int
    shards_skipped: int
    counts: dict[str, int] = Field(default_factory=dict)
    gain_mean: float | None = None
    gain_median: float | None = None
    seconds: dict[str, float] = Field(default_factory=dict)


def require_manifest(store: DatasetStore, run: str, ref: StepRef) -> Manifest:
    """The manifest of an input step, or a clear error saying which step to run first."""
    manifest = store.read_manifest(run, *ref)
    if manifest is None:
        raise UpstreamMissingError(
            f"{store.step_uri(run, *ref)} has no manifest: run the step that writes "
            f"{ref[0]}/{ref[1]} for run {run!r} first"
        )
    return manifest


def _stats_path(run: str, ref: StepRef, index: int) -> str:
    # Beside, not inside, the step directory: the step directory holds only shards + manifest.
    return f"runs/{run}/_stats/{ref[0]}/{ref[1]}/part-{index:05d}.json"


def read_shard_stats(
    store: DatasetStore, run: str, ref: StepRef, index: int, fingerprint: str
) -> ShardStats | None:
    """Stats stored for shard `index` when they belong to `fingerprint`."""
    stored = store.read_json(_stats_path(run, ref, index))
    if not stored or stored.get("fingerprint") != fingerprint:
        return None
    return ShardStats.model_validate(stored["stats"])


@dataclass
class ShardOutput:
    """What a shard computation returns: records to commit and their stats."""

    records: list[ArrowRecord]
    stats: ShardStats = field(default_factory=ShardStats)


def map_shards(
    store: DatasetStore,
    run: str,
    source: StepRef,
    source_type: type[In],
    target: StepRef,
    target_type: type[ArrowRecord],
    fingerprint: str,
    compute: Callable[[int, list[In]], ShardOutput],
) -> StepResult:
    """Compute every missing shard of `target` from the same shard of `source`, then seal it."""
    logger = get_run_logger()
    manifest = require_manifest(store, run, source)
    indices = [shard.index for shard in manifest.shards]
    done = store.completed_shards(run, *target, fingerprint)
    todo = [i for i in indices if i not in done]
    logger.info(
        "%s/%s: %d shards, %d already done with fingerprint %s, %d to compute",
        *target,
        len(indices),
        len(indices) - len(todo),
        fingerprint,
        len(todo),
    )
    failed: dict[int, str] = {}
    # A shard bar when a person watches a terminal (`avr demo`, `avr run`); workers just log.
    progress = tqdm(
        total=len(todo), desc="/".join(target), unit="shard", disable=not sys.stderr.isatty()
    )
    for position, index in enumerate(todo, start=1):
        records = store.read_shard_records(run, *source, index, source_type)
        started = time.perf_counter()
        try:
            output = compute(index, records)
        except Exception as err:  # noqa: BLE001 - one bad shard must not cost the finished ones
            failed[index] = f"{type(err).__name__}: {err}"
            logger.error("%s/%s shard %d failed: %s", *target, index, failed[index])
            progress.update(1)
            continue
        computed = time.perf_counter() - started
        output.stats.seconds["compute"] = output.stats.seconds.get("compute", 0.0) + computed
        write_started = time.perf_counter()
        # Stats first: a committed shard always has its stats; stale stats are keyed out.
        store.write_json(
            _stats_path(run, target, index),
            {"fingerprint": fingerprint, "stats": output.stats.model_dump(mode="json")},
        )
        store.write_shard(run, *target, index, output.records, target_type, fingerprint)
        logger.info(
            "%s/%s shard %d (%d/%d): %d rows in %.1fs (+%.2fs storage)",
            *target,
            index,
            position,
            len(todo),
            len(output.records),
            computed,
            time.perf_counter() - write_started,
        )
        progress.update(1)
    progress.close()
    if failed:
        listing = "; ".join(f"shard {i}: {why}" for i, why in sorted(failed.items()))
        raise ShardsFailedError(
            f"{store.step_uri(run, *target)}: {len(failed)} of {len(indices)} shards failed "
            f"(the others are committed; re-run to compute only these): {listing}"
        )
    sealed = store.write_manifest(
        run, *target, target_type, fingerprint, expected_shards=max(indices, default=-1) + 1
    )
    stats = merge_stats(
        s
        for s in (read_shard_stats(store, run, target, i, fingerprint) for i in indices)
        if s is not None
    )
    return step_result(
        store, run, target, sealed, stats, computed=len(todo), skipped=len(indices) - len(todo)
    )


def step_result(
    store: DatasetStore,
    run: str,
    ref: StepRef,
    manifest: Manifest,
    stats: ShardStats,
    computed: int,
    skipped: int,
) -> StepResult:
    """The summary of a sealed step."""
    gain_mean, gain_median = gain_summary(stats.gains)
    return StepResult(
        stage=ref[0],
        step=ref[1],
        uri=store.step_uri(run, *ref),
        fingerprint=manifest.fingerprint,
        rows=manifest.total_rows,
        shards=len(manifest.shards),
        shards_computed=computed,
        shards_skipped=skipped,
        counts=stats.counts,
        gain_mean=gain_mean,
        gain_median=gain_median,
        seconds={k: round(v, 3) for k, v in stats.seconds.items()},
    )


# ---- reports and run.json ------------------------------------------------------------------


def _artifact_key(run: str, name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{run}-{name}".lower()).strip("-")


def publish_step_report(run: str, result: StepResult) -> None:
    """A markdown artifact with the step's table (visible in the Prefect UI)."""
    markdown = render_step_markdown(
        f"{result.stage}/{result.step}",
        result.uri,
        result.counts,
        result.gain_mean,
        result.gain_median,
        result.shards_computed,
        result.shards_skipped,
        result.seconds,
    )
    create_markdown_artifact(
        markdown=markdown,
        key=_artifact_key(run, f"{result.stage}-{result.step}"),
        description=f"{result.stage}/{result.step} of run {run}",
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
    commit = commit or os.environ.get("AVR_GIT_COMMIT") or None
    try:
        version = metadata.version("avr-factory")
    except metadata.PackageNotFoundError:
        version = None
    return {"git_commit": commit, "package_version": version}


def _run_json_path(run: str) -> str:
    return f"runs/{run}/run.json"


def record_run_start(store: DatasetStore, run: str, flow: str, config: BaseModel) -> None:
    """Write run.json at the start: config, code version; keeps timings of earlier attempts."""
    previous = store.read_json(_run_json_path(run)) or {}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    store.write_json(
        _run_json_path(run),
        {
            "run": run,
            "flow": flow,
            "config": config.model_dump(mode="json"),
            "code_version": code_version(),
            "started_at": now,
            "attempts": [*previous.get("attempts", []), {"flow": flow, "started_at": now}],
            "steps": previous.get("steps", {}),
        },
    )


def record_step(
    store: DatasetStore, run: str, name: str, seconds: float, summary: dict[str, Any]
) -> None:
    """Add one finished step's wall time and summary to run.json."""
    current = store.read_json(_run_json_path(run)) or {"run": run, "steps": {}}
    current.setdefault("steps", {})[name] = {
        **summary,
        "wall_seconds": round(seconds, 3),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    store.write_json(_run_json_path(run), current)


@contextlib.contextmanager
def timed() -> Iterator[Callable[[], float]]:
    """Context yielding a function that returns the seconds elapsed since entry."""
    started = time.perf_counter()
    yield lambda: time.perf_counter() - started
