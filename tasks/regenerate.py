"""Regeneration tasks: plan what a dated version reuses, merge new and reused trees, publish.

Generation, scoring and selection are the ordinary tree and dataset tasks; these three only move
stored records, through the same step protocol (shards committed one by one, manifest last).
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from avr_core.layout import RunLayout, version_record_path
from avr_core.results import StepResult
from avr_core.schemas import PromptRecord, RefinementTree
from avr_core.steps import ShardOutput, StepIO, plan_step, require_manifest, split_into_shards
from avr_core.versions import (
    PublishedVersion,
    RegenerateSteps,
    RegenerationPlan,
    previous_version,
    split_new_prompts,
)
from tasks.engines import open_store
from tasks.step_runner import execute_plan

__all__ = ["merge_scored_task", "plan_regeneration_task", "publish_version_task"]

_IO_RETRIES = {"retries": 2, "retry_delay_seconds": 5}
S = RegenerateSteps


@task(name="plan-regeneration", cache_policy=NO_CACHE, **_IO_RETRIES)
def plan_regeneration_task(
    io: StepIO, dataset: str, version: str, trees_key: str, shard_size: int
) -> RegenerationPlan:
    """Reads: today's prompts (io.source) and the previous version. Writes: the new prompts
    (io.target) when there are any. Fingerprint: the source, the reused version and prompt ids.
    """
    store = open_store(io.storage_root)
    prompts = store.read_records(io.run, *io.source, PromptRecord)
    previous = previous_version(store, dataset, version, trees_key)
    reusable = store.read_records(previous, *S.SCORED, RefinementTree) if previous else []
    new, reused = split_new_prompts(prompts, reusable)
    if new:
        shards = split_into_shards(new, shard_size)
        plan = plan_step(
            store,
            io.run,
            io.target,
            PromptRecord,
            {
                "step": "new-prompts",
                "previous": previous,
                "reused": sorted(t.prompt_id for t in reused),
            },
            [],
            shard_count=len(shards),
        )
        execute_plan(plan, lambda index, _: ShardOutput(shards[index]))
    get_run_logger().info(
        "%s: %d prompts, %d trees reused from %s, %d to generate",
        io.run,
        len(prompts),
        len(reused),
        previous or "no earlier version",
        len(new),
    )
    return RegenerationPlan(
        previous=previous,
        prompts=len(prompts),
        reused=len(reused),
        new=len(new),
        trees_key=trees_key,
    )


@task(name="merge-scored-trees", cache_policy=NO_CACHE, **_IO_RETRIES)
def merge_scored_task(io: StepIO, plan: RegenerationPlan, shard_size: int) -> StepResult:
    """Reads: the new scored trees (if any) and the previous version's. Writes: io.target, the
    version's scored trees (new ones first). Fingerprint: the plan and the new scored trees.
    """
    store = open_store(io.storage_root)
    trees: list[RefinementTree] = []
    new_scored = None
    if plan.new:
        manifest = require_manifest(store, io.run, S.NEW_SCORED)
        # Content too: new trees re-scored under the same config must re-merge.
        new_scored = [manifest.fingerprint, manifest.content_digest]
        trees += store.read_records(io.run, *S.NEW_SCORED, RefinementTree)
    if plan.previous:
        prompts = store.read_records(io.run, *S.SOURCE, PromptRecord)
        reusable = store.read_records(plan.previous, *S.SCORED, RefinementTree)
        trees += split_new_prompts(prompts, reusable)[1]
    if not trees:
        raise ValueError(f"run {io.run}: no scored trees to publish")
    shards = split_into_shards(trees, shard_size)
    step = plan_step(
        store,
        io.run,
        io.target,
        RefinementTree,
        {"step": "merged", "plan": plan.model_dump(mode="json"), "new": new_scored},
        shard_count=len(shards),
    )
    return execute_plan(step, lambda index, _: ShardOutput(shards[index]))


@task(name="publish-version", cache_policy=NO_CACHE, **_IO_RETRIES)
def publish_version_task(
    storage_root: str, dataset: str, version: str, run: str, plan: RegenerationPlan
) -> PublishedVersion:
    """Mark the version complete and point versions/{dataset}/latest.json at it."""
    store = open_store(storage_root)
    datasets: dict[str, dict[str, str | int]] = {}
    for ref in (S.SOURCE, S.SCORED, S.RSFT, S.PAIRS):
        manifest = require_manifest(store, run, ref)
        datasets[str(ref)] = {
            "uri": store.step_uri(run, *ref),
            "rows": manifest.total_rows,
            "fingerprint": manifest.fingerprint,
        }
    published = PublishedVersion(
        dataset=dataset,
        version=version,
        run=run,
        plan=plan,
        datasets=datasets,
        published_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    store.write_json(RunLayout(run).regenerate_record, published)
    store.write_json(version_record_path(dataset, version), published)
    store.write_json(version_record_path(dataset, "latest"), published)
    return published
