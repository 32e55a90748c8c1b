"""Flow parameters: one pydantic model per flow, rendered as a form in the Prefect UI.

Defaults make the embedded demo (tiny model on CPU, rules reward, 24 bundled prompts) finish in
minutes on a 2-core machine; the paper's settings are noted where they differ. Storage
credentials and endpoints are infrastructure: they come from the `AVR_STORAGE_OPTIONS`
environment variable (see tasks.common), never from these parameters.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from avr_core.config import ExecutionConfig, ModelSpec, Sampling, SelectionConfig, TrainingConfig

__all__ = [
    "BuildPairsParams",
    "GenerateTreesParams",
    "IngestParams",
    "STAGE1",
    "ScoreTreesParams",
    "SelectRSFTParams",
    "Stage1Params",
    "Stage1Steps",
    "StepParams",
    "TrainParams",
    "default_prompts",
    "default_storage_root",
    "resolve_storage_root",
]

STAGE1 = "stage1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Stage1Steps:
    """Step names of Stage I under runs/{run}/: inputs/prompts, stage1/<step>, checkpoints/<train>."""

    PROMPTS = ("inputs", "prompts")
    SEED_TREES = (STAGE1, "seed_trees")
    SEED_SCORED = (STAGE1, "seed_scored")
    RSFT = (STAGE1, "rsft")
    SFT_TREES = (STAGE1, "sft_trees")
    SFT_SCORED = (STAGE1, "sft_scored")
    PAIRS = (STAGE1, "pairs")
    TRAIN_SFT = "stage1_sft"
    TRAIN_DPO = "stage1_dpo"


def default_storage_root() -> str:
    """`file://` URI of ./avr-output under the current directory."""
    return "file://" + str(Path("avr-output").resolve())


def resolve_storage_root(root: str) -> str:
    """Make local roots absolute `file://` URIs (relative to the cwd); other URIs unchanged."""
    root = root.strip()
    if not root:
        raise ValueError("storage_root must not be empty")
    if root.startswith("file://"):
        return "file://" + str(Path(root.removeprefix("file://")).expanduser().resolve())
    if "://" in root:
        return root.rstrip("/")
    return "file://" + str(Path(root).expanduser().resolve())


def default_prompts() -> str:
    """The bundled demo prompt set."""
    from avr_core.ingest import bundled_prompts_path

    return bundled_prompts_path()


def _demo_sampling() -> Sampling:
    # The paper's temperature/top_p; short answers keep the CPU demo fast.
    return Sampling(temperature=0.7, top_p=0.8, max_tokens=128, seed=0)


def _demo_sft() -> TrainingConfig:
    return TrainingConfig(learning_rate=1e-5, max_steps=12, max_length=512, save_steps=6)


def _demo_dpo() -> TrainingConfig:
    return TrainingConfig(learning_rate=5e-6, max_steps=8, max_length=512, save_steps=4)


def _rules_reward() -> ModelSpec:
    # Verifiable constraints: exact scores with no weights. The untrained tiny Bradley-Terry RM
    # (backend "transformers", path "smollm2-135m-bt-rm") stays selectable.
    return ModelSpec(backend="rules", path="constraints")


class StepParams(BaseModel):
    """What every flow needs: which run, where its data lives, how to execute."""

    model_config = ConfigDict(extra="forbid")

    run_name: str = Field("demo", description="run directory under {storage_root}/runs/")
    storage_root: str = Field(
        default_factory=default_storage_root,
        description="file://, s3://bucket/prefix or any fsspec URL; local paths become absolute",
    )
    execution: ExecutionConfig = Field(
        default_factory=ExecutionConfig, description="how to run (not part of any fingerprint)"
    )

    @field_validator("run_name")
    @classmethod
    def _check_run_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"run_name {value!r} must start with a letter or digit and hold only "
                "letters, digits, '.', '_' and '-'"
            )
        return value

    @field_validator("storage_root")
    @classmethod
    def _absolute_root(cls, value: str) -> str:
        return resolve_storage_root(value)


class Stage1Params(StepParams):
    """The whole of Stage I: trees -> scores -> RSFT -> SFT -> trees -> scores -> DPO pairs -> DPO."""

    prompts: str = Field(
        default_factory=default_prompts,
        description="prompt set: JSONL/Parquet path or URI (default: the bundled 24 demo prompts)",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="a malformed prompt row fails the run, or is skipped and recorded"
    )
    max_prompts: int | None = Field(None, ge=1, description="use only the first N prompts")
    shard_size: int = Field(8, ge=1, description="prompts per shard (the unit of checkpointing)")
    policy: ModelSpec = Field(default_factory=ModelSpec, description="seed policy")
    reward: ModelSpec = Field(default_factory=_rules_reward, description="reward model")
    templates_dir: str | None = Field(None, description="directory of .jinja templates")
    x: int = Field(2, ge=1, description="critiques per answer")
    y: int = Field(2, ge=1, description="refinements per critique")
    sampling: Sampling = Field(default_factory=_demo_sampling)
    require_rating: bool = Field(
        False,
        description="re-sample critiques without a [[N]] rating (the paper: True; the tiny "
        "model never writes one)",
    )
    max_format_retries: int = Field(5, ge=0)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    sft: TrainingConfig = Field(default_factory=_demo_sft)
    dpo: TrainingConfig = Field(default_factory=_demo_dpo)


# ---- the steps, each runnable as its own flow on data already in storage ------------------


class IngestParams(StepParams):
    """Read, validate and shard a prompt set into the run's inputs/prompts step."""

    prompts: str = Field(default_factory=default_prompts, description="JSONL/Parquet path or URI")
    on_bad_row: Literal["error", "skip"] = "error"
    max_prompts: int | None = Field(None, ge=1)
    shard_size: int = Field(8, ge=1)


