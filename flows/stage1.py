"""Stage I of Alignment via Refinement as one Prefect flow (DESIGN section 6).

Reads like the method: ingest prompts -> refinement trees with the seed policy -> score ->
RSFT set -> train SFT -> trees with the SFT model -> score -> DPO pairs -> train DPO.
Every step writes Parquet shards under {storage_root}/runs/{run_name}/; re-running the flow with
the same run name reuses every finished shard and resumes training from its synced checkpoint.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from avr_core.config import weights_path
from avr_core.reporting import format_run_summary, render_run_markdown
from avr_core.results import RunSummary, StepResult, TrainResult
from avr_core.steps import Stage1Steps as S
from flows.params import RunParams, Stage1Params
from flows.plan import log_estimate
from tasks.datasets import build_pairs_task, select_rsft_task
from tasks.prompts import ingest_prompts_task
from tasks.runlog import artifact_key, hold_run, start_run_task
from tasks.training import train_model_task
from tasks.trees import generate_trees_task, score_trees_task

__all__ = ["publish_summary", "run_stage1", "stage1"]


def run_stage1(p: Stage1Params) -> tuple[list[StepResult], list[TrainResult]]:
    """Stage I's steps in order (the caller holds the run's lease): datasets and models."""
    prompts = ingest_prompts_task(p.step_io(S.PROMPTS), p.ingest, p.policy, p.tree)

    seed_trees = generate_trees_task(
        p.step_io(S.SEED_TREES, S.PROMPTS), p.policy, p.tree, p.templates_dir, p.execution
    )
    seed_scored = score_trees_task(p.step_io(S.SEED_SCORED, S.SEED_TREES), p.reward, p.execution)
    rsft = select_rsft_task(p.step_io(S.RSFT, S.SEED_SCORED), p.selection, p.templates_dir)
    sft = train_model_task(
        p.step_io(S.TRAIN_SFT, S.RSFT), "sft", weights_path(p.policy), p.sft, p.execution
    )

    sft_policy = p.policy.model_copy(update={"path": sft.final_uri})
    sft_trees = generate_trees_task(
        p.step_io(S.SFT_TREES, S.PROMPTS), sft_policy, p.tree, p.templates_dir, p.execution
    )
    sft_scored = score_trees_task(p.step_io(S.SFT_SCORED, S.SFT_TREES), p.reward, p.execution)
    pairs = build_pairs_task(p.step_io(S.PAIRS, S.SFT_SCORED), p.selection, p.templates_dir)
    dpo = train_model_task(
        p.step_io(S.TRAIN_DPO, S.PAIRS), "dpo", sft.final_uri, p.dpo, p.execution
    )
    steps = [prompts, seed_trees, seed_scored, rsft, sft_trees, sft_scored, pairs]
    return steps, [sft, dpo]


def publish_summary(
    flow_name: str,
    p: RunParams,
    run_record_uri: str,
    steps: list[StepResult],
    models: list[TrainResult],
) -> RunSummary:
    """The run's summary, also as a markdown artifact."""
    summary = RunSummary(
        flow=flow_name,
        run=p.run_name,
        storage_root=p.storage_root,
        run_record_uri=run_record_uri,
        steps=steps,
        models=models,
    )
    create_markdown_artifact(
        markdown=render_run_markdown(summary),
        key=artifact_key(p.run_name, f"{flow_name}-summary"),
        description=f"{flow_name} summary of run {p.run_name}",
    )
    return summary


@flow(name="stage1", log_prints=True)
def stage1(params: Stage1Params | None = None) -> RunSummary:
    """Run Stage I end to end; returns where every dataset and checkpoint is, and counts."""
    p = params or Stage1Params()
    with hold_run(p.storage_root, p.run_name, "stage1"):
        run_record_uri = start_run_task(p.storage_root, p.run_name, "stage1", p)
        log_estimate("stage1", p)
        steps, models = run_stage1(p)
        return publish_summary("stage1", p, run_record_uri, steps, models)


if __name__ == "__main__":
    print(format_run_summary(stage1()))
