"""Engines behind the `Generator` / `RewardModel` protocols, chosen by the model spec's class.

No backend module imports vLLM or torch at import time (they do so inside the functions that
need them), so `import avr_core.engines` works on a CPU machine without vLLM, and the `rules` and
`openai` backends never load torch.

Infrastructure reaches the engines only through the factories' arguments: `model_dir` (a local
model the caller already resolved, e.g. from storage into its cache) and `settings` (API key, CPU
KV-cache size). Without them the defaults apply: the default cache, no API key, a 1 GiB cache.
"""

from __future__ import annotations

from pathlib import Path

from avr_core.config import (
    ExecutionConfig,
    ModelSpec,
    OpenAIModel,
    RulesModel,
    TransformersModel,
    VLLMModel,
)
from avr_core.engines.base import EngineError, Generator, RewardModel, messages_as_dicts
from avr_core.engines.openai_backend import OpenAIGenerator, OpenAIRewardModel
from avr_core.engines.rules import RulesRewardModel
from avr_core.engines.transformers_backend import TransformersGenerator, TransformersRewardModel
from avr_core.engines.vllm_backend import DEFAULT_CPU_KV_CACHE_GIB, VLLMGenerator, VLLMRewardModel
from avr_core.settings import AvrSettings

__all__ = [
    "EngineError",
    "Generator",
    "RewardModel",
    "UnsupportedBackendError",
    "load_generator",
    "load_reward_model",
    "messages_as_dicts",
]


class UnsupportedBackendError(ValueError):
    """The spec names a backend that cannot play the asked role (e.g. `rules` as a generator)."""


def _api_key(settings: AvrSettings | None) -> str | None:
    return settings.api_key() if settings is not None else None


def _kv_cache_gib(settings: AvrSettings | None) -> float:
    return settings.vllm_cpu_kv_cache_gib if settings is not None else DEFAULT_CPU_KV_CACHE_GIB


def _threads_bind(settings: AvrSettings | None) -> str | None:
    return settings.vllm_cpu_threads_bind if settings is not None else None


def load_generator(
    spec: ModelSpec,
    execution: ExecutionConfig | None = None,
    *,
    model_dir: Path | None = None,
    settings: AvrSettings | None = None,
) -> Generator:
    """A loaded chat generator for `spec` (transformers, vllm or openai).

    `model_dir` is used by the local backends (transformers, vllm) and ignored by `openai`.
    """
    execution = execution or ExecutionConfig()
    match spec:
        case TransformersModel():
            return TransformersGenerator(spec, execution, model_dir)
        case VLLMModel():
            return VLLMGenerator(
                spec, execution, model_dir, _kv_cache_gib(settings), _threads_bind(settings)
            )
        case OpenAIModel():
            return OpenAIGenerator(spec, execution, api_key=_api_key(settings))
        case RulesModel():
            raise UnsupportedBackendError(
                "backend 'rules' only scores responses and cannot generate: "
                "use transformers, vllm or openai for the generator"
            )
    raise UnsupportedBackendError(f"unknown generator backend {_backend_name(spec)!r}")


def load_reward_model(
    spec: ModelSpec,
    execution: ExecutionConfig | None = None,
    *,
    model_dir: Path | None = None,
    settings: AvrSettings | None = None,
) -> RewardModel:
    """A loaded reward model for `spec` (transformers, vllm, openai or rules).

    `model_dir` is used by the local backends (transformers, vllm) and ignored by the others.
    """
    execution = execution or ExecutionConfig()
    match spec:
        case TransformersModel():
            return TransformersRewardModel(spec, execution, model_dir)
        case VLLMModel():
            return VLLMRewardModel(
                spec, execution, model_dir, _kv_cache_gib(settings), _threads_bind(settings)
            )
        case OpenAIModel():
            return OpenAIRewardModel(spec, execution, api_key=_api_key(settings))
        case RulesModel():
            return RulesRewardModel(spec, execution)
    raise UnsupportedBackendError(f"unknown reward model backend {_backend_name(spec)!r}")


def _backend_name(spec: object) -> str:
    return str(getattr(spec, "backend", type(spec).__name__))
