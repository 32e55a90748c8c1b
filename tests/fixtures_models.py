"""Shared pytest fixtures (registered in conftest.py): the tiny models, loaded once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from avr_core.config import ExecutionConfig, TransformersModel
from avr_core.engines.transformers_backend import TransformersGenerator
from avr_core.models import TINY_MODEL, ensure_tiny_model, ensure_tiny_reward_model


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (converted on first use)."""
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_reward_model_dir() -> Path:
    """The seeded one-logit reward model built on the tiny backbone."""
    return ensure_tiny_reward_model()


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_dir: Path) -> Iterator[TransformersGenerator]:
    """One loaded TransformersGenerator on CPU, shared by every test that needs generations."""
    generator = TransformersGenerator(
        TransformersModel(path=TINY_MODEL),
        ExecutionConfig(batch_size=4, device="cpu"),
        tiny_model_dir,
    )
    yield generator
    generator.close()
