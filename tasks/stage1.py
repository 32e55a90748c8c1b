"""Stage I tasks: ingest prompts, build trees, score them, select RSFT examples, build DPO pairs.

Each task is a thin wrapper: it works out the step's config fingerprint, loads its engine once
(lazily: not at all when every shard is already done), and hands one function per shard to
`map_shards`. The rules themselves live in avr_core (synthesis, selection).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Literal

import fsspec
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from avr_core.config import ExecutionConfig, ModelSpec, Sampling, SelectionConfig
from avr_core.reporting import ShardStats
from avr_core.schemas import (
    Lineage,
    PreferencePair,
    PromptRecord,
    RefinementTree,
    SFTExample,
)
from avr_core.selection import build_preference_pairs, select_original_sft, select_refinement_sft
from avr_core.storage import config_fingerprint
from avr_core.synthesis import generate_trees, score_gains, score_trees
from avr_core.templates import load_templates
from tasks.common import (
    LazyEngine,
    ShardOutput,
    StepRef,
    StepResult,
    gpu_slot,
    map_shards,
    open_generator,
    open_reward_model,
    open_store,
    publish_step_report,
    record_step,
    require_manifest,
    step_result,
    storage_options_from_env,
    timed,
)
from tasks.training import model_revision

__all__ = [
    "build_pairs_task",
    "generate_trees_task",
    "ingest_prompts_task",
    "score_trees_task",
    "select_rsft_task",
]

# Retries only where I/O can fail (reading the prompt source, storage); a retry of a shard task
# recomputes only the shards that are not yet committed.
_IO_RETRIES = {"retries": 2, "retry_delay_seconds": exponential_backoff(backoff_factor=5)}
_SHARD_RETRIES = {"retries": 1, "retry_delay_seconds": 5}
_TREE_COUNTERS = {"critiques", "refinements", "format_retries", "dropped_critiques", "engine_calls"}


def _source_sha256(source: str) -> str:
    """sha256 of the prompt source's bytes (every file of a directory, in name order)."""
    fs, path = fsspec.core.url_to_fs(source, **storage_options_from_env())
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.removeprefix(path).encode() + b"\0")
        with fs.open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _finish(store, run: str, name: str, result: StepResult, seconds: float) -> StepResult:
    """Report a finished step: Prefect artifact + timings in run.json."""
    publish_step_report(run, result)
    record_step(store, run, name, seconds, result.model_dump(mode="json"))
    return result


@task(name="ingest-prompts", cache_policy=NO_CACHE, **_IO_RETRIES)
def ingest_prompts_task(
    storage_root: str,
    run: str,
    prompts: str,
    shard_size: int,
    on_bad_row: Literal["error", "skip"] = "error",
    max_prompts: int | None = None,
    target: StepRef = ("inputs", "prompts"),
) -> StepResult:
    """Read and validate the prompt set and store it as shards of `shard_size` PromptRecords."""
    from avr_core.ingest import read_prompts, shard_prompts

    logger = get_run_logger()
    store = open_store(storage_root)
    with timed() as elapsed:
        fingerprint = config_fingerprint(
            {
                "step": "prompts",
                "source_sha256": _source_sha256(prompts),
                "shard_size": shard_size,
                "on_bad_row": on_bad_row,
                "max_prompts": max_prompts,
            }
        )
        rejects_path = f"{store.root}/runs/{run}/{target[0]}/rejects.jsonl"
        ingested = read_prompts(
            prompts,
            on_bad_row=on_bad_row,
            rejects_path=rejects_path,
            storage_options=storage_options_from_env(),
        )
        records = ingested.prompts[:max_prompts] if max_prompts else ingested.prompts
        if not records:
            raise ValueError(f"{prompts}: no usable prompts ({ingested.rejects} rejected)")
        shards = shard_prompts(records, shard_size)
        done = store.completed_shards(run, *target, fingerprint)
        for index, shard in enumerate(shards):
            if index not in done:
                store.write_shard(run, *target, index, shard, PromptRecord, fingerprint)
        manifest = store.write_manifest(
            run, *target, PromptRecord, fingerprint, expected_shards=len(shards)
        )
        logger.info(
            "%d prompts from %s in %d shards (%d rejected, %d duplicates)",
            len(records), prompts, len(shards), ingested.rejects, ingested.duplicates,
        )  # fmt: skip
        counts = {
            "prompts_in": len(records),
            "rejected_rows": ingested.rejects,
            "duplicates": ingested.duplicates,
        }
        result = step_result(
            store,
            run,
            target,
            manifest,
            ShardStats(counts=counts),
            computed=len(shards) - len(done),
            skipped=len(done),
        )
    return _finish(store, run, "/".join(target), result, elapsed())