class GenerateTreesParams(StepParams):
    """Build refinement trees for a prompts step with a policy."""

    policy: ModelSpec = Field(default_factory=ModelSpec)
    templates_dir: str | None = None
    x: int = Field(2, ge=1)
    y: int = Field(2, ge=1)
    sampling: Sampling = Field(default_factory=_demo_sampling)
    require_rating: bool = False
    max_format_retries: int = Field(5, ge=0)
    source: tuple[str, str] = Field(Stage1Steps.PROMPTS, description="(stage, step) of prompts")
    target: tuple[str, str] = Field(Stage1Steps.SEED_TREES, description="(stage, step) to write")


class ScoreTreesParams(StepParams):
    """Score the answers and refinements of a trees step."""

    reward: ModelSpec = Field(default_factory=_rules_reward)
    source: tuple[str, str] = Stage1Steps.SEED_TREES
    target: tuple[str, str] = Stage1Steps.SEED_SCORED


class SelectRSFTParams(StepParams):
    """Pick the RSFT examples of a scored trees step."""

    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    templates_dir: str | None = None
    source: tuple[str, str] = Stage1Steps.SEED_SCORED
    target: tuple[str, str] = Stage1Steps.RSFT


class BuildPairsParams(StepParams):
    """Build the DPO preference pairs of a scored trees step."""

    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    templates_dir: str | None = None
    source: tuple[str, str] = Stage1Steps.SFT_SCORED
    target: tuple[str, str] = Stage1Steps.PAIRS


class TrainParams(StepParams):
    """Train a model on a dataset step (SFT on SFTExample rows, DPO on PreferencePair rows)."""

    base_model: str = Field(
        "smollm2-135m-instruct", description="bundled name, local directory or storage URI"
    )
    dataset: tuple[str, str] = Stage1Steps.RSFT
    train_step: str = Stage1Steps.TRAIN_SFT
    training: TrainingConfig = Field(default_factory=_demo_sft)
