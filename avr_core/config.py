"""Pydantic configuration shared by the library, the tasks and the flow parameter models.

Data-shaping settings (models, templates, sampling, thresholds) feed the config fingerprint;
execution knobs (batch size, GPU memory fraction, concurrency) are kept apart in `ExecutionConfig`
so that changing them never invalidates finished shards.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from avr_core.models import TINY_MODEL
from avr_core.schemas import Sampling

__all__ = [
    "ExecutionConfig",
    "ModelSpec",
    "Sampling",
    "SelectionConfig",
    "TrainingConfig",
]


class _Strict(BaseModel):
    # A misspelt key in a config file must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class SelectionConfig(_Strict):
    """Every threshold of the DESIGN section 5 selection rules."""

    degenerate_repeat_threshold: int = Field(
        60, ge=1, description="a word or digit/symbol run repeated this often marks text degenerate"
    )
    rsft_max_extra_chars: int = Field(
        400, description="RSFT length guard: keep if len(best) - len(answer) < this ..."
    )
    rsft_max_length_ratio: float = Field(
        1.2, description="... or if len(best) / len(answer) < this"
    )
    rsft_include_original: bool = Field(
        False, description="prompts without a kept RSFT example contribute their original chat"
    )


class ModelSpec(_Strict):
    """A model and the backend that runs it.

    `path` is a local directory, a hub-style id already in the local cache, an `s3://`/`file://`
    URI of a saved model, or one of the bundled names (`smollm2-135m-instruct`,
    `smollm2-135m-bt-rm`). For the `openai` backend it is the served model name and `base_url`
    is required.
    """

    backend: Literal["transformers", "vllm", "openai", "rules"] = "transformers"
    path: str = TINY_MODEL
    base_url: str | None = Field(
        None, description="OpenAI-compatible server, e.g. http://host:8000/v1"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    length_penalty: float = Field(
        0.0, ge=0.0, description="rules backend only: score -= penalty * words / 1000"
    )

    @property
    def model_id(self) -> str:
        """Stable id used in lineage and fingerprints."""
        return f"{self.backend}:{self.path}"


class ExecutionConfig(_Strict):
    """How to run, not what to produce: never part of the fingerprint."""

    batch_size: int = Field(16, ge=1, description="conversations per engine call (halved on OOM)")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    max_concurrency: int = Field(16, ge=1, description="openai backend: requests in flight")
    request_timeout_s: float = Field(300.0, gt=0)
    max_retries: int = Field(5, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class TrainingConfig(_Strict):
    """What our SFT/DPO training steps need; one adapter turns it into TRL's config."""

    learning_rate: float = Field(5e-6, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="overrides epochs when > 0")
    per_device_train_batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=16)
    beta: float = Field(0.1, gt=0, description="DPO only")
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"], description="DPO only")
    use_lora: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    save_steps: int = Field(50, ge=1)
    seed: int = 0
    extra: dict[str, Any] = Field(
        default_factory=dict, description="passed through to TRL's SFTConfig/DPOConfig unchanged"
    )
