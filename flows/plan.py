"""What a flow will generate and how long it will take, before it runs (`avr plan`; the preview
and the command are flows/preview.py).

The arithmetic is `avr_core.estimate`; this module reads what it needs: the prompt count (the
prompt set read and validated as ingest reads it, nothing written), the generating steps of the
flow from its parameters, and calibrations from step records already in storage: the run itself
when it has run (partly), else its preview run `{run_name}-preview`, or `--calibrate-from RUN`.
Every pipeline flow also logs the same estimate when it starts (`log_estimate`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from pydantic import BaseModel

from avr_core.config import ModelSpec
from avr_core.estimate import (
    Calibration,
    GenerationStep,
    RunEstimate,
    calibrate,
    estimate_run,
    format_estimate,
)
from avr_core.ingest import read_answers, read_prompts, resolve_prompt_source
from avr_core.layout import RunLayout, StepRef
from avr_core.settings import AvrSettings
from avr_core.steps import Stage1Steps, Stage2Steps
from avr_core.storage import DatasetStore
from flows.config_files import ConfigError
from flows.params import RefineParams, Stage1Params, Stage2Sections, ThinkParams

__all__ = [
    "DEFAULT_TOKENS_PER_SECOND",
    "count_prompts",
    "find_calibrations",
    "generation_steps",
    "log_estimate",
    "plan_flow",
    "preview_run_name",
    "step_name",
]

logger = logging.getLogger(__name__)

# Throughput assumed until a run or preview measured one: batched vLLM on one GPU writes a few
# thousand tokens/s for a 7-8B model; stated in the output, overridden by --tokens-per-second.
DEFAULT_TOKENS_PER_SECOND = 1000.0


def step_name(ref: StepRef) -> str:
    """`stage/step`, as steps are named in estimates and `avr show`."""
    return f"{ref.stage}/{ref.step}"


def _model(spec: ModelSpec) -> str:
    return spec.model_id


def generation_steps(params: BaseModel) -> list[GenerationStep]:
    """The steps of a flow (given its parameters) that call a generator, in run order."""
    steps: list[GenerationStep] = []
    if isinstance(params, Stage1Params):
        tree = params.tree
        for ref, model in (
            (Stage1Steps.SEED_TREES, _model(params.policy)),
            (Stage1Steps.SFT_TREES, "Stage I SFT model"),
        ):
            steps.append(
                GenerationStep(
                    step=step_name(ref),
                    kind="trees",
                    model=model,
                    max_tokens=tree.sampling.max_tokens,
                    x=tree.x,
                    y=tree.y,
                )
            )
    if isinstance(params, Stage2Sections):
        policy = "Stage I DPO model" if isinstance(params, Stage1Params) else None
        search, long = params.search, params.long
        steps += [
            GenerationStep(
                step=step_name(Stage2Steps.SEARCH),
                kind="search",
                model=policy or _model(params.policy),  # type: ignore[attr-defined]
                max_tokens=search.sampling.max_tokens,
                x=search.x,
                y=search.y,
                rounds=search.max_rounds,
                starts_from_policy=search.start == "policy",
            ),
            GenerationStep(
                step=step_name(Stage2Steps.LONG_RESPONSES),
                kind="long_responses",
                model="Stage II SFT model",
                max_tokens=long.sampling.max_tokens,
                k=long.k,
            ),
        ]
    if isinstance(params, RefineParams):
        sampling = params.refine.sampling
        if params.refine.answers is None:
            steps.append(
                GenerationStep(
                    step=step_name(params.start_step),
                    kind="answers",
                    model=_model(params.policy),
                    max_tokens=sampling.max_tokens,
                )
            )
        steps.append(
            GenerationStep(
                step=step_name(params.refined_step),
                kind="refine",
                model=_model(params.policy),
                max_tokens=sampling.max_tokens,
                rounds=params.refine.rounds,
            )
        )
    if isinstance(params, ThinkParams):
        steps.append(
            GenerationStep(
                step=step_name(params.step),
                kind="think",
                model=_model(params.policy),
                max_tokens=params.think.sampling.max_tokens,
            )
        )
    return steps


def count_prompts(params: BaseModel, settings: AvrSettings) -> tuple[int, int]:
    """(prompts, shard size) the flow will read: its prompt set (or, for `refine` over imported
    answers, those answers) read and validated as ingest does, writing nothing (rejected rows
    go to a temporary file). Prompts over the token limit, which ingest also rejects, count."""
    ingest = getattr(params, "ingest", None)
    if ingest is None:
        raise ConfigError(f"{type(params).__name__} reads no prompt set: nothing to estimate")
    with tempfile.TemporaryDirectory(prefix="avr-plan-") as scratch:
        rejects = str(Path(scratch) / "rejects.jsonl")
        if isinstance(params, RefineParams) and params.refine.answers is not None:
            answers = read_answers(
                params.refine.answers,
                params.refine.on_bad_row,
                rejects,
                settings.storage_options,
            )
            return len(answers.answers), params.refine.shard_size
        read = read_prompts(
            resolve_prompt_source(ingest.prompts),
            ingest.on_bad_row,
            rejects,
            settings.storage_options,
            max_prompt_chars=ingest.max_prompt_chars,
        )
    prompts = len(read.prompts)
    if ingest.max_prompts is not None:
        prompts = min(prompts, ingest.max_prompts)
    return prompts, ingest.shard_size


def preview_run_name(run: str) -> str:
    return f"{run}-preview"


def _step_record(store: DatasetStore, run: str, step: str) -> dict[str, Any] | None:
    """The step's record (`tasks.runlog.record_step`: its StepResult as JSON), if it ran."""
    stage, name = step.split("/", 1)
    record = store.read_json(RunLayout(run).step_record(StepRef(stage, name)))
    return record if isinstance(record, dict) else None


