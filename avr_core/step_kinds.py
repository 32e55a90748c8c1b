"""What each kind of step computes for one shard: the functions the step protocol runs.

Tasks (on Prefect), the benchmark and tests all hand these to `avr_core.steps`, so each measures
and exercises the same code. Engines come in as zero-argument callables: a step whose shards are
all committed never loads its engine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from avr_core.config import SelectionConfig, TreeConfig
from avr_core.engines.base import Generator, RewardModel
from avr_core.reporting import ShardStats
from avr_core.schemas import Lineage, PreferencePair, PromptRecord, RefinementTree, SFTExample
from avr_core.selection import build_preference_pairs, original_sft_example, select_refinement_sft
from avr_core.steps import ShardCompute, ShardOutput
from avr_core.synthesis import generate_trees, score_gains, score_trees
from avr_core.templates import Templates

__all__ = ["pair_shards", "rsft_shards", "scoring_shards", "tree_shards"]


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
