"""Runs an `avr_core.steps` plan inside a Prefect task: logs each shard to the run logger, shows
a shard bar when a person watches a terminal, and reports the sealed step (artifact + record).

One step runs one of three ways, decided by its `ExecutionConfig` (never by the step's code):
in this process (the default); scaled out, its shards dealt into slices that child flow runs
compute on other workers (`execution.workers > 1`, tasks/slices.py); or as one such slice
(`execution.shards` set): those shards only, nothing sealed or published.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run
from tqdm.auto import tqdm

from avr_core.cards import SealedBy, write_step_card
from avr_core.config import ExecutionConfig, ModelSpec
from avr_core.layout import RunLayout
from avr_core.results import StepResult
from avr_core.steps import (
    ProgressCallback,
    ShardCompute,
    ShardEvent,
    StepPlan,
    raise_failed_shards,
    run_shards,
    run_step,
    slice_result,
)
from tasks.engines import LazyEngine, gpu_slot, settings, uses_local_gpu
from tasks.runlog import check_run_lease, code_version, publish_step_report, record_step
from tasks.slices import fans_out, run_slices

__all__ = ["execute_plan"]


def execute_plan(
    plan: StepPlan,
    compute: ShardCompute,
    engines: LazyEngine[Any] | Sequence[LazyEngine[Any]] = (),
    extra_counts: Mapping[str, int] | None = None,
    execution: ExecutionConfig | None = None,
    models: Sequence[ModelSpec | None] = (),
) -> StepResult:
    """Compute the pending shards of `plan`, seal the step, publish and record it; close the
    `engines` the shards loaded (a greedy search holds a policy and a reward model).

    `models` are the models the `engines` are of: while shards run here, this worker's GPU slot
    is held if one of them is on its GPU. With `execution`, a step that loads one of them (not
    only rules or served models) scales out to `execution.workers` slices; `execution.shards`
    makes this process one such slice.
    """
    held = [engines] if isinstance(engines, LazyEngine) else list(engines)
    started = time.perf_counter()
    if execution is not None and execution.shards is not None:
        with _computing_here(held, models, execution):
            part = _run_slice(plan, compute, execution)
        return _with_load_seconds(part, held)
    get_run_logger().info(
        "%s: %d shards, %d already done with fingerprint %s, %d to compute",
        plan.target,
        len(plan.indices),
        len(plan.done),
        plan.fingerprint,
        len(plan.pending),
    )
    # What the step will hold, written first: `avr runs` shows a partial step as k/n shards.
    plan.store.write_json(
        RunLayout(plan.run).step_plan(plan.target),
        {"fingerprint": plan.fingerprint, "shards": len(plan.indices)},
    )
    if fans_out(plan, execution, models):
        assert execution is not None
        # The parent loads no engine and holds no GPU slot: its children hold their workers'.
        result = run_slices(plan, execution, models, extra_counts)
    else:
        with (
            _computing_here(held, models, execution),
            _shard_bar(plan, len(plan.pending)) as progress,
        ):
            result = run_step(plan, compute, progress, extra_counts, settings().worker_id)
    result = _with_load_seconds(result, held)
    # Sealed (here or by the slices' parent): its dataset card, README.md beside the shards.
    # Never raises; the flow run is looked up inside its guard.
    write_step_card(
        plan, result, lambda: SealedBy(flow_run.flow_name, flow_run.parameters, code_version())
    )
    publish_step_report(plan.run, result)
    record_step(plan.store, plan.run, plan.target, time.perf_counter() - started, result)
    return result


def _run_slice(plan: StepPlan, compute: ShardCompute, execution: ExecutionConfig) -> StepResult:
    """One slice of a scaled-out step: compute `execution.shards` (those not committed yet),
    commit each; the parent seals, publishes and records the step."""
    shards = list(execution.shards or [])
    worker = settings().worker_id
    todo = [i for i in shards if i not in plan.done]
    get_run_logger().info(
        "%s slice on worker %s: shards %s, %d to compute (fingerprint %s)",
        plan.target,
        worker,
        shards,
        len(todo),
        plan.fingerprint,
    )
    with _shard_bar(plan, len(todo)) as progress:
        ran = run_shards(plan, compute, shards, progress, worker=worker)
    raise_failed_shards(plan, ran)
    return slice_result(plan, shards, ran)


@contextlib.contextmanager
def _computing_here(
    engines: Sequence[LazyEngine[Any]],
    models: Sequence[ModelSpec | None],
    execution: ExecutionConfig | None,
) -> Iterator[None]:
    """While shards compute in this process: this worker's GPU slot if one of the `models` is on
    its GPU, and the `engines` closed before the slot is given back, so the next engine on this
    GPU finds its memory free.

    One slot even for two engines (a greedy search's policy and reward model): both are in this
    process on this worker's GPU, and asking for two would wait forever on a one-GPU worker.
    """
    on_gpu = None
    if execution is not None:
        on_gpu = next((m for m in models if m and uses_local_gpu(m, execution)), None)
    with gpu_slot(on_gpu, execution) if on_gpu and execution else contextlib.nullcontext():
        try:
            yield
        finally:
            for engine in engines:
                engine.close()


def _with_load_seconds(result: StepResult, engines: Sequence[LazyEngine[Any]]) -> StepResult:
    """`result` with the seconds its engines took to load, if any loaded."""
    load_seconds = sum(engine.load_seconds for engine in engines)
    if load_seconds:
        result.seconds["engine_load"] = round(load_seconds, 3)
    return result


@contextlib.contextmanager
def _shard_bar(plan: StepPlan, total: int) -> Iterator[ProgressCallback]:
    """A progress callback: logs every shard to the run logger, draws a bar when a person
    watches a terminal (`avr demo`, `avr run`; workers just log), and stops at the next shard
    if another run took this run's lease over."""
    logger = get_run_logger()
    bar = tqdm(total=total, desc=str(plan.target), unit="shard", disable=not sys.stderr.isatty())

    def progress(event: ShardEvent) -> None:
        bar.update(1)
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

    try:
        yield progress
    finally:
        bar.close()
