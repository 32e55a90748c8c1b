"""Flow parameters: one pydantic model per flow, composed of the section configs of
`avr_core.config`; each renders as a form in the Prefect UI, with every field described.

A config file nests the same way (`ingest:`, `tree:`, `selection:`, ...); a step flow takes the
sections it has by name, so one file configures every flow. Defaults make the embedded demo
(tiny model on CPU, rules reward, 24 bundled prompts) finish in minutes on a 2-core machine.
Storage credentials and endpoints are infrastructure (`avr_core.settings`), never parameters.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from avr_core.config import (
    EvaluationConfig,
    ExecutionConfig,
    IngestConfig,
    LongResponseConfig,
    ModelSpec,
    NonBlank,
    OpenAIModel,
    RefineConfig,
    RulesModel,
    SearchConfig,
    SelectionConfig,
    ThinkConfig,
    TrainingConfig,
    TransformersModel,
    TreeConfig,
    weights_path,
)
from avr_core.layout import StepRef
from avr_core.steps import Stage1Steps, Stage2Steps, StepIO
from avr_core.trl_config import check_extra_keys

__all__ = [
    "AvrParams",
    "BuildLCPairsParams",
    "BuildPairsParams",
    "EvaluateParams",
    "GenerateTreesParams",
    "GreedySearchParams",
    "IngestParams",
    "RefineParams",
    "RegenerateParams",
    "RunParams",
    "SampleLongResponsesParams",
    "ScoreLongResponsesParams",
    "ScoreTreesParams",
    "SelectTrajectoriesParams",
    "SelectRSFTParams",
    "Stage1DataParams",
    "Stage1Params",
    "Stage2Params",
    "Stage2Sections",
    "ThinkParams",
    "TrainDPOParams",
    "TrainSFTParams",
    "default_storage_root",
    "resolve_storage_root",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TEMPLATES = "directory of judge/refine/trajectory .jinja templates (default: bundled)"
_EXECUTION = "how to run (not part of any fingerprint)"


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


def _demo_sft() -> TrainingConfig:
    return TrainingConfig(learning_rate=1e-5, max_steps=12, max_length=512, save_steps=6)


def _demo_dpo() -> TrainingConfig:
    return TrainingConfig(learning_rate=5e-6, max_steps=8, max_length=512, save_steps=4)


def _stage2_sft() -> TrainingConfig:
    # Trajectories are long (draft, reviews, revisions, final answer): a longer window, and
    # enough steps for the tiny model to learn to end with the final-answer marker.
    return TrainingConfig(learning_rate=1e-4, max_steps=16, max_length=1024, save_steps=8)


def _stage2_dpo() -> TrainingConfig:
    return TrainingConfig(learning_rate=5e-6, max_steps=8, max_length=1024, save_steps=4)


def _trainable(spec: ModelSpec) -> ModelSpec:
    """A policy that is trained must be weights we can load, not a served model or rules."""
    weights_path(spec, "policy")
    return spec


TrainablePolicy = Annotated[ModelSpec, AfterValidator(_trainable)]


def _sft_extra(cfg: TrainingConfig) -> TrainingConfig:
    check_extra_keys(cfg.extra, "sft")
    return cfg


def _dpo_extra(cfg: TrainingConfig) -> TrainingConfig:
    check_extra_keys(cfg.extra, "dpo")
    return cfg


# The pass-through keys are checked against TRL's own config here, before anything runs, not in
# the trainer child after generation. Only a non-empty `extra` imports trl (seconds), which is why
# the check lives with the flow parameters and not in TrainingConfig (built in every process).
SFTTraining = Annotated[TrainingConfig, AfterValidator(_sft_extra)]
DPOTraining = Annotated[TrainingConfig, AfterValidator(_dpo_extra)]


class RunParams(BaseModel):
    """What every flow needs: which run, and where its data lives."""

    model_config = ConfigDict(extra="forbid")

    run_name: str = Field("demo", description="run directory under {storage_root}/runs/")
    storage_root: str = Field(
        default_factory=default_storage_root,
        description="file://, s3://bucket/prefix or any fsspec URL; local paths become absolute",
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

    def step_io(self, target: StepRef, *sources: StepRef) -> StepIO:
        """Where a step of this run reads (`sources`) and writes (`target`)."""
        return StepIO(
            storage_root=self.storage_root, run=self.run_name, target=target, sources=sources
        )


class Stage1DataParams(RunParams):
    """The sections that decide Stage I data: prompts, policy, reward model, trees, selection."""

    ingest: IngestConfig = Field(default_factory=IngestConfig, description="the prompt set")
    policy: ModelSpec = Field(default_factory=TransformersModel, description="seed policy")
    # Rules give exact rewards without weights; the untrained tiny Bradley-Terry RM (backend
    # transformers, path smollm2-135m-bt-rm) stays selectable.
    reward: ModelSpec = Field(default_factory=RulesModel, description="reward model")
    templates_dir: str | None = Field(None, description=_TEMPLATES)
    tree: TreeConfig = Field(default_factory=TreeConfig, description="refinement trees")
    selection: SelectionConfig = Field(
        default_factory=SelectionConfig, description="RSFT and DPO selection rules"
    )
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description=_EXECUTION)

    @model_validator(mode="after")
    def _token_limit_has_a_tokenizer(self) -> Stage1DataParams:
        if self.ingest.max_prompt_tokens is not None and isinstance(
            self.policy, OpenAIModel | RulesModel
        ):
            raise ValueError(
                "ingest.max_prompt_tokens counts tokens with the policy's tokenizer, and the "
                f"{self.policy.backend} policy has none here: use ingest.max_prompt_chars"
            )
        return self


class Stage1Params(Stage1DataParams):
    """The whole of Stage I: trees -> scores -> RSFT -> SFT -> trees -> scores -> DPO pairs -> DPO.

    The policy is trained (SFT, then DPO), so it must be a model with weights.
    """

    policy: TrainablePolicy = Field(
        default_factory=TransformersModel, description="seed policy (trained by SFT, then DPO)"
    )
    sft: SFTTraining = Field(default_factory=_demo_sft, description="RSFT training")
    dpo: DPOTraining = Field(default_factory=_demo_dpo, description="DPO training")


class Stage2Sections(BaseModel):
    """The sections only Stage II has: search, long responses, and its two trainings."""

    search: SearchConfig = Field(
        default_factory=SearchConfig, description="greedy recursive search (Stage II data)"
    )
    long: LongResponseConfig = Field(
        default_factory=LongResponseConfig,
        description="k long responses per prompt from the Stage II SFT model",
    )
    stage2_sft: SFTTraining = Field(
        default_factory=_stage2_sft, description="SFT on the trajectories (from the Stage I model)"
    )
    stage2_dpo: DPOTraining = Field(
        default_factory=_stage2_dpo,
        description="length-controlled DPO (from the Stage II SFT model)",
    )

    @field_validator("search")
    @classmethod
    def _search_can_yield_trajectories(cls, search: SearchConfig) -> SearchConfig:
        # A trajectory needs an improving round and then a closing round that does not improve
        # (DESIGN section 5): with one round none can be assembled, and Stage II SFT would fail
        # only after the whole search had run.
        if search.max_rounds < 2:
            raise ValueError(
                "search.max_rounds must be at least 2 for Stage II training: a trajectory needs "
                "an improving round followed by a closing round"
            )
        return search


class Stage2Params(Stage1DataParams, Stage2Sections):
    """The whole of Stage II: greedy search -> trajectories -> SFT -> k long responses -> scores
    -> length-controlled pairs -> DPO, starting from a Stage I model (`policy`)."""

    policy: TrainablePolicy = Field(
        default_factory=TransformersModel,
        description="the Stage I model: it searches, and SFT starts from it (e.g. the URI of a "
        "stage1 run's checkpoints/stage1_dpo/final)",
    )


class AvrParams(Stage1Params, Stage2Sections):
    """Stage I then Stage II in one run: the Stage I DPO model is Stage II's policy."""


