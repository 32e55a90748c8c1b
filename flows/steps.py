"""Every Stage I and Stage II step as its own flow, run on data already in storage.

Use these to redo one step with other settings (e.g. re-score with another reward model into a
new target step) or to inspect a step in the Prefect UI. Each reads its source step's manifest,
so it fails clearly when the source step has not finished.
"""

from __future__ import annotations

from prefect import flow

from avr_core.config import weights_path
from avr_core.layout import CHECKPOINTS, RunLayout, StepRef
from avr_core.results import StepResult, TrainResult
from avr_core.steps import Stage1Steps
from flows.params import (
    BuildLCPairsParams,
    BuildPairsParams,
    GenerateTreesParams,
    GreedySearchParams,
    IngestParams,
    SampleLongResponsesParams,
    ScoreLongResponsesParams,
    ScoreTreesParams,
    SelectRSFTParams,
    SelectTrajectoriesParams,
    TrainDPOParams,
    TrainSFTParams,
)
from tasks.datasets import build_pairs_task, select_rsft_task
from tasks.engines import open_store
from tasks.prompts import ingest_prompts_task
from tasks.runlog import hold_run
from tasks.stage2 import (
    build_lc_pairs_task,
    greedy_search_task,
    sample_long_responses_task,
    score_long_responses_task,
    select_trajectories_task,
)
from tasks.training import train_model_task
from tasks.trees import generate_trees_task, score_trees_task

__all__ = [
    "build_lc_pairs_flow",
    "build_pairs_flow",
    "generate_trees_flow",
    "greedy_search_flow",
    "ingest_prompts_flow",
    "sample_long_responses_flow",
    "score_long_responses_flow",
    "score_trees_flow",
    "select_rsft_flow",
    "select_trajectories_flow",
    "train_dpo_flow",
    "train_sft_flow",
]


@flow(name="ingest-prompts")
def ingest_prompts_flow(params: IngestParams) -> StepResult:
    """Store a prompt set as the run's inputs/prompts shards."""
    p = params
    with hold_run(p.storage_root, p.run_name, "ingest-prompts"):
        return ingest_prompts_task(p.step_io(Stage1Steps.PROMPTS), p.ingest)


@flow(name="generate-trees")
def generate_trees_flow(params: GenerateTreesParams) -> StepResult:
    """Refinement trees for a prompts step."""
    p = params
    with hold_run(p.storage_root, p.run_name, "generate-trees"):
        return generate_trees_task(
            p.step_io(p.target, p.source), p.policy, p.tree, p.templates_dir, p.execution
        )


@flow(name="score-trees")
def score_trees_flow(params: ScoreTreesParams) -> StepResult:
    """Reward scores for a trees step."""
    p = params
    with hold_run(p.storage_root, p.run_name, "score-trees"):
        return score_trees_task(p.step_io(p.target, p.source), p.reward, p.execution)


@flow(name="select-rsft")
def select_rsft_flow(params: SelectRSFTParams) -> StepResult:
    """RSFT examples from a scored trees step."""
    p = params
    with hold_run(p.storage_root, p.run_name, "select-rsft"):
        return select_rsft_task(p.step_io(p.target, p.source), p.selection, p.templates_dir)


@flow(name="build-pairs")
def build_pairs_flow(params: BuildPairsParams) -> StepResult:
    """DPO preference pairs from a scored trees step."""
    p = params
    with hold_run(p.storage_root, p.run_name, "build-pairs"):
        return build_pairs_task(p.step_io(p.target, p.source), p.selection, p.templates_dir)


@flow(name="train-sft")
def train_sft_flow(params: TrainSFTParams) -> TrainResult:
    """SFT of the policy on an SFTExample step (e.g. stage1/rsft)."""
    p = params
    with hold_run(p.storage_root, p.run_name, "train-sft"):
        io = p.step_io(StepRef(CHECKPOINTS, p.train_step), p.dataset)
        return train_model_task(io, "sft", weights_path(p.policy, "policy"), p.sft, p.execution)


@flow(name="train-dpo")
def train_dpo_flow(params: TrainDPOParams) -> TrainResult:
    """DPO on a PreferencePair step (e.g. stage1/pairs); by default from this run's SFT model."""
    p = params
    with hold_run(p.storage_root, p.run_name, "train-dpo"):
        base_model = p.base_model or open_store(p.storage_root).uri(
            RunLayout(p.run_name).final_model(Stage1Steps.TRAIN_SFT.step)
        )
        io = p.step_io(StepRef(CHECKPOINTS, p.train_step), p.dataset)
        return train_model_task(io, "dpo", base_model, p.dpo, p.execution)


# ---- Stage II -----------------------------------------------------------------------------------


@flow(name="greedy-search")
def greedy_search_flow(params: GreedySearchParams) -> StepResult:
    """Greedy recursive search over a prompts step (Stage I model + reward model)."""
    p = params
    with hold_run(p.storage_root, p.run_name, "greedy-search"):
        return greedy_search_task(
            p.step_io(p.target, p.source),
            (p.policy, p.reward),
            p.search,
            p.templates_dir,
            p.execution,
        )


@flow(name="select-trajectories")
def select_trajectories_flow(params: SelectTrajectoriesParams) -> StepResult:
    """Trajectory SFT examples from a greedy-search step."""
    p = params
    with hold_run(p.storage_root, p.run_name, "select-trajectories"):
        return select_trajectories_task(p.step_io(p.target, p.source), p.selection, p.templates_dir)


@flow(name="sample-long-responses")
def sample_long_responses_flow(params: SampleLongResponsesParams) -> StepResult:
    """k long responses per prompt of a greedy-search step (Stage II SFT model)."""
    p = params
    with hold_run(p.storage_root, p.run_name, "sample-long-responses"):
        return sample_long_responses_task(
            p.step_io(p.target, p.source), p.policy, p.long, p.execution
        )


@flow(name="score-long-responses")
def score_long_responses_flow(params: ScoreLongResponsesParams) -> StepResult:
    """Scores of the final answers of a long-responses step."""
    p = params
    with hold_run(p.storage_root, p.run_name, "score-long-responses"):
        return score_long_responses_task(p.step_io(p.target, p.source), p.reward, p.execution)


@flow(name="build-lc-pairs")
def build_lc_pairs_flow(params: BuildLCPairsParams) -> StepResult:
    """Length-controlled DPO pairs from a scored long-responses step."""
    p = params
    with hold_run(p.storage_root, p.run_name, "build-lc-pairs"):
        return build_lc_pairs_task(p.step_io(p.target, p.source), p.selection)
