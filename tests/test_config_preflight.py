"""Pre-flight: configs that cannot work fail when they are built, before any step runs."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from avr_core.config import (
    IngestConfig,
    OpenAIModel,
    RulesModel,
    SearchConfig,
    TrainingConfig,
    TransformersModel,
    VLLMModel,
    parse_model_spec,
)
from flows.params import (
    AvrParams,
    GenerateTreesParams,
    GreedySearchParams,
    IngestParams,
    RegenerateParams,
    Stage1Params,
    Stage2Params,
    TrainDPOParams,
    TrainSFTParams,
)

BLANK = ["", " ", "\t\n"]


@pytest.mark.parametrize("path", BLANK, ids=repr)
@pytest.mark.parametrize("backend", ["transformers", "vllm", "openai"])
def test_a_blank_model_path_is_refused_for_every_backend(backend: str, path: str) -> None:
    spec: dict[str, Any] = {"backend": backend, "path": path}
    if backend == "openai":
        spec["base_url"] = "http://localhost:8000/v1"
    with pytest.raises(ValidationError, match=r"path\n"):
        parse_model_spec(spec)
    with pytest.raises(ValidationError, match=rf"policy\.{backend}\.path\n"):
        GenerateTreesParams(policy=spec)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", BLANK, ids=repr)
def test_blank_paths_are_refused_wherever_a_model_is_named(path: str) -> None:
    with pytest.raises(ValidationError, match=r"base_url\n"):
        OpenAIModel(path="m", base_url=path)
    with pytest.raises(ValidationError, match=r"policy\.transformers\.path\n"):
        Stage1Params(policy={"backend": "transformers", "path": path})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"base_model\n"):
        TrainDPOParams(base_model=path)
    # Names that say something stay accepted.
    assert TransformersModel(path="smollm2-135m-instruct").path == "smollm2-135m-instruct"
    assert VLLMModel(path="/models/x").path == "/models/x"
    assert TrainDPOParams(base_model=None).base_model is None


@pytest.mark.parametrize("steps", [0, -2, -100])
def test_max_steps_must_be_positive_or_minus_one(steps: int) -> None:
    with pytest.raises(ValidationError, match="max_steps"):
        TrainingConfig(max_steps=steps)
    with pytest.raises(ValidationError, match=r"sft\.max_steps"):
        TrainSFTParams(sft={"max_steps": steps})  # type: ignore[arg-type]
    assert TrainingConfig(max_steps=-1).max_steps == -1  # train by epochs
    # The form shows the bound too.
    assert TrainingConfig.model_json_schema()["properties"]["max_steps"]["minimum"] == -1


def test_an_unknown_pass_through_key_fails_the_parameters_not_the_trainer() -> None:
    with pytest.raises(
        ValidationError, match=r"sft\n.*'warmup_stepz' is not a field of trl\.SFTConfig"
    ):
        Stage1Params(sft=TrainingConfig(extra={"warmup_stepz": 3}))
    with pytest.raises(ValidationError, match=r"did you mean 'warmup_steps'"):
        TrainSFTParams(sft={"extra": {"warmup_stepz": 3}})  # type: ignore[arg-type]
    # DPO-only keys are DPO's: refused for SFT, accepted for DPO.
    with pytest.raises(ValidationError, match=r"'loss_weights' is not a field of trl\.SFTConfig"):
        Stage1Params(sft=TrainingConfig(extra={"loss_weights": [1.0]}))
    dpo = TrainDPOParams(dpo={"extra": {"loss_weights": [1.0], "warmup_steps": 2}})  # type: ignore[arg-type]
    assert dpo.dpo.extra == {"loss_weights": [1.0], "warmup_steps": 2}
    with pytest.raises(ValidationError, match=r"dpo\n.*'nope' is not a field of trl\.DPOConfig"):
        TrainDPOParams(dpo={"extra": {"nope": 1}})  # type: ignore[arg-type]


def test_a_pass_through_key_the_adapter_sets_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"'learning_rate' is set by the adapter"):
        Stage1Params(dpo=TrainingConfig(extra={"learning_rate": 1.0}))


def test_a_token_limit_needs_a_policy_with_a_tokenizer() -> None:
    with pytest.raises(ValidationError, match="max_prompt_tokens needs the policy's tokenizer"):
        IngestParams(ingest=IngestConfig(max_prompt_tokens=512))
    with pytest.raises(ValidationError, match="the rules policy has none"):
        RegenerateParams(ingest=IngestConfig(max_prompt_tokens=512), policy=RulesModel())
    served = OpenAIModel(path="m", base_url="http://localhost:8000/v1")
    with pytest.raises(ValidationError, match="the openai policy has none"):
        RegenerateParams(ingest=IngestConfig(max_prompt_tokens=512), policy=served)
    assert Stage1Params(ingest=IngestConfig(max_prompt_tokens=512)).ingest.max_prompt_tokens


@pytest.mark.parametrize("params_model", [Stage2Params, AvrParams])
def test_stage2_training_needs_a_closing_round(params_model: type[Stage2Params]) -> None:
    # One round can never close a trajectory: the flow would search every prompt, then fail.
    with pytest.raises(ValidationError, match=r"search\.max_rounds must be at least 2"):
        params_model(search=SearchConfig(max_rounds=1))
    assert params_model(search=SearchConfig(max_rounds=2)).search.max_rounds == 2
    # the search step alone may stop after one round
    assert GreedySearchParams(search=SearchConfig(max_rounds=1)).search.max_rounds == 1