# ---- the steps, each runnable as its own flow on data already in storage ------------------


class IngestParams(RunParams):
    """Read, validate and shard a prompt set into the run's inputs/prompts step."""

    ingest: IngestConfig = Field(default_factory=IngestConfig, description="the prompt set")

    @field_validator("ingest")
    @classmethod
    def _no_token_limit(cls, value: IngestConfig) -> IngestConfig:
        if value.max_prompt_tokens is not None:
            raise ValueError(
                "max_prompt_tokens needs the policy's tokenizer, which ingest-prompts does not "
                "have: use max_prompt_chars here, or set it for stage1 or regenerate"
            )
        return value


class GenerateTreesParams(RunParams):
    """Build refinement trees for a prompts step with a policy."""

    policy: ModelSpec = Field(
        default_factory=TransformersModel,
        description="the policy that answers, critiques and refines",
    )
    templates_dir: str | None = Field(None, description=_TEMPLATES)
    tree: TreeConfig = Field(default_factory=TreeConfig, description="refinement trees")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description=_EXECUTION)
    source: StepRef = Field(Stage1Steps.PROMPTS, description="(stage, step) of the prompts")
    target: StepRef = Field(Stage1Steps.SEED_TREES, description="(stage, step) to write")


class ScoreTreesParams(RunParams):
    """Score the answers and refinements of a trees step."""

    reward: ModelSpec = Field(default_factory=RulesModel, description="reward model")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description=_EXECUTION)
    source: StepRef = Field(Stage1Steps.SEED_TREES, description="(stage, step) of the trees")
    target: StepRef = Field(Stage1Steps.SEED_SCORED, description="(stage, step) to write")


