"""vLLM backend: pure helpers everywhere, real engines in the second environment (`-m vllm`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from avr_core.config import ExecutionConfig, VLLMModel
from avr_core.engines.base import EngineError
from avr_core.engines.vllm_backend import (
    bind_cpu_threads,
    build_engine_kwargs,
    build_serve_command,
    checkpoint_dtype,
    compact_cpu_list,
    cpu_engine_settings,
)
from avr_core.models import TINY_MODEL, TINY_REWARD_MODEL
from avr_core.schemas import Conversation, Message, Sampling


def test_compact_cpu_list_merges_runs() -> None:
    assert compact_cpu_list({0, 1}) == "0-1"
    assert compact_cpu_list([5, 0, 2, 1]) == "0-2,5"
    assert compact_cpu_list({3}) == "3"


def test_cpu_settings_cap_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = cpu_engine_settings(ExecutionConfig(gpu_memory_utilization=0.9), kv_cache_gib=0.5)
    assert settings == {
        "enforce_eager": True,
        "gpu_memory_utilization": 0.5,
        "kv_cache_memory_bytes": 2**29,
    }
    # The size is the argument alone: the environment is not consulted.
    monkeypatch.setenv("AVR_VLLM_CPU_KV_CACHE_GIB", "8")
    assert cpu_engine_settings(ExecutionConfig())["kv_cache_memory_bytes"] == 2**30
    kwargs = build_engine_kwargs(
        Path("m"), VLLMModel(path="m"), ExecutionConfig(), "generate", True, cpu_kv_cache_gib=2.0
    )
    assert kwargs["kv_cache_memory_bytes"] == 2 * 2**30


def test_bind_cpu_threads_hands_the_binding_to_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "stale")
    assert bind_cpu_threads("0-3") == "0-3"
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"
    if hasattr(os, "sched_getaffinity"):
        every_core = compact_cpu_list(os.sched_getaffinity(0))
        assert bind_cpu_threads() == every_core
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == every_core


def _model_dir(tmp_path: Path, dtype: str) -> Path:
    (tmp_path / "config.json").write_text(f'{{"dtype": "{dtype}"}}')
    return tmp_path


def test_reward_models_keep_checkpoint_precision(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, "float32")
    assert checkpoint_dtype(model_dir) == "float32"
    assert checkpoint_dtype(tmp_path / "missing") == "auto"
    spec = VLLMModel(path=str(model_dir))
    pooling = build_engine_kwargs(model_dir, spec, ExecutionConfig(), "pooling", on_cpu=False)
    generate = build_engine_kwargs(model_dir, spec, ExecutionConfig(), "generate", on_cpu=False)
    assert pooling["dtype"] == "float32" and generate["dtype"] == "auto"
    assert generate["enable_prefix_caching"] is True and "enforce_eager" not in generate
    explicit = VLLMModel(path=str(model_dir), dtype="bfloat16")
    assert (
        build_engine_kwargs(model_dir, explicit, ExecutionConfig(), "pooling", False)["dtype"]
        == "bfloat16"
    )


def test_serve_command_mirrors_engine_kwargs(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, "float32")
    spec = VLLMModel(path=str(model_dir))
    command = build_serve_command(
        ["vllm", "serve"], model_dir, spec, ExecutionConfig(), "pooling", True, "rm", port=9000
    )
    assert command[:4] == ["vllm", "serve", "--model", str(model_dir)]
    joined = " ".join(command)
    for part in ["--served-model-name rm", "--port 9000", "--runner pooling", "--dtype float32"]:
        assert part in joined
    assert "--enforce-eager" in command and "--enable-prefix-caching" in command


# --- real engines (second environment, see scripts/setup_vllm_env.sh) ---

CONVERSATIONS: list[Conversation] = [
    [Message(role="user", content="Name a colour.")],
    [
        Message(role="system", content="You answer in one short sentence."),
        Message(role="user", content="What is the capital of Italy?"),
    ],
]


@pytest.mark.vllm
@pytest.mark.slow
def test_generates_n_samples_per_conversation_in_order(vllm_generator) -> None:
    assert vllm_generator.model_id == f"vllm:{TINY_MODEL}"
    sampling = Sampling(n=2, max_tokens=8, seed=11)
    outputs = vllm_generator.chat(CONVERSATIONS, sampling)
    assert [len(samples) for samples in outputs] == [2, 2]
    assert all(text.strip() for samples in outputs for text in samples)
    # Same seed, same samples; each conversation's samples stay with it when the order changes.
    reversed_outputs = vllm_generator.chat(CONVERSATIONS[::-1], sampling)
    assert reversed_outputs == outputs[::-1]
    greedy = vllm_generator.chat(CONVERSATIONS[1:], Sampling(n=1, temperature=0.0, max_tokens=8))
    assert "Rome" in greedy[0][0]
    assert vllm_generator.chat([], sampling) == []


@pytest.mark.vllm
@pytest.mark.slow
def test_reward_matches_transformers(vllm_reward_model, reward_reference) -> None:
    # Loaded from a synced copy (see the fixture): lineage still names the spec, not the copy.
    assert vllm_reward_model.model_id == f"vllm:{TINY_REWARD_MODEL}"
    scores = vllm_reward_model.score(reward_reference.conversations)
    assert len(scores) == len(reward_reference.scores)
    assert all(type(score) is float for score in scores)
    for got, want in zip(scores, reward_reference.scores, strict=True):
        assert math.isclose(got, want, rel_tol=1e-2, abs_tol=1e-3), (got, want)
    # Scores are per conversation, not per batch position.
    assert vllm_reward_model.score(reward_reference.conversations[::-1]) == pytest.approx(
        scores[::-1], rel=1e-4
    )


@pytest.mark.vllm
@pytest.mark.slow
def test_too_long_conversation_names_its_index(vllm_reward_model) -> None:
    long_text = "word " * 10_000
    conversations = [
        [Message(role="user", content="hi"), Message(role="assistant", content="hello")],
        [Message(role="user", content="hi"), Message(role="assistant", content=long_text)],
    ]
    with pytest.raises(EngineError, match="conversation 1 has"):
        vllm_reward_model.score(conversations)
