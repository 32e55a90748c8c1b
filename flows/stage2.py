"""Stage II of Alignment via Refinement as one Prefect flow (DESIGN section 6).

Reads like the method: greedy recursive search with the Stage I model -> trajectories -> train SFT
-> k long responses per prompt with the Stage II SFT model -> score their final answers ->
length-controlled pairs -> train DPO. Every step writes Parquet shards under
{storage_root}/runs/{run_name}/stage2/; re-running with the same run name reuses every finished
shard and resumes training from its synced checkpoint.
"""

from __future__ import annotations

from prefect import flow

from avr_core.config import ModelSpec, weights_path
from avr_core.reporting import format_run_summary
from avr_core.results import RunSummary, StepResult, TrainResult
from avr_core.steps import Stage1Steps
from avr_core.steps import Stage2Steps as S
from flows.params import Stage1DataParams, Stage2Params, Stage2Sections
from flows.plan import log_estimate
from flows.stage1 import publish_summary
from tasks.prompts import ingest_prompts_task
from tasks.runlog import hold_run, start_run_task
from tasks.stage2 import (
    build_lc_pairs_task,
    greedy_search_task,
    sample_long_responses_task,
    score_long_responses_task,
    select_trajectories_task,
)
from tasks.training import train_model_task

__all__ = ["run_stage2", "stage2"]


PROMPTS = Stage1Steps.PROMPTS


def run_stage2(
    p: Stage1DataParams, stage2: Stage2Sections, policy: ModelSpec
) -> tuple[list[StepResult], list[TrainResult]]:
    """Stage II's steps in order, from the Stage I model `policy`: `p` gives the run, reward
    model, templates, selection and execution, `stage2` the Stage II sections. The caller holds
    the run's lease and has ingested the prompts."""
    search = greedy_search_task(
        p.step_io(S.SEARCH, PROMPTS),
        (policy, p.reward),
        stage2.search,
        p.templates_dir,
        p.execution,
    )
    trajectories = select_trajectories_task(
        p.step_io(S.TRAJECTORIES, S.SEARCH), p.selection, p.templates_dir
    )
    sft = train_model_task(
        p.step_io(S.TRAIN_SFT, S.TRAJECTORIES),
        "sft",
        weights_path(policy, "policy"),
        stage2.stage2_sft,
        p.execution,
    )
    sft_policy = policy.model_copy(update={"path": sft.final_uri})
    long = sample_long_responses_task(
        p.step_io(S.LONG_RESPONSES, S.SEARCH), sft_policy, stage2.long, p.execution
    )
    scored = score_long_responses_task(
        p.step_io(S.LONG_SCORED, S.LONG_RESPONSES), p.reward, p.execution
    )
    pairs = build_lc_pairs_task(p.step_io(S.LC_PAIRS, S.LONG_SCORED), p.selection)
    dpo = train_model_task(
        p.step_io(S.TRAIN_DPO, S.LC_PAIRS), "dpo", sft.final_uri, stage2.stage2_dpo, p.execution
    )
    return [search, trajectories, long, scored, pairs], [sft, dpo]


@flow(name="stage2", log_prints=True)
def stage2(params: Stage2Params | None = None) -> RunSummary:
    """Run Stage II end to end from a Stage I model; returns datasets, checkpoints and counts."""
    p = params or Stage2Params()
    with hold_run(p.storage_root, p.run_name, "stage2"):
        run_record_uri = start_run_task(p.storage_root, p.run_name, "stage2", p)
        log_estimate("stage2", p)
        prompts = ingest_prompts_task(p.step_io(PROMPTS), p.ingest, p.policy, p.search.tree())
        steps, models = run_stage2(p, p, p.policy)
        return publish_summary("stage2", p, run_record_uri, [prompts, *steps], models)


if __name__ == "__main__":
    print(format_run_summary(stage2()))
