"""What tasks share to reach storage and engines: settings, the store, lazily loaded engines and
the GPU slot. Settings are read here, at the edge, and passed down into avr_core.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from prefect.concurrency.sync import concurrency

from avr_core.config import ExecutionConfig, ModelSpec, OpenAIModel, RulesModel
from avr_core.devices import visible_cuda_devices
from avr_core.engines import load_generator, load_reward_model
from avr_core.engines.base import Generator, RewardModel
from avr_core.models import resolve_model_dir
from avr_core.rootfs import StorageRetry
from avr_core.settings import AvrSettings
from avr_core.storage import DatasetStore

__all__ = [
    "GPU_CONCURRENCY_LIMIT",
    "LazyEngine",
    "gpu_limit_name",
    "gpu_slot",
    "local_model_dir",
    "open_generator",
    "open_reward_model",
    "open_store",
    "quiet_progress_bars_off_terminal",
    "settings",
    "uses_local_gpu",
]

GPU_CONCURRENCY_LIMIT = "gpu"


def gpu_limit_name(worker_id: str) -> str:
    """The concurrency limit of one worker's GPU(s): `gpu:{worker_id}`.

    Keyed per worker (Prefect's per-worker task concurrency pattern): with one global `gpu`
    limit, an engine on worker A would wait for a slot that worker B's engine holds, though each
    worker has GPUs of its own.
    """
    return f"{GPU_CONCURRENCY_LIMIT}:{worker_id}"


def quiet_progress_bars_off_terminal() -> None:
    """No model-loading or trainer progress bars when nobody watches a terminal.

    A worker's stderr goes to a log: a bar redrawn per batch would flood it. Set before
    transformers/huggingface_hub/tqdm first draw (they read these variables), and inherited by
    the trainer child process.
    """
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def settings() -> AvrSettings:
    """The worker's settings, read from its environment now (a worker may be reconfigured)."""
    return AvrSettings()


def open_store(root: str, config: AvrSettings | None = None) -> DatasetStore:
    """The dataset store at `root`, with the settings' storage options and retry budget."""
    config = config or settings()
    retry = StorageRetry(max_elapsed_s=config.storage_retry_seconds)
    return DatasetStore(root, config.storage_options, retry)


def local_model_dir(spec: ModelSpec, config: AvrSettings) -> Path | None:
    """The local directory of a model with weights (bundled, local, or fetched from storage)."""
    if isinstance(spec, OpenAIModel | RulesModel):
        return None  # served elsewhere, or no weights at all
    return resolve_model_dir(
        spec.path, config.storage_options, config.cache_dir, config.model_cache_bytes
    )


def open_generator(spec: ModelSpec, execution: ExecutionConfig) -> Generator:
    """Load the policy named by `spec` (remote checkpoints fetched first)."""
    quiet_progress_bars_off_terminal()
    config = settings()
    model_dir = local_model_dir(spec, config)
    return load_generator(spec, execution, model_dir=model_dir, settings=config)


def open_reward_model(spec: ModelSpec, execution: ExecutionConfig) -> RewardModel:
    """Load the reward model named by `spec` (remote checkpoints fetched first)."""
    quiet_progress_bars_off_terminal()
    config = settings()
    model_dir = local_model_dir(spec, config)
    return load_reward_model(spec, execution, model_dir=model_dir, settings=config)


def uses_local_gpu(spec: ModelSpec | None, execution: ExecutionConfig) -> bool:
    """Whether an engine (or, with spec None, a trainer) would run on a GPU of this worker."""
    if isinstance(spec, OpenAIModel | RulesModel):
        return False  # scored by rules or served elsewhere: nothing on this worker's GPU
    if execution.device != "auto":
        return execution.device == "cuda"
    return visible_cuda_devices(settings().cuda_visible_devices) > 0


@contextlib.contextmanager
def gpu_slot(spec: ModelSpec | None, execution: ExecutionConfig) -> Iterator[None]:
    """Hold the slot of this worker's GPU limit (`gpu:{AVR_WORKER_ID}`) while an engine or
    trainer is on its GPU.

    Two engines must never share one GPU: operators create one limit per worker, of 1
    (`prefect gcl create gpu:gpu-0 --limit 1`; `avr workers` prints them). Without that limit
    (embedded runs) the slot is not enforced (strict=False), and CPU-only work never asks.
    """
    if not uses_local_gpu(spec, execution):
        yield
        return
    with concurrency(gpu_limit_name(settings().worker_id), occupy=1, strict=False):
        yield


class _Closable(Protocol):
    def close(self) -> None: ...


Engine = TypeVar("Engine", bound=_Closable)


@dataclass
class LazyEngine(Generic[Engine]):
    """Loads an engine on first use (never when every shard is already done) and closes it."""

    load: Callable[[], Engine]
    engine: Engine | None = None
    load_seconds: float = 0.0

    def get(self) -> Engine:
        if self.engine is None:
            started = time.perf_counter()
            self.engine = self.load()
            self.load_seconds = time.perf_counter() - started
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