class SelectRSFTParams(RunParams):
    """Pick the RSFT examples of a scored trees step."""

    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="rules")
    templates_dir: str | None = Field(None, description=_TEMPLATES)
    source: StepRef = Field(Stage1Steps.SEED_SCORED, description="(stage, step) of scored trees")
    target: StepRef = Field(Stage1Steps.RSFT, description="(stage, step) to write")


class BuildPairsParams(RunParams):
    """Build the DPO preference pairs of a scored trees step."""

    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="rules")
    templates_dir: str | None = Field(None, description=_TEMPLATES)
    source: StepRef = Field(Stage1Steps.SFT_SCORED, description="(stage, step) of scored trees")
    target: StepRef = Field(Stage1Steps.PAIRS, description="(stage, step) to write")


class TrainSFTParams(RunParams):
    """SFT of the policy on an SFTExample step (by default the run's RSFT set)."""

    policy: TrainablePolicy = Field(
        default_factory=TransformersModel,
        description="the model to fine-tune (its path is the base model)",
    )
    sft: SFTTraining = Field(default_factory=_demo_sft, description="training settings")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description=_EXECUTION)
    dataset: StepRef = Field(Stage1Steps.RSFT, description="(stage, step) of the SFT examples")
    train_step: str = Field(Stage1Steps.TRAIN_SFT.step, description="name under checkpoints/")


class TrainDPOParams(RunParams):
    """DPO on a PreferencePair step (by default the run's pairs, from the run's SFT model)."""

    dpo: DPOTraining = Field(default_factory=_demo_dpo, description="training settings")
    base_model: NonBlank | None = Field(
        None,
        description="model to train: bundled name, directory or storage URI (default: this "
        "run's SFT model, checkpoints/stage1_sft/final)",
    )
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description=_EXECUTION)
    dataset: StepRef = Field(Stage1Steps.PAIRS, description="(stage, step) of the pairs")
    train_step: str = Field(Stage1Steps.TRAIN_DPO.step, description="name under checkpoints/")


class RegenerateParams(Stage1DataParams):
    """Nightly regeneration of the Stage I datasets; `run_name` names the dataset.

    Publishes `runs/{run_name}-{YYYYMMDD}` and points `versions/{run_name}/latest.json` at it,
    generating trees only for prompts no earlier version (made with the same settings) has.
    """

    version: str | None = Field(
        None, description="YYYYMMDD of the version to publish (default: today in `timezone`)"
    )
    timezone: str = Field("UTC", description="time zone that decides today's date")

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d{8}", value):
            raise ValueError(f"version {value!r} must be a date written YYYYMMDD")
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"unknown time zone {value!r}") from err
        return value


# ---- the Stage II steps -----------------------------------------------------------------------


class GreedySearchParams(RunParams):
    """Greedy recursive search over a prompts step with a (Stage I) policy and a reward model."""

    policy: ModelSpec = Field(
        default_factory=TransformersModel, description="the Stage I model that searches"
    )
    reward: ModelSpec = Field(default_factory=RulesModel, description="reward model")
    templates_dir: str | None = Field(None, description=_TEMPLATES)
    search: SearchConfig = Field(default_factory=SearchConfig, description="search settings")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description=_EXECUTION)
    source: StepRef = Field(Stage1Steps.PROMPTS, description="(stage, step) of the prompts")
    target: StepRef = Field(Stage2Steps.SEARCH, description="(stage, step) to write")


class SelectTrajectoriesParams(RunParams):
    """Trajectory SFT examples from a greedy-search step."""

    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="rules")
    templates_dir: str | None = Field(None, description=_TEMPLATES)
    source: StepRef = Field(Stage2Steps.SEARCH, description="(stage, step) of the searches")
    target: StepRef = Field(Stage2Steps.TRAJECTORIES, description="(stage, step) to write")


