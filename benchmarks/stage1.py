"""Stage I tree-synthesis benchmark: factory throughput vs the raw engine, and time per shard.

On the same prompts in one process:
1. the factory path exactly as the generate/score tasks run it (without Prefect): the step
   protocol of `avr_core.steps` (plan, read each input shard, compute, commit with stats in the
   footer, seal) with the tasks' own per-shard functions from `avr_core.step_kinds`, on a real
   DatasetStore;
2. the raw engine: exactly the `generator.chat` calls the factory made (same conversations, same
   sampling and seeds, recorded in step 1) replayed back to back.
Throughput is generated tokens / second (tokens counted with the model's tokenizer), so the ratio
factory / raw is the factory's overhead. Usage:

    python -m benchmarks.stage1 --prompts 8 --shard-size 4 --max-tokens 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from avr_core.config import ExecutionConfig, RulesModel, TreeConfig, parse_model_spec
from avr_core.engines import load_generator, load_reward_model
from avr_core.ingest import bundled_prompts_path, read_prompts
from avr_core.layout import StepRef
from avr_core.models import resolve_model_dir
from avr_core.reporting import text_table
from avr_core.schemas import Conversation, Lineage, PromptRecord, RefinementTree, Sampling
from avr_core.step_kinds import scoring_shards, tree_shards
from avr_core.steps import (
    ShardEvent,
    ShardOutput,
    Source,
    plan_step,
    run_step,
    split_into_shards,
)
from avr_core.storage import DatasetStore
from avr_core.templates import load_templates

RUN = "bench"
PROMPTS = StepRef("inputs", "prompts")
TREES = StepRef("stage1", "trees")
SCORED = StepRef("stage1", "scored")


@dataclass
class RecordingGenerator:
    """Passes calls through to a generator and keeps them for the raw replay."""

    inner: object
    calls: list[tuple[list[Conversation], Sampling]] = field(default_factory=list)
    seconds: float = 0.0  # time spent inside the engine during the factory run

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def chat(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]:
        self.calls.append((conversations, sampling))
        started = time.perf_counter()
        outputs = self.inner.chat(conversations, sampling)
        self.seconds += time.perf_counter() - started
        return outputs

    def close(self) -> None:
        self.inner.close()


def print_throughput(
    factory_label: str,
    raw: tuple[int, float],
    factory: tuple[int, float],
    engine_seconds: float,
) -> None:
    """The side-by-side table: (tokens, seconds) of the raw replay and of the factory step, their
    ratio against the 0.9 target, and the factory's time outside engine calls."""
    (raw_tokens, raw_s), (factory_tokens, factory_s) = raw, factory
    raw_rate, factory_rate = raw_tokens / raw_s, factory_tokens / factory_s
    print()
    print(
        text_table(
            [
                (
                    "raw engine (same calls replayed)",
                    str(raw_tokens),
                    f"{raw_s:.1f}",
                    f"{raw_rate:.1f}",
                ),
                (factory_label, str(factory_tokens), f"{factory_s:.1f}", f"{factory_rate:.1f}"),
            ],
            ("path", "tokens", "seconds", "tokens/s"),
        )
    )
    ratio = factory_rate / raw_rate
    print(
        f"\nfactory / raw throughput: {ratio:.3f} "
        f"({factory_rate:.1f} / {raw_rate:.1f} tokens/s; target >= 0.9: "
        f"{'met' if ratio >= 0.9 else 'NOT met'})"
    )
    # On a shared machine the engine's speed drifts between the two passes; the time the factory
    # spends outside engine calls is the load-independent measure of its overhead.
    outside = factory_s - engine_seconds
    print(
        f"factory time outside engine calls: {outside:.2f}s of {factory_s:.1f}s "
        f"({100 * outside / factory_s:.2f}%)"
    )