@task(name="generate-trees", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def generate_trees_task(
    storage_root: str,
    run: str,
    policy: ModelSpec,
    templates_dir: str | None,
    x: int,
    y: int,
    sampling: Sampling,
    require_rating: bool,
    max_format_retries: int,
    execution: ExecutionConfig,
    source: StepRef,
    target: StepRef,
) -> StepResult:
    """Answer, critique and refine every prompt shard with `policy` (one engine load)."""
    store = open_store(storage_root)
    templates = load_templates(templates_dir)
    upstream = require_manifest(store, run, source).fingerprint
    fingerprint = config_fingerprint(
        {
            "step": "trees",
            "policy": policy.model_dump(mode="json", exclude={"base_url"}),
            "policy_revision": model_revision(policy.path),
            "templates": templates.version,
            "sampling": sampling,
            "x": x,
            "y": y,
            "require_rating": require_rating,
            "max_format_retries": max_format_retries,
            "upstream": upstream,
        }
    )
    lineage = Lineage(
        run=run,
        stage=target[0],
        step=target[1],
        generator=policy.model_id,
        template_version=templates.version,
        sampling=sampling,
    )
    engine = LazyEngine(lambda: open_generator(policy, execution))

    def compute(index: int, prompts: list[PromptRecord]) -> ShardOutput:
        trees, synthesis = generate_trees(
            engine.get(), prompts, templates, x, y, sampling, require_rating, max_format_retries,
            lineage,
        )  # fmt: skip
        counts = synthesis.model_dump(include=_TREE_COUNTERS)
        counts["trees"] = len(trees)
        return ShardOutput(trees, ShardStats(counts=counts))

    with timed() as elapsed, gpu_slot(policy, execution):
        try:
            result = map_shards(
                store, run, source, PromptRecord, target, RefinementTree, fingerprint, compute
            )
        finally:
            engine.close()
        if engine.load_seconds:
            result.seconds["engine_load"] = round(engine.load_seconds, 3)
    return _finish(store, run, "/".join(target), result, elapsed())


@task(name="score-trees", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def score_trees_task(
    storage_root: str,
    run: str,
    reward: ModelSpec,
    execution: ExecutionConfig,
    source: StepRef,
    target: StepRef,
) -> StepResult:
    """Score every answer and refinement of a trees step with the reward model."""
    store = open_store(storage_root)
    upstream = require_manifest(store, run, source).fingerprint
    fingerprint = config_fingerprint(
        {
            "step": "scores",
            "reward": reward.model_dump(mode="json", exclude={"base_url"}),
            "reward_revision": model_revision(reward.path),
            "upstream": upstream,
        }
    )
    engine = LazyEngine(lambda: open_reward_model(reward, execution))

    def compute(index: int, trees: list[RefinementTree]) -> ShardOutput:
        scored = score_trees(engine.get(), trees)
        # Lineage names the spec (e.g. an s3:// URI), not the local cache path the engine loaded.
        scored = [
            t.model_copy(update={"lineage": t.lineage.model_copy(update={"reward_model": reward.model_id})})
            for t in scored
        ]  # fmt: skip
        candidates = sum(1 + sum(len(c.refinements) for c in t.critiques) for t in scored)
        stats = ShardStats(
            counts={"scored": len(scored), "scored_candidates": candidates},
            gains=score_gains(scored),
        )
        return ShardOutput(scored, stats)

    with timed() as elapsed, gpu_slot(reward, execution):
        try:
            result = map_shards(
                store, run, source, RefinementTree, target, RefinementTree, fingerprint, compute
            )
        finally:
            engine.close()
    return _finish(store, run, "/".join(target), result, elapsed())


def _selection_fingerprint(
    kind: str, selection: SelectionConfig, templates_version: str, upstream: str
) -> str:
    return config_fingerprint(
        {"step": kind, "selection": selection, "templates": templates_version, "upstream": upstream}
    )


@task(name="select-rsft", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def select_rsft_task(
    storage_root: str,
    run: str,
    selection: SelectionConfig,
    templates_dir: str | None,
    source: StepRef,
    target: StepRef,
) -> StepResult:
    """The RSFT set: per tree the best refinement's full critique-refine chat, if it gained."""
    store = open_store(storage_root)
    templates = load_templates(templates_dir)
    upstream = require_manifest(store, run, source).fingerprint
    fingerprint = _selection_fingerprint("rsft", selection, templates.version, upstream)

    def compute(index: int, trees: list[RefinementTree]) -> ShardOutput:
        examples: list[SFTExample] = []
        originals = 0
        for tree in trees:
            example = select_refinement_sft(tree, selection, templates)
            if example is None and selection.rsft_include_original:
                example = select_original_sft(tree)
                originals += 1
            if example is not None:
                examples.append(example)
        counts = {"trees": len(trees), "rsft_examples": len(examples) - originals}
        if selection.rsft_include_original:
            counts["original_examples"] = originals
        return ShardOutput(examples, ShardStats(counts=counts))

    with timed() as elapsed:
        result = map_shards(
            store, run, source, RefinementTree, target, SFTExample, fingerprint, compute
        )
    return _finish(store, run, "/".join(target), result, elapsed())


@task(name="build-pairs", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def build_pairs_task(
    storage_root: str,
    run: str,
    selection: SelectionConfig,
    templates_dir: str | None,
    source: StepRef,
    target: StepRef,
) -> StepResult:
    """DPO preference pairs (generation, critique, refinement) from scored trees."""
    store = open_store(storage_root)
    templates = load_templates(templates_dir)
    upstream = require_manifest(store, run, source).fingerprint
    fingerprint = _selection_fingerprint("pairs", selection, templates.version, upstream)

    def compute(index: int, trees: list[RefinementTree]) -> ShardOutput:
        pairs: list[PreferencePair] = [
            pair for tree in trees for pair in build_preference_pairs(tree, selection, templates)
        ]
        kinds = Counter(pair.kind for pair in pairs)
        counts: dict[str, Any] = {"trees": len(trees), "pairs": len(pairs)}
        counts.update({f"pairs_{kind}": n for kind, n in kinds.items()})
        return ShardOutput(pairs, ShardStats(counts=counts))

    with timed() as elapsed:
        result = map_shards(
            store, run, source, RefinementTree, target, PreferencePair, fingerprint, compute
        )
    return _finish(store, run, "/".join(target), result, elapsed())