def find_calibrations(
    store: DatasetStore, runs: Sequence[str], steps: Sequence[GenerationStep]
) -> dict[str, Calibration]:
    """A calibration per step from the first of `runs` whose record of that step counted
    tokens; a step never measured borrows one measured step of its kind (e.g. the SFT model's
    trees from the seed model's trees), which its source names."""
    measured: dict[str, Calibration] = {}
    for step in steps:
        for run in runs:
            result = _step_record(store, run, step.step)
            found = calibrate(step, f"run {run} {step.step}", result) if result else None
            if found is not None:
                measured[step.step] = found
                break
    by_kind = {s.kind: measured[s.step] for s in steps if s.step in measured}
    return {
        s.step: measured.get(s.step) or by_kind[s.kind]
        for s in steps
        if s.step in measured or s.kind in by_kind
    }


def plan_flow(
    flow_name: str,
    params: BaseModel,
    settings: AvrSettings,
    tokens_per_second: float = DEFAULT_TOKENS_PER_SECOND,
    calibrate_from: str | None = None,
) -> RunEstimate:
    """The estimate of running `flow_name` with `params`, calibrated from storage when it can."""
    steps = generation_steps(params)
    if not steps:
        raise ConfigError(f"flow {flow_name!r} calls no generator: nothing to estimate")
    prompts, shard_size = count_prompts(params, settings)
    run: str = params.run_name  # type: ignore[attr-defined]
    runs = [calibrate_from] if calibrate_from else [run, preview_run_name(run)]
    store = DatasetStore(params.storage_root, settings.storage_options)  # type: ignore[attr-defined]
    try:
        calibrations = find_calibrations(store, runs, steps)
    except Exception as err:  # noqa: BLE001 - an unreadable root only costs the calibration
        logger.warning("no calibration from %s: %s", store.root, err)
        calibrations = {}
    notes = [
        "expected tokens = texts x max_tokens until a run or preview measured the step "
        f"(`avr plan --preview N`); time at {tokens_per_second:g} tokens/s unless measured",
        "searches assume every round improves (at most); retries add calls and texts",
    ]
    if calibrate_from and not calibrations:
        notes.append(f"run {calibrate_from} has no step record with token counts to calibrate on")
    return estimate_run(
        flow_name, steps, prompts, shard_size, tokens_per_second, calibrations, notes
    )


def log_estimate(flow_name: str, params: BaseModel) -> None:
    """Log the estimate as a flow starts; never fails the flow (it is advice)."""
    run_logger = get_run_logger()
    try:
        estimate = plan_flow(flow_name, params, AvrSettings())
    except Exception as err:  # noqa: BLE001 - a bad prompt set fails in ingest, with its own error
        run_logger.warning("no estimate for this run: %s: %s", type(err).__name__, err)
        return
    run_logger.info("estimate before the run:\n%s", format_estimate(estimate))
