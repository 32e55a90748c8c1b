"""Typed summaries that steps, training and flows return: where outputs are and what they hold.

They cross task and flow boundaries (Prefect serialises them), so they hold URIs and counts,
never the data itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from avr_core.layout import StepRef

__all__ = ["RunSummary", "StepResult", "TrainResult"]


class StepResult(BaseModel):
    """A sealed dataset step, or (`sealed` false) what one slice of a scaled-out step computed."""

    stage: str
    step: str
    uri: str = Field(description="the step directory: Parquet shards + _manifest.json")
    fingerprint: str
    rows: int
    shards: int
    shards_computed: int = Field(description="shards computed by this attempt")
    shards_skipped: int = Field(description="shards already committed before this attempt")
    counts: dict[str, int] = Field(default_factory=dict)
    gain_mean: float | None = None
    gain_median: float | None = None
    means: dict[str, float] = Field(
        default_factory=dict,
        description="mean of every other per-record value the shards reported (e.g. gain_round_1)",
    )
    seconds: dict[str, float] = Field(default_factory=dict)
    sealed: bool = Field(
        True, description="false for one slice's part: its rows and shards, not the step's"
    )

    @property
    def ref(self) -> StepRef:
        return StepRef(self.stage, self.step)

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.step}"


class TrainResult(BaseModel):
    """Where a training step put its model, and what it was trained on."""

    train_step: str
    kind: Literal["sft", "dpo"]
    base_model: str
    dataset_uri: str
    rows: int
    checkpoint_uri: str
    final_uri: str
    revision: str | None = Field(description="training fingerprint of the final model")
    global_step: int | None = Field(None, description="optimizer steps of the final model")
    tokens_seen: int | None = Field(
        None, description="non-padding tokens trained on (TRL's count, since the last resume)"
    )


class RunSummary(BaseModel):
    """What a pipeline flow produced: every dataset step and every trained model."""

    flow: str
    run: str
    storage_root: str
    run_record_uri: str
    steps: list[StepResult] = Field(default_factory=list)
    models: list[TrainResult] = Field(default_factory=list)

    @property
    def datasets(self) -> dict[str, str]:
        return {step.name: step.uri for step in self.steps}

    @property
    def checkpoints(self) -> dict[str, str]:
        return {model.train_step: model.final_uri for model in self.models}
