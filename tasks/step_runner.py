"""Runs an `avr_core.steps` plan inside a Prefect task: logs each shard to the run logger, shows
a shard bar when a person watches a terminal, and reports the sealed step (artifact + record).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from prefect import get_run_logger
from tqdm.auto import tqdm

from avr_core.results import StepResult
from avr_core.steps import ShardCompute, ShardEvent, StepPlan, run_step
from tasks.engines import LazyEngine
from tasks.runlog import check_run_lease, publish_step_report, record_step

__all__ = ["execute_plan"]


def execute_plan(
    plan: StepPlan,
    compute: ShardCompute,
    engines: LazyEngine[Any] | Sequence[LazyEngine[Any]] = (),
    extra_counts: Mapping[str, int] | None = None,
) -> StepResult:
    """Compute every pending shard of `plan`, seal the step, publish and record it; close the
    `engines` the shards loaded (a greedy search holds a policy and a reward model)."""
    held = [engines] if isinstance(engines, LazyEngine) else list(engines)
    logger = get_run_logger()
    logger.info(
        "%s: %d shards, %d already done with fingerprint %s, %d to compute",
        plan.target,
        len(plan.indices),
        len(plan.done),
        plan.fingerprint,
        len(plan.pending),
    )
    # A shard bar when a person watches a terminal (`avr demo`, `avr run`); workers just log.
    bar = tqdm(
        total=len(plan.pending),
        desc=str(plan.target),
        unit="shard",
        disable=not sys.stderr.isatty(),
    )

    def progress(event: ShardEvent) -> None:
        bar.update(1)
        # Stop at the next shard if another run took this run's lease over.
        check_run_lease(plan.store.root, plan.run)
        if event.error is not None:
            logger.error("%s shard %d failed: %s", event.target, event.index, event.error)
            return
        logger.info(
            "%s shard %d (%d/%d): %d rows in %.1fs (+%.2fs storage)",
            event.target,
            event.index,
            event.position,
            event.total,
            event.rows,
            event.compute_seconds,
            event.storage_seconds,
        )

    started = time.perf_counter()
    try:
        result = run_step(plan, compute, progress, extra_counts)
    finally:
        bar.close()
        for engine in held:
            engine.close()
    load_seconds = sum(engine.load_seconds for engine in held)
    if load_seconds:
        result.seconds["engine_load"] = round(load_seconds, 3)
    publish_step_report(plan.run, result)
    record_step(plan.store, plan.run, plan.target, time.perf_counter() - started, result)
    return result