class SampleLongResponsesParams(RunParams):
    """k long responses per prompt of a greedy-search step, from the Stage II SFT model."""

    policy: ModelSpec = Field(
        default_factory=TransformersModel,
        description="the Stage II SFT model (e.g. the URI of checkpoints/stage2_sft/final)",
    )
    long: LongResponseConfig = Field(
        default_factory=LongResponseConfig, description="sampling settings"
    )
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description=_EXECUTION)
    source: StepRef = Field(Stage2Steps.SEARCH, description="(stage, step) of the searches")
    target: StepRef = Field(Stage2Steps.LONG_RESPONSES, description="(stage, step) to write")


class ScoreLongResponsesParams(RunParams):
    """Score the final answers of a long-responses step."""

    reward: ModelSpec = Field(default_factory=RulesModel, description="reward model")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description=_EXECUTION)
    source: StepRef = Field(
        Stage2Steps.LONG_RESPONSES, description="(stage, step) of the long responses"
    )
    target: StepRef = Field(Stage2Steps.LONG_SCORED, description="(stage, step) to write")


class BuildLCPairsParams(RunParams):
    """Length-controlled DPO pairs from a scored long-responses step."""

    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="rules")
    source: StepRef = Field(
        Stage2Steps.LONG_SCORED, description="(stage, step) of the scored responses"
    )
    target: StepRef = Field(Stage2Steps.LC_PAIRS, description="(stage, step) to write")


# ---- test time ---------------------------------------------------------------------------------

TESTTIME = "testtime"
_STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_step_name(value: str) -> str:
    if not _STEP_NAME.match(value):
        raise ValueError(
            f"name {value!r} must start with a letter or digit and hold only letters, digits, "
            "'.', '_' and '-'"
        )
    return value


StepName = Annotated[str, AfterValidator(_check_step_name)]


class RefineParams(RunParams):
    """Test-time refinement: N rounds of critique and refine by a Stage I model, over its own
    answers or another system's (`refine.answers`); every round kept (the 0..N curve)."""

    ingest: IngestConfig = Field(
        default_factory=IngestConfig, description="the prompts (unused with refine.answers)"
    )
    policy: ModelSpec = Field(
        default_factory=TransformersModel, description="the Stage I model that refines"
    )
    reward: ModelSpec | None = Field(
        None, description="scores every round (the scaling curve) and decides keep_best"
    )
    templates_dir: str | None = Field(None, description=_TEMPLATES)
    refine: RefineConfig = Field(default_factory=RefineConfig, description="rounds and sampling")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description=_EXECUTION)
    name: StepName = Field("refine", description="writes testtime/{name} (+ {name}_start)")

    @model_validator(mode="after")
    def _keep_best_needs_reward(self) -> RefineParams:
        if self.refine.keep_best and self.reward is None:
            raise ValueError("refine.keep_best needs a reward model: set `reward`")
        return self

    @property
    def start_step(self) -> StepRef:
        return StepRef(TESTTIME, f"{self.name}_start")

    @property
    def refined_step(self) -> StepRef:
        return StepRef(TESTTIME, self.name)


class ThinkParams(RunParams):
    """Autonomous thinking: a Stage II model answers each prompt with one long response; the
    final answer is parsed after the trajectory marker (format failures kept and counted)."""

    ingest: IngestConfig = Field(default_factory=IngestConfig, description="the prompts")
    policy: ModelSpec = Field(
        default_factory=TransformersModel, description="the Stage II model that thinks"
    )
    think: ThinkConfig = Field(default_factory=ThinkConfig, description="sampling and retries")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description=_EXECUTION)
    name: StepName = Field("think", description="writes testtime/{name}")

    @property
    def step(self) -> StepRef:
        return StepRef(TESTTIME, self.name)


# ---- evaluation --------------------------------------------------------------------------------


class EvaluateParams(RunParams):
    """Compare systems' answers with a baseline's on the same prompts: reward-model and pairwise
    LLM-judge win rates, length-controlled win rates, lengths, every figure with a bootstrap CI;
    a table in storage, plots, AlpacaEval JSON per system and an artifact."""

    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="systems, baseline, statistics"
    )
    reward: ModelSpec | None = Field(
        default_factory=RulesModel, description="reward-model judge (null: none)"
    )
    judge: ModelSpec | None = Field(
        None, description="pairwise LLM judge, both orders per pair (null: none)"
    )
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description=_EXECUTION)

    def check_runnable(self) -> None:
        """What a deployment's defaults may leave open must be set before a run."""
        self.evaluation.check_runnable()
        if self.reward is None and self.judge is None:
            raise ValueError("evaluate: no judge: set `reward`, `judge` or both")
