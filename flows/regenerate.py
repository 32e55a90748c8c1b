"""Nightly regeneration: refresh the Stage I datasets for a prompt source that keeps changing.

Each run publishes a dated, self-contained version `runs/{run_name}-{YYYYMMDD}`:

    inputs/source         today's whole prompt set (validated, sharded)
    inputs/prompts        only the prompts no earlier version has trees for
    stage1/seed_trees     trees for those prompts (the seed policy)
    stage1/new_scored     their scores
    stage1/seed_scored    today's scored trees: new ones + ones reused from the previous version
    stage1/rsft           RSFT examples      (from stage1/seed_scored)
    stage1/pairs          DPO pairs          (from stage1/seed_scored)
    regenerate.json       what was reused, from where, under which fingerprint

and points `versions/{run_name}/latest.json` (plus `versions/{run_name}/{YYYYMMDD}.json`) at it.
A prompt's trees are reused only from the latest earlier version made with the same tree
fingerprint (policy, reward model, templates, sampling, x, y, rating rules): a changed prompt
has a new prompt_id and is regenerated, a removed prompt drops out of the new version, and a
config change regenerates everything. Generation, scoring and selection are the Stage I tasks.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, field_validator

from avr_core.schemas import PromptRecord, RefinementTree
from avr_core.storage import DatasetStore, config_fingerprint
from avr_core.templates import load_templates
from flows.params import STAGE1, Stage1Params
from tasks.common import open_store, record_run_start, require_manifest
from tasks.stage1 import (
    build_pairs_task,
    generate_trees_task,
    ingest_prompts_task,
    score_trees_task,
    select_rsft_task,
)
from tasks.training import model_revision

__all__ = ["RegenerateParams", "regenerate", "trees_fingerprint", "version_run_name"]

SOURCE = ("inputs", "source")
NEW_PROMPTS = ("inputs", "prompts")
NEW_TREES = (STAGE1, "seed_trees")
NEW_SCORED = (STAGE1, "new_scored")
SCORED = (STAGE1, "seed_scored")
RSFT = (STAGE1, "rsft")
PAIRS = (STAGE1, "pairs")
RECORD_NAME = "regenerate.json"


class RegenerateParams(Stage1Params):
    """Stage I data settings plus the version to publish; `run_name` names the dataset."""

    version: str | None = Field(
        None, description="YYYYMMDD of the version to publish (default: today in `timezone`)"
    )
    timezone: str = Field("UTC", description="time zone that decides today's date")

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d{8}", value):
            raise ValueError(f"version {value!r} must be a date written YYYYMMDD")
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"unknown time zone {value!r}") from err
        return value


def version_run_name(dataset: str, version: str) -> str:
    """Run directory of one dated version: {dataset}-{YYYYMMDD}."""
    return f"{dataset}-{version}"


def today(timezone: str) -> str:
    """Today's date in `timezone` as YYYYMMDD."""
    return datetime.now(ZoneInfo(timezone)).strftime("%Y%m%d")


def trees_fingerprint(params: Stage1Params) -> str:
    """What decides a prompt's scored tree: equal fingerprints mean a tree can be reused."""
    return config_fingerprint(
        {
            "policy": params.policy.model_dump(mode="json", exclude={"base_url"}),
            "policy_revision": model_revision(params.policy.path),
            "reward": params.reward.model_dump(mode="json", exclude={"base_url"}),
            "reward_revision": model_revision(params.reward.path),
            "templates": load_templates(params.templates_dir).version,
            "sampling": params.sampling,
            "x": params.x,
            "y": params.y,
            "require_rating": params.require_rating,
            "max_format_retries": params.max_format_retries,
        }
    )


def previous_version(
    store: DatasetStore, dataset: str, before: str, fingerprint: str
) -> str | None:
    """The latest finished version of `dataset` older than `before` made with `fingerprint`."""
    pattern = re.compile(rf"^{re.escape(dataset)}-(\d{{8}})$")
    candidates = sorted(
        (match.group(1), run)
        for run in store.list_runs()
        if (match := pattern.match(run)) and match.group(1) < before
    )
    for _, run in reversed(candidates):
        record = store.read_json(f"runs/{run}/{RECORD_NAME}") or {}
        if record.get("complete") and record.get("trees_fingerprint") == fingerprint:
            return run
    return None


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _write_step(
    store: DatasetStore, run: str, ref: tuple[str, str], records: list[Any], record_type: type,
    fingerprint: str, shard_size: int,
) -> int:  # fmt: skip
    """Write `records` as shards of a step (skipping shards already there) and seal it."""
    shards = _chunks(records, shard_size)
    done = store.completed_shards(run, *ref, fingerprint)
    for index, shard in enumerate(shards):
        if index not in done:
            store.write_shard(run, *ref, index, shard, record_type, fingerprint)
    store.write_manifest(run, *ref, record_type, fingerprint, expected_shards=len(shards))
    return len(shards)


