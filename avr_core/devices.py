"""Which devices a process would use, found without initialising CUDA in this process."""

from __future__ import annotations

import shutil
import subprocess
from typing import Literal

__all__ = ["train_on_cpu", "visible_cuda_devices"]


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
