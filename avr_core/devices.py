"""Which devices a process would use (found without initialising CUDA), and how many GPUs its
engines take."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel

from avr_core.config import ExecutionConfig, ModelSpec, TransformersModel, VLLMModel

__all__ = [
    "engine_gpus",
    "gpus_for",
    "models_in",
    "sharing_gpu_memory",
    "train_on_cpu",
    "visible_cuda_devices",
]


def visible_cuda_devices(cuda_visible_devices: str | None) -> int:
    """GPUs a child process would see: the `CUDA_VISIBLE_DEVICES` value given, else nvidia-smi."""
    if cuda_visible_devices is not None:
        return len([d for d in cuda_visible_devices.split(",") if d.strip() and d.strip() != "-1"])
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return 0
    try:
        listing = subprocess.run(
            [nvidia_smi, "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def train_on_cpu(device: Literal["auto", "cpu", "cuda"], cuda_available: bool) -> bool:
    """Whether the trainer runs on the CPU: `execution.device` decides, auto follows CUDA."""
    if device == "cuda" and not cuda_available:
        raise RuntimeError("execution.device is 'cuda' but no CUDA device is available here")
    return device == "cpu" or (device == "auto" and not cuda_available)


def engine_gpus(spec: ModelSpec | None) -> int:
    """GPUs one engine of `spec` takes on its worker: tensor x pipeline parallel for vLLM, one for
    transformers, none for rules rewards and served (openai) models."""
    if isinstance(spec, VLLMModel):
        return spec.tensor_parallel_size * spec.pipeline_parallel_size
    return 1 if isinstance(spec, TransformersModel) else 0


def gpus_for(specs: Iterable[ModelSpec | None]) -> int:
    """GPUs a worker needs to load these engines: the largest one's. Engines in one process all
    start on the worker's first GPU, so two engines share GPUs rather than add them up."""
    return max((engine_gpus(spec) for spec in specs), default=0)


def models_in(params: BaseModel) -> list[ModelSpec]:
    """Every local model (transformers, vLLM) a flow's parameters name, however deep: policy,
    reward, judge, the systems of an evaluation."""
    found: list[ModelSpec] = []

    def visit(value: object) -> None:
        if isinstance(value, TransformersModel | VLLMModel):
            found.append(value)
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                visit(getattr(value, name))
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    visit(params)
    return found


def sharing_gpu_memory(
    execution: ExecutionConfig, specs: Iterable[ModelSpec | None]
) -> ExecutionConfig:
    """The execution settings for engines loaded together in one process (a greedy search's policy
    and reward model): each in-process vLLM engine takes its share of
    `execution.gpu_memory_utilization`, since each asks for that fraction of the same first GPU and
    the second would find too little memory free."""
    engines = sum(1 for spec in specs if isinstance(spec, VLLMModel))
    if engines < 2:
        return execution
    share = execution.gpu_memory_utilization / engines
    return execution.model_copy(update={"gpu_memory_utilization": share})