@task(name="plan-regeneration", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def plan_regeneration_task(
    storage_root: str, run: str, dataset: str, version: str, fingerprint: str, shard_size: int
) -> dict[str, Any]:
    """Split today's prompts into new ones (written to inputs/prompts) and reusable trees."""
    logger = get_run_logger()
    store = open_store(storage_root)
    source = require_manifest(store, run, SOURCE)
    prompts = store.read_records(run, *SOURCE, PromptRecord)
    wanted = {p.prompt_id for p in prompts}
    previous = previous_version(store, dataset, version, fingerprint)
    reused: list[RefinementTree] = []
    if previous is not None:
        reused = [
            tree
            for tree in store.read_records(previous, *SCORED, RefinementTree)
            if tree.prompt_id in wanted
        ]
    have = {tree.prompt_id for tree in reused}
    new = [p for p in prompts if p.prompt_id not in have]
    plan_fp = config_fingerprint(
        {"source": source.fingerprint, "previous": previous, "reused": sorted(have)}
    )
    if new:
        _write_step(store, run, NEW_PROMPTS, new, PromptRecord, plan_fp, shard_size)
    logger.info(
        "%s: %d prompts, %d trees reused from %s, %d to generate",
        run, len(prompts), len(reused), previous or "no earlier version", len(new),
    )  # fmt: skip
    return {
        "previous": previous,
        "prompts": len(prompts),
        "reused": len(reused),
        "new": len(new),
        "plan_fingerprint": plan_fp,
    }


@task(name="merge-scored-trees", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def merge_scored_task(
    storage_root: str, run: str, plan: dict[str, Any], shard_size: int
) -> dict[str, Any]:
    """stage1/seed_scored of this version: new scored trees, then the reused ones."""
    store = open_store(storage_root)
    new_fp = None
    trees: list[RefinementTree] = []
    if plan["new"]:
        new_fp = require_manifest(store, run, NEW_SCORED).fingerprint
        trees += store.read_records(run, *NEW_SCORED, RefinementTree)
    if plan["previous"]:
        wanted = {p.prompt_id for p in store.read_records(run, *SOURCE, PromptRecord)}
        trees += [
            tree
            for tree in store.read_records(plan["previous"], *SCORED, RefinementTree)
            if tree.prompt_id in wanted
        ]
    if not trees:
        raise ValueError(f"run {run}: no scored trees to publish")
    fingerprint = config_fingerprint({"plan": plan["plan_fingerprint"], "new": new_fp})
    shards = _write_step(store, run, SCORED, trees, RefinementTree, fingerprint, shard_size)
    return {"trees": len(trees), "shards": shards, "fingerprint": fingerprint}


@task(name="publish-version", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def publish_version_task(
    storage_root: str, dataset: str, version: str, run: str, record: dict[str, Any]
) -> dict[str, Any]:
    """Mark the version complete and point versions/{dataset}/latest.json at it."""
    store = open_store(storage_root)
    datasets = {}
    for ref in (SOURCE, SCORED, RSFT, PAIRS):
        manifest = require_manifest(store, run, ref)
        datasets["/".join(ref)] = {
            "uri": store.step_uri(run, *ref),
            "rows": manifest.total_rows,
            "fingerprint": manifest.fingerprint,
        }
    published = {
        **record,
        "dataset": dataset,
        "version": version,
        "run": run,
        "datasets": datasets,
        "complete": True,
        "published_at": datetime.now(ZoneInfo("UTC")).isoformat(timespec="seconds"),
    }
    store.write_json(f"runs/{run}/{RECORD_NAME}", published)
    store.write_json(f"versions/{dataset}/{version}.json", published)
    store.write_json(f"versions/{dataset}/latest.json", published)
    return published


@flow(name="regenerate", log_prints=True)
def regenerate(params: RegenerateParams | None = None) -> dict[str, Any]:
    """Publish today's version of the Stage I datasets, generating only what is new."""
    params = params or RegenerateParams()
    dataset, root = params.run_name, params.storage_root
    version = params.version or today(params.timezone)
    run = version_run_name(dataset, version)
    store = open_store(root)
    store.check_reachable()
    record_run_start(store, run, "regenerate", params)
    fingerprint = trees_fingerprint(params)

    ingest_prompts_task(
        root, run, params.prompts, params.shard_size, params.on_bad_row, params.max_prompts,
        SOURCE,
    )  # fmt: skip
    plan = plan_regeneration_task(root, run, dataset, version, fingerprint, params.shard_size)
    if plan["new"]:
        generate_trees_task(
            root, run, params.policy, params.templates_dir, params.x, params.y, params.sampling,
            params.require_rating, params.max_format_retries, params.execution, NEW_PROMPTS,
            NEW_TREES,
        )  # fmt: skip
        score_trees_task(root, run, params.reward, params.execution, NEW_TREES, NEW_SCORED)
    merged = merge_scored_task(root, run, plan, params.shard_size)
    select_rsft_task(root, run, params.selection, params.templates_dir, SCORED, RSFT)
    build_pairs_task(root, run, params.selection, params.templates_dir, SCORED, PAIRS)
    published = publish_version_task(
        root, dataset, version, run, {**plan, "trees_fingerprint": fingerprint, "merged": merged}
    )
    print(
        f"published {dataset} version {version}: {store.root}/runs/{run} "
        f"({plan['new']} prompts generated, {plan['reused']} reused from "
        f"{plan['previous'] or 'no earlier version'})"
    )
    return published
