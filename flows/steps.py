"""Every Stage I step as its own flow, run on data already in storage.

Use these to redo one step with other settings (e.g. re-score with another reward model into a
new target step) or to inspect a step in the Prefect UI. Each reads its source step's manifest,
so it fails clearly when the source step has not finished.
"""

from __future__ import annotations

from prefect import flow

from flows.params import (
    BuildPairsParams,
    GenerateTreesParams,
    IngestParams,
    ScoreTreesParams,
    SelectRSFTParams,
    TrainParams,
)
from tasks.common import StepResult
from tasks.stage1 import (
    build_pairs_task,
    generate_trees_task,
    ingest_prompts_task,
    score_trees_task,
    select_rsft_task,
)
from tasks.training import TrainResult, train_model_task

__all__ = [
    "build_pairs_flow",
    "generate_trees_flow",
    "ingest_prompts_flow",
    "score_trees_flow",
    "select_rsft_flow",
    "train_dpo_flow",
    "train_sft_flow",
]


@flow(name="ingest-prompts")
def ingest_prompts_flow(params: IngestParams) -> StepResult:
    """Store a prompt set as the run's inputs/prompts shards."""
    p = params
    return ingest_prompts_task(
        p.storage_root, p.run_name, p.prompts, p.shard_size, p.on_bad_row, p.max_prompts
    )


@flow(name="generate-trees")
def generate_trees_flow(params: GenerateTreesParams) -> StepResult:
    """Refinement trees for a prompts step."""
    p = params
    return generate_trees_task(
        p.storage_root, p.run_name, p.policy, p.templates_dir, p.x, p.y, p.sampling,
        p.require_rating, p.max_format_retries, p.execution, tuple(p.source), tuple(p.target),
    )  # fmt: skip


@flow(name="score-trees")
def score_trees_flow(params: ScoreTreesParams) -> StepResult:
    """Reward scores for a trees step."""
    p = params
    return score_trees_task(
        p.storage_root, p.run_name, p.reward, p.execution, tuple(p.source), tuple(p.target)
    )


@flow(name="select-rsft")
def select_rsft_flow(params: SelectRSFTParams) -> StepResult:
    """RSFT examples from a scored trees step."""
    p = params
    return select_rsft_task(
        p.storage_root, p.run_name, p.selection, p.templates_dir, tuple(p.source), tuple(p.target)
    )


@flow(name="build-pairs")
def build_pairs_flow(params: BuildPairsParams) -> StepResult:
    """DPO preference pairs from a scored trees step."""
    p = params
    return build_pairs_task(
        p.storage_root, p.run_name, p.selection, p.templates_dir, tuple(p.source), tuple(p.target)
    )


@flow(name="train-sft")
def train_sft_flow(params: TrainParams) -> TrainResult:
    """SFT on an SFTExample step (e.g. stage1/rsft)."""
    p = params
    return train_model_task(
        p.storage_root, p.run_name, "sft", p.base_model, tuple(p.dataset), p.train_step, p.training
    )


@flow(name="train-dpo")
def train_dpo_flow(params: TrainParams) -> TrainResult:
    """DPO on a PreferencePair step (e.g. stage1/pairs)."""
    p = params
    return train_model_task(
        p.storage_root, p.run_name, "dpo", p.base_model, tuple(p.dataset), p.train_step, p.training
    )
