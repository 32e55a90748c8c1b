"""Stage II greedy-search benchmark: factory throughput vs the raw engine, and batching per round.

On the same prompts in one process:
1. the factory path exactly as the greedy-search task runs it (without Prefect): the step
   protocol of `avr_core.steps` (plan, read each input shard, compute, commit with stats in the
   footer, seal) with the task's own per-shard function `avr_core.step_kinds.search_shards`, on a
   real DatasetStore; every `generator.chat` call is recorded;
2. the raw engine: exactly those recorded calls (same conversations, same sampling and seeds)
   replayed back to back on the same loaded generator.
Throughput is generated tokens / second (tokens counted with the model's tokenizer), so the ratio
factory / raw is the factory's overhead (reward calls, storage, bookkeeping). The batching check
reads, per round, the prompts still searching and the engine calls from the sealed step's stats
and from the recorder: a round must cost a fixed number of calls per shard (critiques, then
refinements; plus rating re-samples with --require-rating) however many prompts are active.
Usage:

    python -m benchmarks.stage2 --prompts 8 --shard-size 4 --max-tokens 48 --rounds 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

from avr_core.config import (
    ExecutionConfig,
    RulesModel,
    SearchConfig,
    parse_model_spec,
)
from avr_core.engines import load_generator, load_reward_model
from avr_core.ingest import bundled_prompts_path, read_prompts
from avr_core.models import resolve_model_dir
from avr_core.reporting import text_table
from avr_core.schemas import Constraint, Conversation, GreedySearch, Lineage, PromptRecord, Sampling
from avr_core.step_kinds import search_shards
from avr_core.steps import (
    ShardEvent,
    ShardOutput,
    Source,
    Stage2Steps,
    plan_step,
    run_step,
    split_into_shards,
)
from avr_core.storage import DatasetStore
from avr_core.synthesis import derive_seed
from avr_core.templates import load_templates
from benchmarks.stage1 import PROMPTS, RUN, RecordingGenerator, count_tokens, print_throughput

SEARCH = Stage2Steps.SEARCH
START = "start"  # the label of the starting-answer call (before round 1)


@dataclass
class OutputRecordingGenerator(RecordingGenerator):
    """A RecordingGenerator that also keeps each call's outputs (to count the factory's tokens)."""

    outputs: list[list[list[str]]] = field(default_factory=list)

    def chat(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]:
        outputs = super().chat(conversations, sampling)
        self.outputs.append(outputs)
        return outputs


@dataclass
class TimedRewardModel:
    """Passes reward calls through and times them (they are part of the factory's overhead)."""

    inner: object
    calls: int = 0
    seconds: float = 0.0

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def score(
        self, conversations: list[Conversation], constraints: list[list[Constraint]]
    ) -> list[float]:
        self.calls += 1
        started = time.perf_counter()
        scores = self.inner.score(conversations, constraints)
        self.seconds += time.perf_counter() - started
        return scores

    def close(self) -> None:
        self.inner.close()


def call_levels(search: SearchConfig) -> dict[int | None, tuple[str, int]]:
    """Derived seed -> (level, round) of every call greedy_search can make (round 0: start).

    Each level samples with its own seed derived from the base seed, so a recorded call's seed
    says which round and level made it."""
    levels = {"search-answer": 0}
    for r in range(search.max_rounds):
        base = f"search-round-{r}"
        levels[f"{base}-critique"] = r + 1
        levels[f"{base}-refine"] = r + 1
        for retry in range(1, search.max_format_retries + 1):
            levels[f"{base}-critique-retry-{retry}"] = r + 1
    seeds = {derive_seed(search.sampling.seed, level): (level, r) for level, r in levels.items()}
    if len(seeds) != len(levels):
        raise ValueError("derived seeds collide: calls cannot be told apart by seed")
    return seeds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="search.max_rounds")
    parser.add_argument("--x", type=int, default=2)
    parser.add_argument("--y", type=int, default=2)
    parser.add_argument("--require-rating", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--policy", default="smollm2-135m-instruct")
    parser.add_argument("--backend", default="transformers")
    parser.add_argument(
        "--reward-model",
        default="rules",
        help="'rules' (constraints, length_penalty 1.0) or a reward model path for --backend",
    )
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--root", default=None, help="storage root (default: a temp dir)")
    args = parser.parse_args(argv)

    prompts = read_prompts(bundled_prompts_path()).prompts[: args.prompts]
    shards = split_into_shards(prompts, args.shard_size)
    templates = load_templates()
    search = SearchConfig(
        x=args.x,
        y=args.y,
        max_rounds=args.rounds,
        sampling=SearchConfig().sampling.model_copy(update={"max_tokens": args.max_tokens}),
        require_rating=args.require_rating,
    )
    levels = call_levels(search)
    execution = ExecutionConfig(batch_size=args.batch_size, device=args.device)
    spec = parse_model_spec({"backend": args.backend, "path": args.policy})
    reward_spec = (
        RulesModel(length_penalty=1.0)
        if args.reward_model == "rules"
        else parse_model_spec({"backend": args.backend, "path": args.reward_model})
    )

    started = time.perf_counter()
    generator = OutputRecordingGenerator(load_generator(spec, execution))
    reward = TimedRewardModel(load_reward_model(reward_spec, execution))
    load_s = time.perf_counter() - started
    tokenizer = getattr(generator.inner, "tokenizer", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(args.policy))

    # Warm-up (first-call kernel selection, allocator growth) so neither side pays it.
    generator.inner.chat(
        [prompts[0].messages], search.sampling.model_copy(update={"max_tokens": 4})
    )

    root = args.root or tempfile.mkdtemp(prefix="avr-bench-")
    store = DatasetStore(root)
    # The input step, as ingest writes it: shards + manifest.
    inputs = plan_step(store, RUN, PROMPTS, PromptRecord, {"bench": 1}, shard_count=len(shards))
    run_step(inputs, lambda index, _: ShardOutput(shards[index]))
    lineage = Lineage(run=RUN, stage=SEARCH.stage, step=SEARCH.step)

    # Shards run one after another in this process: the calls recorded before a shard's event
    # (and after the previous one's) are that shard's.
    shard_calls: dict[int, range] = {}
    per_shard: dict[int, ShardEvent] = {}

    def progress(event: ShardEvent) -> None:
        first = max((r.stop for r in shard_calls.values()), default=0)
        shard_calls[event.index] = range(first, len(generator.calls))
        per_shard[event.index] = event

    factory_start = time.perf_counter()
    plan = plan_step(
        store, RUN, SEARCH, GreedySearch, {"bench": 2}, [Source(PROMPTS, PromptRecord)]
    )
    result = run_step(
        plan,
        search_shards(lambda: generator, lambda: reward, templates, search, lineage),
        progress=progress,
    )
    factory_s = time.perf_counter() - factory_start
    call_tokens = [count_tokens(tokenizer, outputs) for outputs in generator.outputs]
    factory_tokens = sum(call_tokens)

    raw_start = time.perf_counter()
    replayed = [generator.inner.chat(c, s) for c, s in generator.calls]
    raw_s = time.perf_counter() - raw_start
    raw_tokens = sum(count_tokens(tokenizer, outputs) for outputs in replayed)
    identical = sum(a == b for a, b in zip(generator.outputs, replayed, strict=True))
    generator.close()
    reward.close()

    # ---- per call: shard, round, level (from the seed), conversations, sequences ----------
    calls = []  # (shard, round, level, conversations, sequences, tokens)
    for index in plan.indices:
        for i in shard_calls.get(index, range(0)):
            conversations, sampling = generator.calls[i]
            level, round_ = levels.get(sampling.seed, ("?", -1))
            n_conv = len(conversations)
            calls.append((index, round_, level, n_conv, n_conv * sampling.n, call_tokens[i]))
    records = {
        index: store.read_shard_records(RUN, *SEARCH, index, GreedySearch) for index in plan.indices
    }

    print(
        "Stage II greedy search (stage2/search): the factory step (plan, read shard, "
        "search_shards, commit, seal) vs the same engine calls replayed raw; tokens = generated "
        "tokens of every chat call (the policy's tokenizer)."
    )
    print(
        f"policy {spec.model_id}, reward {reward_spec.model_id}, device {args.device}, "
        f"{len(prompts)} prompts in {len(shards)} shards of <= {args.shard_size}, "
        f"x={args.x} y={args.y} max_rounds={args.rounds} require_rating={args.require_rating}, "
        f"max_tokens={args.max_tokens}, batch_size={args.batch_size}, model load {load_s:.1f}s, "
        f"{len(generator.calls)} engine calls, {reward.calls} reward calls, store {root}"
    )

    print("\nPer shard:")
    shard_rows = []
    for index in plan.indices:
        mine = [c for c in calls if c[0] == index]
        event = per_shard[index]
        shard_rows.append(
            (
                str(index),
                str(len(shards[index])),
                str(max((len(r.rounds) for r in records[index]), default=0)),
                str(len(mine)),
                str(sum(c[5] for c in mine)),
                f"{event.compute_seconds:.2f}",
                f"{event.storage_seconds:.3f}",
            )
        )
    print(
        text_table(
            shard_rows,
            ("shard", "prompts", "rounds", "engine calls", "tokens", "compute s", "storage s"),
        )
    )

    print_throughput(
        "greedy search step (factory)",
        (raw_tokens, raw_s),
        (factory_tokens, factory_s),
        generator.seconds,
    )
    print(
        f"replayed outputs identical to the factory's: {identical} of {len(replayed)} calls "
        "(differences only change the raw token count, not the work replayed); reward calls "
        f"took {reward.seconds:.3f}s"
    )

    # ---- batching per round ----------------------------------------------------------------
    counts = result.counts
    max_round = max((c[1] for c in calls), default=0)
    rows = []
    per_round_ok = True
    stats_match = True
    allowed = 2 + (search.max_format_retries if search.require_rating else 0)
    for r in range(max_round + 1):
        mine = [c for c in calls if c[1] == r]
        by_shard = Counter(c[0] for c in mine)
        if r == 0:
            # The starting answers: one call per shard, not in the per-round stats.
            prompts_stat = len(prompts)
            calls_stat = counts.get("engine_calls", 0) - sum(
                counts.get(f"round_{k}_engine_calls", 0) for k in range(1, max_round + 1)
            )
        else:
            prompts_stat = counts.get(f"round_{r}_prompts", 0)
            calls_stat = counts.get(f"round_{r}_engine_calls", 0)
        shards_in_round = sum(
            any(len(rec.rounds) >= r for rec in recs) if r else bool(recs)
            for recs in records.values()
        )
        rec_prompts = sum(c[3] for c in mine if c[2].endswith(("critique", "answer")))
        stats_match &= calls_stat == len(mine) and prompts_stat == rec_prompts
        per_shard_calls = sorted(set(by_shard.values()))
        if r == 0:
            per_round_ok &= per_shard_calls == [1]
        elif search.require_rating:
            per_round_ok &= all(2 <= n <= allowed for n in per_shard_calls)
        else:
            per_round_ok &= per_shard_calls == [2]
        rows.append(
            (
                START if r == 0 else str(r),
                str(prompts_stat),
                str(calls_stat),
                str(shards_in_round),
                f"{calls_stat / shards_in_round:.2f}" if shards_in_round else "-",
                "/".join(str(n) for n in per_shard_calls) or "-",
                str(rec_prompts),
                str(sum(c[4] for c in mine)),
                str(sum(c[5] for c in mine)),
            )
        )
    print("\nBatching per round (stats: the sealed step's counts, summed over shards):")
    print(
        text_table(
            rows,
            (
                "round",
                "active prompts (stats)",
                "engine calls (stats)",
                "shards",
                "calls/shard",
                "calls/shard (recorder)",
                "prompts (recorder)",
                "sequences",
                "tokens",
            ),
        )
    )
    histogram = sorted(
        (int(key.split("_")[2]), value)
        for key, value in counts.items()
        if key.startswith("searches_with_")
    )
    print(
        "searches by rounds run: "
        + ", ".join(f"{n} rounds: {k}" for n, k in histogram)
        + f"; searches improved {counts.get('improved_searches', 0)}, improved rounds "
        f"{counts.get('improved_rounds', 0)}, stopped without gain "
        f"{counts.get('stopped_no_gain', 0)}, reached max_rounds "
        f"{counts.get('reached_max_rounds', 0)}, unscored starts {counts.get('unscored_starts', 0)}"
        + (f", gain mean {result.gain_mean:.4g}" if result.gain_mean is not None else "")
    )
    expected = (
        f"critique + refine (+ up to {search.max_format_retries} rating re-samples)"
        if search.require_rating
        else "critique + refine = 2"
    )
    print(
        f"one call per level per round ({expected} calls per shard per round, independent of "
        f"active prompts): {'yes' if per_round_ok else 'NO'}; "
        f"step stats agree with the recorder: {'yes' if stats_match else 'NO'}"
    )


if __name__ == "__main__":
    main()
