"""Dataset tasks: RSFT examples and DPO preference pairs from scored refinement trees.

Pure selection over stored trees (DESIGN section 5 rules in avr_core.selection); no engine.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from avr_core.config import SelectionConfig
from avr_core.fingerprint import selection_step_config
from avr_core.results import StepResult
from avr_core.schemas import ArrowRecord, PreferencePair, RefinementTree, SFTExample
from avr_core.step_kinds import pair_shards, rsft_shards
from avr_core.steps import ShardCompute, Source, StepIO, plan_step
from avr_core.templates import Templates, load_templates
from tasks.engines import open_store
from tasks.step_runner import execute_plan

__all__ = ["build_pairs_task", "select_rsft_task"]

_SHARD_RETRIES = {"retries": 1, "retry_delay_seconds": 5}


def _select(
    io: StepIO,
    kind: str,
    record_type: type[ArrowRecord],
    selection: SelectionConfig,
    templates_dir: str | None,
    shards: Callable[[SelectionConfig, Templates], ShardCompute],
) -> StepResult:
    """A selection step over scored trees; fingerprint: thresholds, templates, the trees."""
    templates = load_templates(templates_dir)
    plan = plan_step(
        open_store(io.storage_root),
        io.run,
        io.target,
        record_type,
        selection_step_config(kind, selection, templates.version),
        [Source(io.source, RefinementTree)],
    )
    return execute_plan(plan, shards(selection, templates))


@task(name="select-rsft", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def select_rsft_task(
    io: StepIO, selection: SelectionConfig, templates_dir: str | None
) -> StepResult:
    """Reads: scored trees. Writes: SFTExample rows (the best refinement's critique-refine chat).

    Fingerprint: selection thresholds, templates, the scored trees.
    """
    return _select(io, "rsft", SFTExample, selection, templates_dir, rsft_shards)


@task(name="build-pairs", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def build_pairs_task(
    io: StepIO, selection: SelectionConfig, templates_dir: str | None
) -> StepResult:
    """Reads: scored trees. Writes: PreferencePair rows (generation, critique, refinement).

    Fingerprint: selection thresholds, templates, the scored trees.
    """
    return _select(io, "pairs", PreferencePair, selection, templates_dir, pair_shards)
