"""Training tasks: SFT or DPO on a stored dataset, always in a separate process.

The task process may hold (or just have held) a generation engine; TRL runs in a child launched by
`avr_core.training.run_training_subprocess`, which syncs checkpoints to storage and resumes from
them, so a retried or re-run task continues where the killed one stopped.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import fsspec
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from avr_core.config import ExecutionConfig, TrainingConfig
from avr_core.models import cache_dir
from avr_core.reporting import markdown_table
from avr_core.training import COMPLETE_MARKER, FINAL_DIR_NAME, TrainJob, run_training_subprocess
from tasks.common import (
    StepRef,
    gpu_slot,
    open_store,
    record_step,
    require_manifest,
    storage_options_from_env,
    timed,
)

__all__ = ["TrainResult", "model_revision", "train_model_task"]


class TrainResult(BaseModel):
    """Where a training step put its model, and what it was trained on."""

    train_step: str
    kind: Literal["sft", "dpo"]
    base_model: str
    dataset_uri: str
    rows: int
    checkpoint_uri: str
    final_uri: str
    revision: str | None


def model_revision(path: str) -> str | None:
    """Identity of a trained model's contents: the training fingerprint in its completion marker.

    A model trained by this factory lives at `{checkpoint_uri}/final` beside `_complete.json`;
    the same URI can hold different weights across runs, so fingerprints of the data generated
    with it must include this. Other models (bundled names, user directories) return None.
    """
    if not path.rstrip("/").endswith("/" + FINAL_DIR_NAME):
        return None
    marker = path.rstrip("/").rsplit("/", 1)[0] + "/" + COMPLETE_MARKER
    try:
        with fsspec.open(marker, "r", **storage_options_from_env()) as handle:
            done = json.load(handle)
    except FileNotFoundError:
        return None
    return str(done.get("fingerprint")) if done.get("fingerprint") else None


def _work_dir(storage_root: str, run: str, train_step: str) -> str:
    """Local scratch for the trainer, stable per (root, run, step) so a retry reuses it."""
    key = hashlib.sha256(storage_root.encode()).hexdigest()[:12]
    return str(cache_dir() / "train-work" / key / run / train_step)


@task(name="train-model", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
def train_model_task(
    storage_root: str,
    run: str,
    kind: Literal["sft", "dpo"],
    base_model: str,
    dataset: StepRef,
    train_step: str,
    training: TrainingConfig,
) -> TrainResult:
    """Train `base_model` on the dataset step in a child process; returns the final model URI."""
    logger = get_run_logger()
    store = open_store(storage_root)
    manifest = require_manifest(store, run, dataset)
    dataset_uri = store.step_uri(run, *dataset)
    if manifest.total_rows == 0:
        raise ValueError(
            f"{dataset_uri} has no rows to train on: no tree passed the selection rules "
            "(try more prompts, larger x/y, or selection.rsft_include_original)"
        )
    job = TrainJob(
        kind=kind,
        base_model=base_model,
        store_root=store.root,
        storage_options=storage_options_from_env(),
        run=run,
        dataset_stage=dataset[0],
        dataset_step=dataset[1],
        train_step=train_step,
        training=training,
        work_dir=_work_dir(store.root, run, train_step),
    )
    logger.info(
        "training %s (%s) on %d rows of %s", train_step, kind, manifest.total_rows, dataset_uri
    )
    # Training runs after the engine of the step before was closed; it takes the GPU slot too.
    with timed() as elapsed, gpu_slot(None, ExecutionConfig()):
        final_uri = run_training_subprocess(job)
    result = TrainResult(
        train_step=train_step,
        kind=kind,
        base_model=base_model,
        dataset_uri=dataset_uri,
        rows=manifest.total_rows,
        checkpoint_uri=store.checkpoint_uri(run, train_step),
        final_uri=final_uri,
        revision=model_revision(final_uri),
    )
    logger.info("%s done in %.0fs: %s", train_step, elapsed(), final_uri)
    rows = [
        ("kind", kind),
        ("base model", base_model),
        ("dataset", dataset_uri),
        ("rows", str(manifest.total_rows)),
        ("final model", final_uri),
        ("seconds", f"{elapsed():.1f}"),
    ]
    create_markdown_artifact(
        markdown=f"### {train_step}\n\n" + markdown_table(rows, ("", "")),
        key=f"{run}-{train_step}".lower().replace("_", "-").replace(".", "-"),
        description=f"training step {train_step} of run {run}",
    )
    record_step(store, run, f"checkpoints/{train_step}", elapsed(), result.model_dump(mode="json"))
    return result
