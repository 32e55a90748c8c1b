"""Stage I of Alignment via Refinement as one Prefect flow (DESIGN section 6).

Reads like the method: ingest prompts -> refinement trees with the seed policy -> score ->
RSFT set -> train SFT -> trees with the SFT model -> score -> DPO pairs -> train DPO.
Every step writes Parquet shards under {storage_root}/runs/{run_name}/; re-running the flow with
the same run name reuses every finished shard and resumes training from its synced checkpoint.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from avr_core.reporting import render_run_markdown, report_rows, text_table
from flows.params import Stage1Params, Stage1Steps
from tasks.common import StepResult, open_store, record_run_start
from tasks.stage1 import (
    build_pairs_task,
    generate_trees_task,
    ingest_prompts_task,
    score_trees_task,
    select_rsft_task,
)
from tasks.training import TrainResult, train_model_task

__all__ = ["format_stage1_summary", "print_stage1_summary", "stage1"]


@task(name="start-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def start_run_task(params: Stage1Params) -> str:
    """Check the store is writable and record the run's config and code version in run.json."""
    store = open_store(params.storage_root)
    store.check_reachable()
    record_run_start(store, params.run_name, "stage1", params)
    return store.root


@flow(name="stage1", log_prints=True)
def stage1(params: Stage1Params | None = None) -> dict[str, Any]:
    """Run Stage I end to end; returns dataset URIs, checkpoint URIs and counts."""
    params = params or Stage1Params()
    root, run, s = params.storage_root, params.run_name, Stage1Steps
    start_run_task(params)

    prompts = ingest_prompts_task(
        root, run, params.prompts, params.shard_size, params.on_bad_row, params.max_prompts,
        s.PROMPTS,
    )  # fmt: skip

    seed_trees = generate_trees_task(
        root, run, params.policy, params.templates_dir, params.x, params.y, params.sampling,
        params.require_rating, params.max_format_retries, params.execution, s.PROMPTS, s.SEED_TREES,
    )  # fmt: skip
    seed_scored = score_trees_task(
        root, run, params.reward, params.execution, s.SEED_TREES, s.SEED_SCORED
    )
    rsft = select_rsft_task(
        root, run, params.selection, params.templates_dir, s.SEED_SCORED, s.RSFT
    )
    sft = train_model_task(root, run, "sft", params.policy.path, s.RSFT, s.TRAIN_SFT, params.sft)

    sft_policy = params.policy.model_copy(update={"path": sft.final_uri})
    sft_trees = generate_trees_task(
        root, run, sft_policy, params.templates_dir, params.x, params.y, params.sampling,
        params.require_rating, params.max_format_retries, params.execution, s.PROMPTS, s.SFT_TREES,
    )  # fmt: skip
    sft_scored = score_trees_task(
        root, run, params.reward, params.execution, s.SFT_TREES, s.SFT_SCORED
    )
    pairs = build_pairs_task(
        root, run, params.selection, params.templates_dir, s.SFT_SCORED, s.PAIRS
    )
    dpo = train_model_task(root, run, "dpo", sft.final_uri, s.PAIRS, s.TRAIN_DPO, params.dpo)

    summary = stage1_summary(
        run,
        root,
        [prompts, seed_trees, seed_scored, rsft, sft_trees, sft_scored, pairs],
        [sft, dpo],
    )
    create_markdown_artifact(
        markdown=render_run_markdown(f"Stage I run {run}", summary["steps"])
        + "\n"
        + "\n".join(f"- {t['train_step']}: `{t['final_uri']}`" for t in summary["models"]),
        key=f"{run}-stage1-summary".lower().replace("_", "-").replace(".", "-"),
        description=f"Stage I summary of run {run}",
    )
    return summary


def stage1_summary(
    run: str, root: str, steps: list[StepResult], models: list[TrainResult]
) -> dict[str, Any]:
    """Plain-JSON summary: every dataset step (URI, rows, counts) and every trained model."""
    return {
        "run": run,
        "storage_root": root,
        "steps": [
            {
                "name": f"{step.stage}/{step.step}",
                "uri": step.uri,
                "rows": step.rows,
                "shards": step.shards,
                "shards_computed": step.shards_computed,
                "counts": step.counts,
                "gain_mean": step.gain_mean,
                "gain_median": step.gain_median,
            }
            for step in steps
        ],
        "models": [model.model_dump(mode="json") for model in models],
        "datasets": {f"{step.stage}/{step.step}": step.uri for step in steps},
        "checkpoints": {model.train_step: model.final_uri for model in models},
    }


def format_stage1_summary(summary: dict[str, Any]) -> str:
    """Where the datasets and checkpoints are, and one table of what each step holds."""
    rows = []
    for step in summary["steps"]:
        details = ", ".join(
            f"{label} {value}"
            for label, value in report_rows(
                step["counts"], step.get("gain_mean"), step.get("gain_median")
            )
        )
        rows.append((step["name"], str(step["rows"]), details))
    lines = [
        f"Stage I run {summary['run']!r} in {summary['storage_root']}",
        "",
        text_table(rows, ("step", "rows", "details")),
        "",
        "Datasets (Parquet shards + _manifest.json):",
        *[f"  {name:<20} {uri}" for name, uri in summary["datasets"].items()],
        "",
        "Trained models:",
        *[f"  {name:<20} {uri}" for name, uri in summary["checkpoints"].items()],
        f"  run record           {summary['storage_root']}/runs/{summary['run']}/run.json",
    ]
    return "\n".join(lines)


def print_stage1_summary(summary: dict[str, Any]) -> None:
    """Print `format_stage1_summary` (what `avr demo` shows at the end)."""
    print(format_stage1_summary(summary))


if __name__ == "__main__":
    print_stage1_summary(stage1())
