"""Dataset tasks: RSFT examples and DPO preference pairs from scored refinement trees.

Pure selection over stored trees (DESIGN section 5 rules in avr_core.selection); no engine.
"""

from __future__ import annotations

from collections import Counter

from prefect import task
from prefect.cache_policies import NO_CACHE

from avr_core.config import SelectionConfig
from avr_core.fingerprint import selection_step_config
from avr_core.reporting import ShardStats
from avr_core.results import StepResult
from avr_core.schemas import PreferencePair, RefinementTree, SFTExample
from avr_core.selection import build_preference_pairs, original_sft_example, select_refinement_sft
from avr_core.steps import ShardOutput, Source, StepIO, plan_step
from avr_core.templates import load_templates
from tasks.engines import open_store
from tasks.step_runner import execute_plan

__all__ = ["build_pairs_task", "select_rsft_task"]

_SHARD_RETRIES = {"retries": 1, "retry_delay_seconds": 5}


@task(name="select-rsft", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def select_rsft_task(
    io: StepIO, selection: SelectionConfig, templates_dir: str | None
) -> StepResult:
    """Reads: scored trees. Writes: SFTExample rows (the best refinement's critique-refine chat).

    Fingerprint: selection thresholds, templates, the scored trees.
    """
    templates = load_templates(templates_dir)
    plan = plan_step(
        open_store(io.storage_root),
        io.run,
        io.target,
        SFTExample,
        selection_step_config("rsft", selection, templates.version),
        [Source(io.source, RefinementTree)],
    )

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

    return execute_plan(plan, compute)


@task(name="build-pairs", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def build_pairs_task(
    io: StepIO, selection: SelectionConfig, templates_dir: str | None
) -> StepResult:
    """Reads: scored trees. Writes: PreferencePair rows (generation, critique, refinement).

    Fingerprint: selection thresholds, templates, the scored trees.
    """
    templates = load_templates(templates_dir)
    plan = plan_step(
        open_store(io.storage_root),
        io.run,
        io.target,
        PreferencePair,
        selection_step_config("pairs", selection, templates.version),
        [Source(io.source, RefinementTree)],
    )

    def compute(index: int, inputs: tuple[list[RefinementTree], ...]) -> ShardOutput:
        (trees,) = inputs
        pairs = [
            pair for tree in trees for pair in build_preference_pairs(tree, selection, templates)
        ]
        counts = {"trees": len(trees), "pairs": len(pairs)}
        counts.update({f"pairs_{kind}": n for kind, n in Counter(p.kind for p in pairs).items()})
        return ShardOutput(pairs, ShardStats(counts=counts))

    return execute_plan(plan, compute)