def count_tokens(tokenizer, outputs: list[list[str]]) -> int:
    """Generated tokens in `outputs` (re-tokenised; no special tokens)."""
    texts = [text for samples in outputs for text in samples]
    if not texts:
        return 0
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def tree_texts(trees: list[RefinementTree]) -> list[list[str]]:
    """Every generated text of the trees (answers, critiques, refinements)."""
    return [
        [t.answer]
        + [c.text for c in t.critiques]
        + [r.text for c in t.critiques for r in c.refinements]
        for t in trees
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--x", type=int, default=2)
    parser.add_argument("--y", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--policy", default="smollm2-135m-instruct")
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--root", default=None, help="storage root (default: a temp dir)")
    args = parser.parse_args(argv)

    prompts = read_prompts(bundled_prompts_path()).prompts[: args.prompts]
    shards = split_into_shards(prompts, args.shard_size)
    templates = load_templates()
    tree = TreeConfig(x=args.x, y=args.y, sampling=Sampling(max_tokens=args.max_tokens, seed=0))
    execution = ExecutionConfig(batch_size=args.batch_size)
    spec = parse_model_spec({"backend": args.backend, "path": args.policy})

    started = time.perf_counter()
    generator = RecordingGenerator(load_generator(spec, execution))
    load_s = time.perf_counter() - started
    reward = load_reward_model(RulesModel(), execution)
    tokenizer = getattr(generator.inner, "tokenizer", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(args.policy))

    # Warm-up (first-call kernel selection, allocator growth) so neither side pays it.
    generator.inner.chat([prompts[0].messages], tree.sampling.model_copy(update={"max_tokens": 4}))

    root = args.root or tempfile.mkdtemp(prefix="avr-bench-")
    store = DatasetStore(root)
    # The input step, as ingest writes it: shards + manifest.
    inputs = plan_step(store, RUN, PROMPTS, PromptRecord, {"bench": 1}, shard_count=len(shards))
    run_step(inputs, lambda index, _: ShardOutput(shards[index]))
    lineage = Lineage(run=RUN, stage=TREES.stage, step=TREES.step)
    per_shard: dict[int, dict[str, float]] = {}

    def timing(phase: str) -> Callable[[ShardEvent], None]:
        def progress(event: ShardEvent) -> None:
            entry = per_shard.setdefault(event.index, {})
            entry[phase] = event.compute_seconds
            entry["storage"] = entry.get("storage", 0.0) + event.storage_seconds
            entry["rows"] = event.rows

        return progress

    factory_start = time.perf_counter()
    trees_plan = plan_step(
        store, RUN, TREES, RefinementTree, {"bench": 1}, [Source(PROMPTS, PromptRecord)]
    )
    trees_result = run_step(
        trees_plan,
        tree_shards(lambda: generator, templates, tree, lineage),
        progress=timing("generation"),
    )
    scored_plan = plan_step(
        store, RUN, SCORED, RefinementTree, {"bench": 1}, [Source(TREES, RefinementTree)]
    )
    run_step(scored_plan, scoring_shards(lambda: reward), progress=timing("scoring"))
    factory_s = time.perf_counter() - factory_start
    factory_tokens = 0
    rows = []
    for index in trees_plan.indices:
        trees = store.read_shard_records(RUN, *TREES, index, RefinementTree)
        tokens = count_tokens(tokenizer, tree_texts(trees))
        factory_tokens += tokens
        phases = per_shard[index]
        rows.append(
            (
                str(index),
                str(len(shards[index])),
                str(tokens),
                f"{phases['generation']:.2f}",
                f"{phases['scoring']:.3f}",
                f"{phases['storage']:.3f}",
            )
        )
    engine_calls = trees_result.counts.get("engine_calls", 0)

    raw_start = time.perf_counter()
    raw_tokens = 0
    for conversations, call_sampling in generator.calls:
        raw_tokens += count_tokens(tokenizer, generator.inner.chat(conversations, call_sampling))
    raw_s = time.perf_counter() - raw_start
    generator.close()

    print(
        f"policy {spec.model_id}, {len(prompts)} prompts in {len(shards)} shards, "
        f"x={args.x} y={args.y}, max_tokens={args.max_tokens}, batch_size={args.batch_size}, "
        f"model load {load_s:.1f}s, {engine_calls} engine calls, store {root}"
    )
    print()
    print("Per shard (seconds):")
    print(
        text_table(
            rows,
            ("shard", "prompts", "tokens", "generation", "scoring", "storage (both steps)"),
        )
    )
    print_throughput(
        "tree synthesis step (factory)",
        (raw_tokens, raw_s),
        (factory_tokens, factory_s),
        generator.seconds,
    )


if __name__ == "__main__":
    main()
