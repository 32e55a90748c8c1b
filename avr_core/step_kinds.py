"""What each kind of step computes for one shard: the functions the step protocol runs.

Tasks (on Prefect), the benchmark and tests all hand these to `avr_core.steps`, so each measures
and exercises the same code. Engines come in as zero-argument callables: a step whose shards are
all committed never loads its engine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from avr_core.config import (
    LongResponseConfig,
    RefineConfig,
    SearchConfig,
    SelectionConfig,
    ThinkConfig,
    TreeConfig,
)
from avr_core.engines.base import Generator, RewardModel
from avr_core.recursive import (
    SearchStats,
    greedy_search,
    sample_long_responses,
    score_long_responses,
    search_gain,
)
from avr_core.reporting import ShardStats
from avr_core.schemas import (
    CoTSample,
    GreedySearch,
    Lineage,
    Message,
    PreferencePair,
    PromptRecord,
    RefinedAnswers,
    RefinementTree,
    Sampling,
    SFTExample,
)
from avr_core.selection import (
    CHOSEN_LONGER,
    KEPT,
    build_preference_pairs,
    length_controlled_outcome,
    original_sft_example,
    select_refinement_sft,
    trajectory_outcome,
)
from avr_core.steps import ShardCompute, ShardOutput
from avr_core.synthesis import ENGINE_TOTALS, generate_trees, score_gains, score_trees
from avr_core.templates import Templates, extract_final_answer
from avr_core.testtime import own_starting_answers, refine_answers, think

__all__ = [
    "lc_pair_shards",
    "own_answer_shards",
    "long_response_shards",
    "long_scoring_shards",
    "pair_shards",
    "refine_shards",
    "rsft_shards",
    "scoring_shards",
    "search_shards",
    "think_shards",
    "trajectory_shards",
    "tree_shards",
]


def tree_shards(
    generator: Callable[[], Generator], templates: Templates, tree: TreeConfig, lineage: Lineage
) -> ShardCompute:
    """Prompts -> refinement trees (answer, x critiques, y refinements each)."""

    def compute(index: int, inputs: tuple[list[PromptRecord], ...]) -> ShardOutput:
        (prompts,) = inputs
        trees, synthesis = generate_trees(generator(), prompts, templates, tree, lineage)
        return ShardOutput(trees, ShardStats(counts=synthesis.model_dump()))

    return compute


def scoring_shards(reward_model: Callable[[], RewardModel]) -> ShardCompute:
    """Trees -> the same trees with the answer and every refinement scored."""

    def compute(index: int, inputs: tuple[list[RefinementTree], ...]) -> ShardOutput:
        (trees,) = inputs
        scored = score_trees(reward_model(), trees)
        candidates = sum(1 + sum(len(c.refinements) for c in t.critiques) for t in scored)
        stats = ShardStats(
            counts={"scored": len(scored), "scored_candidates": candidates},
            values={"gain": score_gains(scored)},
        )
        return ShardOutput(scored, stats)

    return compute


def rsft_shards(selection: SelectionConfig, templates: Templates) -> ShardCompute:
    """Scored trees -> RSFT examples (and, if configured, originals of trees without one)."""

    def compute(index: int, inputs: tuple[list[RefinementTree], ...]) -> ShardOutput:
        (trees,) = inputs
        examples: list[SFTExample] = []
        originals = 0
        for tree in trees:
            example = select_refinement_sft(tree, selection, templates)
            if example is None and selection.rsft_include_original:
                example = original_sft_example(tree)
                originals += 1
            if example is not None:
                examples.append(example)
        counts = {"trees": len(trees), "rsft_examples": len(examples) - originals}
        if selection.rsft_include_original:
            counts["original_examples"] = originals
        return ShardOutput(examples, ShardStats(counts=counts))

    return compute


def pair_shards(selection: SelectionConfig, templates: Templates) -> ShardCompute:
    """Scored trees -> DPO preference pairs (generation, critique, refinement)."""

    def compute(index: int, inputs: tuple[list[RefinementTree], ...]) -> ShardOutput:
        (trees,) = inputs
        pairs: list[PreferencePair] = [
            pair for tree in trees for pair in build_preference_pairs(tree, selection, templates)
        ]
        counts = {"trees": len(trees), "pairs": len(pairs)}
        counts.update({f"pairs_{kind}": n for kind, n in Counter(p.kind for p in pairs).items()})
        return ShardOutput(pairs, ShardStats(counts=counts))

    return compute


# ---- Stage II ----------------------------------------------------------------------------------


def _search_stats(stats: SearchStats, records: list[GreedySearch]) -> ShardStats:
    """A shard's search statistics: counters (histograms flattened) and per-record values."""
    counts = stats.model_dump(
        include={
            "searches",
            "unscored_starts",
            "improved_searches",
            "improved_rounds",
            "stopped_no_gain",
            "reached_max_rounds",
            "critiques",
            "refinements",
            "format_retries",
            "dropped_critiques",
            "engine_calls",
            "reward_calls",
            *ENGINE_TOTALS,
        }
    )
    counts.update({f"searches_with_{n}_rounds": k for n, k in sorted(stats.rounds.items())})
    for r, active in enumerate(stats.active_per_round, start=1):
        counts[f"round_{r}_prompts"] = active
        counts[f"round_{r}_engine_calls"] = stats.calls_per_round[r - 1]
    values = {f"gain_round_{r + 1}": gains for r, gains in sorted(stats.round_gains.items())}
    # The whole search's gain per prompt: the last accepted score over the starting answer's.
    values["gain"] = [
        gain for gain in (search_gain(record) for record in records) if gain is not None
    ]
    return ShardStats(counts=counts, values=values)


