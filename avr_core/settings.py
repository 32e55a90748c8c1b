"""Infrastructure settings: where storage is and how to reach it, caches, credentials, code version.

One `AvrSettings` object is built at the edge (a Prefect task, the CLI, the training child's job)
from `AVR_*` environment variables and passed down; nothing else in `avr_core` reads the
environment. Settings never feed a fingerprint and never reach flow parameters, run records or
manifests (credentials live here).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["AvrSettings", "default_cache_dir"]


def default_cache_dir() -> Path:
    """~/.cache/avr-factory: converted models, fetched checkpoints, trainer scratch."""
    return Path.home() / ".cache" / "avr-factory"


class AvrSettings(BaseSettings):
    """Everything the factory needs from its environment, read once (`AvrSettings()`)."""

    model_config = SettingsConfigDict(env_prefix="AVR_", extra="ignore", frozen=True)

    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options as a JSON object (endpoint_url, key, secret, ...)",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="converted bundled models, models fetched from storage, trainer scratch",
    )
    git_commit: str | None = Field(
        None, description="code version when the tree has no .git (the Docker image bakes it in)"
    )
    openai_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("AVR_OPENAI_API_KEY", "OPENAI_API_KEY"),
        description="bearer token for OpenAI-compatible servers",
    )
    vllm_cpu_kv_cache_gib: float = Field(
        1.0,
        gt=0,
        description="KV cache size of a vLLM engine on a CPU (a bound on host memory per engine)",
    )
    vllm_cpu_threads_bind: str | None = Field(
        None,
        validation_alias=AliasChoices("AVR_VLLM_CPU_THREADS_BIND", "VLLM_CPU_OMP_THREADS_BIND"),
        description="CPUs a vLLM CPU engine binds to, e.g. 0-7 (default: every CPU this process "
        "may use)",
    )
    storage_retry_seconds: float = Field(
        180.0,
        ge=0,
        description="how long one storage call keeps retrying connection errors and 5xx/503 "
        "SlowDown answers (exponential backoff with jitter) before its shard fails",
    )
    model_cache_gb: float = Field(
        20.0,
        gt=0,
        description="size budget of the cache of models fetched from storage; least recently "
        "used models are evicted beyond it",
    )
    lease_stale_seconds: float = Field(
        300.0,
        gt=0,
        description="a run's lease without a heartbeat for this long may be taken over by "
        "another process (its owner is presumed dead)",
    )
    lease_heartbeat_seconds: float = Field(
        30.0, gt=0, description="how often the process holding a run's lease renews it"
    )
    worker_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        description="this worker's name (default: the host name): its GPU concurrency limit is "
        "gpu:{worker_id}, and each shard it computes records it; give every GPU worker of a "
        "box its own (gpu-0, gpu-1, ...; `avr workers` prints the commands)",
    )
    cuda_visible_devices: str | None = Field(
        None,
        validation_alias=AliasChoices("CUDA_VISIBLE_DEVICES"),
        description="the GPUs this process may use (set by the worker); None = all",
    )

    @field_validator("storage_options", mode="before")
    @classmethod
    def _storage_options_object(cls, value: Any) -> Any:
        # pydantic-settings decodes the JSON; anything but an object is a configuration error.
        if value is not None and not isinstance(value, dict):
            raise ValueError(
                f"AVR_STORAGE_OPTIONS must be a JSON object, got {type(value).__name__}"
            )
        return value or {}

    @property
    def model_cache_bytes(self) -> int:
        return int(self.model_cache_gb * 10**9)

    def api_key(self) -> str | None:
        """The OpenAI-compatible bearer token, or None."""
        return self.openai_api_key.get_secret_value() if self.openai_api_key else None
