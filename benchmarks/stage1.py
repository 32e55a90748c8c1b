"""Stage I tree-synthesis benchmark: factory throughput vs the raw engine, and time per shard.

On the same prompts in one process:
1. the factory path, shard by shard as the generate/score tasks run it: `generate_trees` (answers,
   critiques, refinements), `score_trees`, and committing both shards to a DatasetStore;
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
from dataclasses import dataclass, field

from avr_core.config import ExecutionConfig, ModelSpec
from avr_core.engines import load_generator, load_reward_model
from avr_core.ingest import bundled_prompts_path, read_prompts, shard_prompts
from avr_core.models import resolve_model_dir
from avr_core.reporting import text_table
from avr_core.schemas import Lineage, Message, RefinementTree, Sampling
from avr_core.storage import DatasetStore
from avr_core.synthesis import generate_trees, score_trees
from avr_core.templates import load_templates


@dataclass
class RecordingGenerator:
    """Passes calls through to a generator and keeps them for the raw replay."""

    inner: object
    calls: list[tuple[list[list[Message]], Sampling]] = field(default_factory=list)
    seconds: float = 0.0  # time spent inside the engine during the factory run

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def chat(self, conversations: list[list[Message]], sampling: Sampling) -> list[list[str]]:
        self.calls.append((conversations, sampling))
        started = time.perf_counter()
        outputs = self.inner.chat(conversations, sampling)
        self.seconds += time.perf_counter() - started
        return outputs

    def close(self) -> None:
        self.inner.close()


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
    shards = shard_prompts(prompts, args.shard_size)
    templates = load_templates()
    sampling = Sampling(max_tokens=args.max_tokens, seed=0)
    execution = ExecutionConfig(batch_size=args.batch_size)
    spec = ModelSpec(backend=args.backend, path=args.policy)

    started = time.perf_counter()
    generator = RecordingGenerator(load_generator(spec, execution))
    load_s = time.perf_counter() - started
    reward = load_reward_model(ModelSpec(backend="rules", path="constraints"), execution)
    tokenizer = getattr(generator.inner, "tokenizer", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(args.policy))

    # Warm-up (first-call kernel selection, allocator growth) so neither side pays it.
    generator.inner.chat([prompts[0].messages], sampling.model_copy(update={"max_tokens": 4}))

    root = args.root or tempfile.mkdtemp(prefix="avr-bench-")
    store = DatasetStore(root)
    lineage = Lineage(run="bench", stage="stage1", step="trees")
    rows, factory_tokens = [], 0
    factory_start = time.perf_counter()
    for index, shard in enumerate(shards):
        t0 = time.perf_counter()
        trees, stats = generate_trees(
            generator, shard, templates, args.x, args.y, sampling, False, 0, lineage
        )
        t1 = time.perf_counter()
        scored = score_trees(reward, trees)
        t2 = time.perf_counter()
        store.write_shard("bench", "stage1", "trees", index, trees, RefinementTree, "bench")
        store.write_shard("bench", "stage1", "scored", index, scored, RefinementTree, "bench")
        t3 = time.perf_counter()
        tokens = count_tokens(tokenizer, tree_texts(trees))
        factory_tokens += tokens
        rows.append(
            (
                str(index),
                str(len(shard)),
                str(stats.engine_calls),
                str(tokens),
                f"{t1 - t0:.2f}",
                f"{t2 - t1:.3f}",
                f"{t3 - t2:.3f}",
                f"{t3 - t0:.2f}",
            )
        )
    factory_s = time.perf_counter() - factory_start

    raw_start = time.perf_counter()
    raw_tokens = 0
    for conversations, call_sampling in generator.calls:
        raw_tokens += count_tokens(tokenizer, generator.inner.chat(conversations, call_sampling))
    raw_s = time.perf_counter() - raw_start
    generator.close()

    print(
        f"policy {spec.model_id}, {len(prompts)} prompts in {len(shards)} shards, "
        f"x={args.x} y={args.y}, max_tokens={args.max_tokens}, batch_size={args.batch_size}, "
        f"model load {load_s:.1f}s, store {root}"
    )
    print()
    print("Per shard (seconds):")
    print(
        text_table(
            rows,
            (
                "shard",
                "prompts",
                "engine calls",
                "tokens",
                "generation",
                "scoring",
                "storage",
                "total",
            ),
        )
    )
    factory_rate = factory_tokens / factory_s
    raw_rate = raw_tokens / raw_s
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
                (
                    "tree synthesis step (factory)",
                    str(factory_tokens),
                    f"{factory_s:.1f}",
                    f"{factory_rate:.1f}",
                ),
            ],
            ("path", "tokens", "seconds", "tokens/s"),
        )
    )
    print(f"\nfactory / raw throughput: {factory_rate / raw_rate:.3f}")
    # On a shared machine the engine's speed drifts between the two passes; the time the factory
    # spends outside engine calls is the load-independent measure of its overhead.
    outside = factory_s - generator.seconds
    print(
        f"factory time outside engine calls: {outside:.2f}s of {factory_s:.1f}s "
        f"({100 * outside / factory_s:.2f}%)"
    )


if __name__ == "__main__":
    main()