def search_shards(
    generator: Callable[[], Generator],
    reward_model: Callable[[], RewardModel],
    templates: Templates,
    search: SearchConfig,
    lineage: Lineage,
) -> ShardCompute:
    """Prompts -> one greedy search per prompt (every round, critique and scored refinement)."""

    def compute(index: int, inputs: tuple[list[PromptRecord], ...]) -> ShardOutput:
        (prompts,) = inputs
        records, stats = greedy_search(
            generator(), reward_model(), prompts, templates, search, lineage
        )
        return ShardOutput(records, _search_stats(stats, records))

    return compute


def trajectory_shards(selection: SelectionConfig, templates: Templates) -> ShardCompute:
    """Searches -> trajectory SFT examples; every search not kept is counted by its reason."""

    def compute(index: int, inputs: tuple[list[GreedySearch], ...]) -> ShardOutput:
        (searches,) = inputs
        examples: list[SFTExample] = []
        outcomes: Counter[str] = Counter()
        for search in searches:
            example, outcome = trajectory_outcome(search, templates, selection)
            outcomes[outcome] += 1
            if example is not None:
                examples.append(example)
        counts = {"searches": len(searches), "trajectories": len(examples)}
        counts.update({f"dropped_{why}": n for why, n in outcomes.items() if why != KEPT})
        values = {
            "trajectory_rounds": [
                float(sum(r.best is not None for r in s.rounds)) for s in searches
            ]
        }
        return ShardOutput(examples, ShardStats(counts=counts, values=values))

    return compute


def long_response_shards(
    generator: Callable[[], Generator], long: LongResponseConfig, lineage: Lineage
) -> ShardCompute:
    """Searches (for their prompts and starting scores) -> k unscored long responses each."""

    def compute(index: int, inputs: tuple[list[GreedySearch], ...]) -> ShardOutput:
        (searches,) = inputs
        records, stats = sample_long_responses(generator(), searches, long, lineage)
        counts = stats.model_dump(
            include={"responses", "format_retries", "unparsed", *ENGINE_TOTALS}
        )
        counts["long_prompts"] = stats.prompts
        values = {"response_chars": [float(len(r.response)) for c in records for r in c.samples]}
        return ShardOutput(records, ShardStats(counts=counts, values=values))

    return compute


def long_scoring_shards(reward_model: Callable[[], RewardModel]) -> ShardCompute:
    """Long responses -> the same with every parsed final answer scored (alone)."""

    def compute(index: int, inputs: tuple[list[CoTSample], ...]) -> ShardOutput:
        (samples,) = inputs
        scored, stats = score_long_responses(reward_model(), samples)
        counts = {
            "long_prompts": stats.prompts,
            "responses": stats.responses,
            "unparsed": stats.unparsed,
            "scored_final_answers": stats.scored,
            "reward_calls": stats.reward_calls,
        }
        return ShardOutput(scored, ShardStats(counts=counts))

    return compute


