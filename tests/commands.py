"""Commands the scale-out test and benchmark both run, built in one place: `avr run
generate-trees` with a step's shards over `workers` slices on a Prefect server."""

from __future__ import annotations

import sys
from pathlib import Path

from flows.config_files import TINY_CONFIG
from flows.deployments import GPU_POOL

__all__ = ["ONE_THREAD", "SLICE_DEPLOYMENT", "generate_trees_command"]

SLICE_DEPLOYMENT = f"step-slice/{GPU_POOL}"
# Each worker's children on one thread: two workers on two cores do not fight over them.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def generate_trees_command(root: Path, run: str, workers: int, max_tokens: int) -> list[str]:
    """`avr run generate-trees` on the tiny config (one critique, one refinement), as a user
    types it, with `workers` slices on the step-slice deployment."""
    overrides = {
        "run_name": run,
        "storage_root": str(root),
        "tree.x": 1,
        "tree.y": 1,
        "tree.sampling.max_tokens": max_tokens,
        "execution.workers": workers,
        "execution.slice_deployment": SLICE_DEPLOYMENT,
    }
    command = [sys.executable, "-m", "flows.cli", "run", "generate-trees"]
    command += ["--config", str(TINY_CONFIG)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    return command
