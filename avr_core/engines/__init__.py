"""Engines behind the `Generator` / `RewardModel` protocols, chosen by `ModelSpec.backend`.

Backends are imported only when asked for, so `import avr_core.engines` works on a CPU machine
without vLLM (and without loading torch for the `rules` or `openai` backends).
"""

from __future__ import annotations

from avr_core.config import ExecutionConfig, ModelSpec
from avr_core.engines.base import EngineError, Generator, RewardModel

__all__ = [
    "EngineError",
    "Generator",
    "RewardModel",
    "UnsupportedBackendError",
    "load_generator",
    "load_reward_model",
]


class UnsupportedBackendError(ValueError):
    """The spec names a backend that cannot play the asked role (e.g. `rules` as a generator)."""


def load_generator(spec: ModelSpec, execution: ExecutionConfig | None = None) -> Generator:
    """A loaded chat generator for `spec` (transformers, vllm or openai)."""
    execution = execution or ExecutionConfig()
    if spec.backend == "transformers":
        from avr_core.engines.transformers_backend import TransformersGenerator

        return TransformersGenerator(spec, execution)
    if spec.backend == "vllm":
        from avr_core.engines.vllm_backend import VLLMGenerator

        return VLLMGenerator(spec, execution)
    if spec.backend == "openai":
        from avr_core.engines.openai_backend import OpenAIGenerator

        return OpenAIGenerator(spec, execution)
    if spec.backend == "rules":
        raise UnsupportedBackendError(
            "backend 'rules' only scores responses and cannot generate: "
            "use transformers, vllm or openai for the generator"
        )
    raise UnsupportedBackendError(f"unknown generator backend {spec.backend!r}")


def load_reward_model(spec: ModelSpec, execution: ExecutionConfig | None = None) -> RewardModel:
    """A loaded reward model for `spec` (transformers, vllm, openai or rules)."""
    execution = execution or ExecutionConfig()
    if spec.backend == "transformers":
        from avr_core.engines.transformers_backend import TransformersRewardModel

        return TransformersRewardModel(spec, execution)
    if spec.backend == "vllm":
        from avr_core.engines.vllm_backend import VLLMRewardModel

        return VLLMRewardModel(spec, execution)
    if spec.backend == "openai":
        from avr_core.engines.openai_backend import OpenAIRewardModel

        return OpenAIRewardModel(spec, execution)
    if spec.backend == "rules":
        from avr_core.engines.rules import RulesRewardModel

        return RulesRewardModel(spec, execution)
    raise UnsupportedBackendError(f"unknown reward model backend {spec.backend!r}")