def _final_chars(response: list[Message]) -> float:
    """Characters of a long response's final answer (what the length rule compares)."""
    return float(len(extract_final_answer(response[-1].content) or ""))


def lc_pair_shards(selection: SelectionConfig) -> ShardCompute:
    """Scored long responses -> length-controlled DPO pairs; drops counted by reason."""

    def compute(index: int, inputs: tuple[list[CoTSample], ...]) -> ShardOutput:
        (samples,) = inputs
        pairs: list[PreferencePair] = []
        outcomes: Counter[str] = Counter()
        for sample in samples:
            pair, outcome = length_controlled_outcome(sample, selection)
            outcomes[outcome] += 1
            if pair is not None:
                pairs.append(pair)
        # The length rule's count is always shown, 0 included: it is what the step is about.
        counts = {
            "long_prompts": len(samples),
            "lc_pairs": len(pairs),
            f"dropped_{CHOSEN_LONGER}": 0,
        }
        counts.update({f"dropped_{why}": n for why, n in outcomes.items() if why != KEPT})
        values = {
            "chosen_final_chars": [_final_chars(p.chosen) for p in pairs],
            "rejected_final_chars": [_final_chars(p.rejected) for p in pairs],
        }
        return ShardOutput(pairs, ShardStats(counts=counts, values=values))

    return compute


# ---- test time ---------------------------------------------------------------------------------


def own_answer_shards(
    generator: Callable[[], Generator], sampling: Sampling, lineage: Lineage
) -> ShardCompute:
    """Prompts -> round 0 of test-time refinement: the refining model's own answers."""

    def compute(index: int, inputs: tuple[list[PromptRecord], ...]) -> ShardOutput:
        (prompts,) = inputs
        records, stats = own_starting_answers(generator(), prompts, sampling, lineage)
        counts = {"prompts_in": len(prompts), **stats.model_dump(include=set(ENGINE_TOTALS))}
        return ShardOutput(records, ShardStats(counts=counts))

    return compute


def refine_shards(
    generator: Callable[[], Generator],
    reward_model: Callable[[], RewardModel] | None,
    templates: Templates,
    refine: RefineConfig,
) -> ShardCompute:
    """Starting answers -> the same records with N refinement rounds (scored with a reward)."""

    def compute(index: int, inputs: tuple[list[RefinedAnswers], ...]) -> ShardOutput:
        (starts,) = inputs
        reward = reward_model() if reward_model is not None else None
        records, stats = refine_answers(
            generator(), starts, templates, refine.rounds, refine.sampling, reward, refine.keep_best
        )
        counts = stats.model_dump(
            include={"prompts", "reward_calls", "kept_previous", *ENGINE_TOTALS}
        )
        values: dict[str, list[float]] = {}
        for record in records:
            for k, round_ in enumerate(record.rounds):
                values.setdefault(f"answer_chars_round_{k}", []).append(float(len(round_.answer)))
                if round_.score is not None:
                    values.setdefault(f"score_round_{k}", []).append(round_.score)
        return ShardOutput(records, ShardStats(counts=counts, values=values))

    return compute


def think_shards(
    generator: Callable[[], Generator], think_cfg: ThinkConfig, lineage: Lineage
) -> ShardCompute:
    """Prompts -> one long response each and its final answer (format failures kept)."""

    def compute(index: int, inputs: tuple[list[PromptRecord], ...]) -> ShardOutput:
        (prompts,) = inputs
        records, stats = think(
            generator(), prompts, think_cfg.sampling, think_cfg.max_format_retries, lineage
        )
        counts = stats.model_dump()
        values = {
            "response_chars": [float(len(r.response)) for r in records],
            "final_answer_chars": [
                float(len(r.final_answer)) for r in records if r.final_answer is not None
            ],
        }
        return ShardOutput(records, ShardStats(counts=counts, values=values))

    return compute
