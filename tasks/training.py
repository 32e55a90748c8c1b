"""Training task: SFT or DPO on a stored dataset, always in a separate process.

The task process may hold (or just have held) a generation engine; TRL runs in a child launched by
`avr_core.training.run_training_subprocess`, which syncs checkpoints to storage and resumes from
them, so a retried or re-run task continues where the killed one stopped.
"""

from __future__ import annotations

import time
from typing import Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from avr_core.checkpoints import model_revision
from avr_core.config import ExecutionConfig, TrainingConfig
from avr_core.devices import visible_cuda_devices
from avr_core.layout import RunLayout
from avr_core.results import TrainResult
from avr_core.steps import StepIO, require_manifest
from avr_core.training import TrainJob, run_training_subprocess, trained_counts
from tasks.engines import gpu_slot, open_store, quiet_progress_bars_off_terminal, settings
from tasks.runlog import publish_training_report, record_step

__all__ = ["train_model_task"]

# What to change when a selection step kept nothing, by dataset step name.
_EMPTY_DATASET_HINTS = {
    "rsft": "more prompts, a larger tree.x/y, or selection.rsft_include_original",
    "pairs": "more prompts or a larger tree.x/y (a pair needs a refinement that beats the answer)",
    "trajectories": "more prompts or more search.max_rounds (a trajectory needs an improving "
    "round, then a closing round that does not improve)",
    "lc_pairs": "more prompts or a larger long.k (a pair needs a best final answer that is no "
    "longer than the worst one)",
}


@task(name="train-model", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
def train_model_task(
    io: StepIO,
    kind: Literal["sft", "dpo"],
    base_model: str,
    training: TrainingConfig,
    execution: ExecutionConfig,
) -> TrainResult:
    """Reads: the dataset (SFTExample for sft, PreferencePair for dpo). Writes: checkpoints and
    the final model under `checkpoints/{train_step}` (io.target = ("checkpoints", train_step)).
    Fingerprint: base model, training config and the dataset's shard hashes (a changed dataset
    never reuses a finished model).
    """
    logger = get_run_logger()
    config = settings()
    run, dataset, train_step = io.run, io.source, io.target.step
    store = open_store(io.storage_root, config)
    layout = RunLayout(run)
    manifest = require_manifest(store, run, dataset)
    dataset_uri = store.step_uri(run, *dataset)
    if manifest.total_rows == 0:
        hint = _EMPTY_DATASET_HINTS.get(dataset[1], "more prompts")
        raise ValueError(
            f"{dataset_uri} has no rows to train on: nothing passed the selection rules (its "
            f"step record {store.uri(layout.step_record(dataset))} counts what was dropped and "
            f"why; try {hint})"
        )
    job = TrainJob(
        kind=kind,
        base_model=base_model,
        store_root=store.root,
        cache_dir=str(config.cache_dir),
        run=run,
        dataset_stage=dataset[0],
        dataset_step=dataset[1],
        train_step=train_step,
        training=training,
        device=execution.device,
        work_dir="",  # claimed per attempt by run_training_subprocess under work_root
    )
    logger.info(
        "training %s (%s) on %d rows of %s", train_step, kind, manifest.total_rows, dataset_uri
    )
    gpus = 0 if execution.device == "cpu" else visible_cuda_devices(config.cuda_visible_devices)
    quiet_progress_bars_off_terminal()
    started = time.perf_counter()
    # Training runs after the engine of the step before was closed; it takes the GPU slot too.
    with gpu_slot(None, execution):
        final_uri = run_training_subprocess(
            job,
            gpus,
            storage_options=config.storage_options,
            work_root=config.cache_dir / "train-work",
        )
    seconds = time.perf_counter() - started
    result = TrainResult(
        train_step=train_step,
        kind=kind,
        base_model=base_model,
        dataset_uri=dataset_uri,
        rows=manifest.total_rows,
        checkpoint_uri=store.uri(layout.checkpoints(train_step)),
        final_uri=final_uri,
        revision=model_revision(final_uri, config.storage_options),
        **trained_counts(store.read_json(layout.complete_marker(train_step))),
    )
    logger.info("%s done in %.0fs: %s", train_step, seconds, final_uri)
    publish_training_report(run, result, seconds)
    record_step(store, run, io.target, seconds, result)
    return result
