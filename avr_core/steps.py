"""The step protocol: plan a step, run any subset of its pending shards, seal it once.

This is the factory's checkpointing contract (DESIGN section 2), free of Prefect so that a task,
a benchmark, a test or one worker of many can drive it:

1. `plan_step` reads the manifests of the step's sources, derives the step's fingerprint from its
   config and theirs, and lists its shard indices (shard i of the target is computed from shard i
   of every source, zipped by index) and which are already committed: under that fingerprint,
   from the source shards as they are now (their sha256s), with their rows intact.
2. `run_shards` computes a subset of the pending shards (all of them by default), committing each
   as soon as it is done; an error in one shard fails only that shard.
3. `seal_step` writes the manifest once, only when every shard of the plan is committed.

`run_step` is 2 + 3 for one process. Progress goes to standard logging and to an optional
callback (a Prefect task logs it; a terminal shows a bar).

Scaled out (DESIGN section 8), the shards are dealt into slices (`slice_shards`), each slice's
process runs 2 on its shards (`slice_result` says what it did), and the parent re-reads what is
committed (`read_committed`, `replan`) and runs 3 once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from avr_core.fingerprint import config_fingerprint
from avr_core.layout import CHECKPOINTS, StepRef
from avr_core.reporting import ShardStats, gain_summary, merge_stats
from avr_core.results import StepResult
from avr_core.schemas import ArrowRecord
from avr_core.storage import (
    CommittedShard,
    DatasetStore,
    Manifest,
    StepIncompleteError,
    inputs_digest,
)

__all__ = [
    "ProgressCallback",
    "ShardCompute",
    "ShardEvent",
    "ShardOutput",
    "ShardsFailedError",
    "ShardsRun",
    "Source",
    "Stage1Steps",
    "Stage2Steps",
    "StepIncompleteError",
    "StepIO",
    "StepPlan",
    "StepRef",
    "StepResult",
    "UpstreamMissingError",
    "plan_step",
    "raise_failed_shards",
    "read_committed",
    "replan",
    "require_manifest",
    "run_shards",
    "run_step",
    "seal_step",
    "slice_result",
    "slice_shards",
    "split_into_shards",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

STAGE1 = "stage1"
STAGE2 = "stage2"


class Stage1Steps:
    """Step names of Stage I: inputs/prompts, stage1/<step>, checkpoints/<training step>."""

    PROMPTS = StepRef("inputs", "prompts")
    SEED_TREES = StepRef(STAGE1, "seed_trees")
    SEED_SCORED = StepRef(STAGE1, "seed_scored")
    RSFT = StepRef(STAGE1, "rsft")
    SFT_TREES = StepRef(STAGE1, "sft_trees")
    SFT_SCORED = StepRef(STAGE1, "sft_scored")
    PAIRS = StepRef(STAGE1, "pairs")
    TRAIN_SFT = StepRef(CHECKPOINTS, "stage1_sft")
    TRAIN_DPO = StepRef(CHECKPOINTS, "stage1_dpo")


class Stage2Steps:
    """Step names of Stage II: stage2/<step>, checkpoints/<training step>."""

    SEARCH = StepRef(STAGE2, "search")
    TRAJECTORIES = StepRef(STAGE2, "trajectories")
    LONG_RESPONSES = StepRef(STAGE2, "long_responses")
    LONG_SCORED = StepRef(STAGE2, "long_scored")
    LC_PAIRS = StepRef(STAGE2, "lc_pairs")
    TRAIN_SFT = StepRef(CHECKPOINTS, "stage2_sft")
    TRAIN_DPO = StepRef(CHECKPOINTS, "stage2_dpo")


class UpstreamMissingError(RuntimeError):
    """A step's input has no manifest: the step that writes it has not finished."""


class ShardsFailedError(RuntimeError):
    """Some shards of a step failed; the others are committed and will not be recomputed."""


class StepIO(BaseModel):
    """Where a step reads and writes: a run under a storage root, its sources and its target."""

    model_config = ConfigDict(frozen=True)

    storage_root: str
    run: str
    target: StepRef
    sources: tuple[StepRef, ...] = ()

    @property
    def source(self) -> StepRef:
        """The only source of a one-source step."""
        if len(self.sources) != 1:
            raise ValueError(f"{self.target} reads {len(self.sources)} sources, not one")
        return self.sources[0]


@dataclass(frozen=True)
class Source:
    """An input step and the record type its shards hold."""

    ref: StepRef
    record_type: type[ArrowRecord]


@dataclass
class ShardOutput:
    """What computing one shard returns: the records to commit and their statistics."""

    records: Sequence[ArrowRecord]
    stats: ShardStats = field(default_factory=ShardStats)


# compute(shard index, (records of that shard of each source, in source order)) -> output
ShardCompute = Callable[[int, tuple[list[Any], ...]], ShardOutput]


@dataclass(frozen=True)
class ShardEvent:
    """One shard finished (committed, or failed with `error`)."""

    target: StepRef
    index: int
    position: int
    total: int
    rows: int = 0
    compute_seconds: float = 0.0
    storage_seconds: float = 0.0
    error: str | None = None


ProgressCallback = Callable[[ShardEvent], None]


@dataclass(frozen=True)
class StepPlan:
    """A step about to run: its fingerprint, every shard index, and which are already done."""

    store: DatasetStore
    run: str
    target: StepRef
    record_type: type[ArrowRecord]
    fingerprint: str
    sources: tuple[Source, ...]
    indices: tuple[int, ...]
    done: frozenset[int]
    # The sources' manifests as planned, and shard index -> digest of the source shards that
    # shard is computed from (None for a step without sources).
    source_manifests: tuple[Manifest, ...] = ()
    inputs: dict[int, str] | None = None

    @property
    def pending(self) -> list[int]:
        """Shard indices not committed under this fingerprint when the step was planned."""
        return [i for i in self.indices if i not in self.done]

    @property
    def uri(self) -> str:
        return self.store.step_uri(self.run, *self.target)


@dataclass
class ShardsRun:
    """What one `run_shards` call did: the shards it committed (with their rows and statistics)
    and the ones that failed."""

    computed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    rows: dict[int, int] = field(default_factory=dict)
    stats: dict[int, ShardStats] = field(default_factory=dict)


def split_into_shards(records: Sequence[T], shard_size: int) -> list[list[T]]:
    """Consecutive shards of `shard_size` records (the last may be smaller), in order."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [
        list(records[start : start + shard_size]) for start in range(0, len(records), shard_size)
    ]


def slice_shards(indices: Sequence[int], workers: int) -> list[list[int]]:
    """Deal shard `indices` round-robin into at most `workers` slices; none is empty and every
    index is in exactly one. The same indices and count always give the same slices.

    Dealt, not cut into runs: a step resumed after a one-process attempt has its first shards
    done, and dealing spreads the rest over every slice.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    ordered = list(indices)
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"shard indices must be distinct, got {ordered}")
    return [ordered[k::workers] for k in range(min(workers, len(ordered)))]


def require_manifest(store: DatasetStore, run: str, ref: StepRef) -> Manifest:
    """The manifest of an input step, or a clear error saying which step to run first."""
    manifest = store.read_manifest(run, *ref)
    if manifest is None:
        raise UpstreamMissingError(
            f"{store.step_uri(run, *ref)} has no manifest: run the step that writes "
            f"{ref[0]}/{ref[1]} for run {run!r} first"
        )
    return manifest


def plan_step(
    store: DatasetStore,
    run: str,
    target: StepRef,
    record_type: type[ArrowRecord],
    config: Mapping[str, Any],
    sources: Sequence[Source] = (),
    shard_count: int | None = None,
) -> StepPlan:
    """Plan `target`: fingerprint = its `config` + its sources' fingerprints; shards = theirs.

    The sources' contents count per shard: shard i is committed only if it was computed from the
    source shards i that their manifests list now (`StepPlan.inputs`), so an upstream shard
    recomputed since re-derives exactly the shards that read it.

    A step without sources (data written from memory, e.g. ingested prompts) names its
    `shard_count` instead.
    """
    target = StepRef(*target)
    manifests = [require_manifest(store, run, source.ref) for source in sources]
    if manifests:
        indices = tuple(sorted(shard.index for shard in manifests[0].shards))
        for source, manifest in zip(sources[1:], manifests[1:], strict=True):
            other = tuple(sorted(shard.index for shard in manifest.shards))
            if other != indices:
                raise ValueError(
                    f"{target}: sources {sources[0].ref} and {source.ref} have different shards "
                    f"({len(indices)} vs {len(other)}); zipped sources must be sharded alike"
                )
    elif shard_count is not None:
        indices = tuple(range(shard_count))
    else:
        raise ValueError(f"{target}: a step without sources needs shard_count")
    fingerprint = config_fingerprint(
        {**config, "upstream": [manifest.fingerprint for manifest in manifests]}
    )
    inputs = (
        {
            index: inputs_digest([manifest.shard(index).rows_digest for manifest in manifests])
            for index in indices
        }
        if manifests
        else None
    )
    committed = store.completed_shards(run, *target, fingerprint, inputs)
    done = frozenset(committed) & frozenset(indices)
    plan = StepPlan(
        store,
        run,
        target,
        record_type,
        fingerprint,
        tuple(sources),
        indices,
        done,
        tuple(manifests),
        inputs,
    )
    logger.debug(
        "%s: %d shards, %d already done with fingerprint %s, %d to compute",
        target,
        len(indices),
        len(done),
        fingerprint,
        len(plan.pending),
    )
    return plan


def run_shards(
    plan: StepPlan,
    compute: ShardCompute,
    indices: Sequence[int] | None = None,
    progress: ProgressCallback | None = None,
    worker: str | None = None,
) -> ShardsRun:
    """Compute and commit `indices` (default: every pending shard); never seals.

    Shards already committed under the plan's fingerprint are skipped, so a worker handed a
    slice, or a retry, computes only what is missing. A failing shard is recorded and the others
    go on: one bad shard must not cost the finished ones. `worker` names who computes them: each
    shard's statistics record it.
    """
    wanted = plan.pending if indices is None else list(indices)
    unknown = sorted(set(wanted) - set(plan.indices))
    if unknown:
        raise ValueError(f"{plan.target}: shards {unknown} are not part of this step")
    todo = [i for i in wanted if i not in plan.done]
    store, run = plan.store, plan.run
    digests = plan.inputs or {}
    ran = ShardsRun()
    for position, index in enumerate(todo, start=1):
        started = time.perf_counter()
        try:
            # Read exactly the source shards the plan saw: one changed since is an error here.
            inputs = tuple(
                store.read_shard_records(
                    run, *source.ref, index, source.record_type, manifest.shard(index).sha256
                )
                for source, manifest in zip(plan.sources, plan.source_manifests, strict=True)
            )
            output = compute(index, inputs)
            computed = time.perf_counter() - started
            output.stats.seconds["compute"] = output.stats.seconds.get("compute", 0.0) + computed
            output.stats.worker = worker or output.stats.worker
            write_started = time.perf_counter()
            store.write_shard(
                run,
                *plan.target,
                index,
                list(output.records),
                plan.record_type,
                plan.fingerprint,
                stats=output.stats.model_dump(mode="json", exclude_none=True),
                inputs=digests.get(index, ""),
            )
        except Exception as err:  # noqa: BLE001 - one bad shard must not cost the finished ones
            ran.failed[index] = f"{type(err).__name__}: {err}"
            logger.error("%s shard %d failed: %s", plan.target, index, ran.failed[index])
            if progress:
                progress(
                    ShardEvent(plan.target, index, position, len(todo), error=ran.failed[index])
                )
            continue
        ran.computed.append(index)
        ran.rows[index] = len(output.records)
        ran.stats[index] = output.stats
        event = ShardEvent(
            plan.target,
            index,
            position,
            len(todo),
            rows=len(output.records),
            compute_seconds=computed,
            storage_seconds=time.perf_counter() - write_started,
        )
        logger.debug("%s shard %d committed: %d rows", plan.target, index, event.rows)
        if progress:
            progress(event)
    return ran


def read_committed(plan: StepPlan) -> dict[int, CommittedShard]:
    """The plan's shards committed on storage now (same fingerprint and inputs), with the
    statistics in their footers: what other processes (a scaled-out step's slices) wrote."""
    committed = plan.store.committed_shards(plan.run, *plan.target, plan.fingerprint, plan.inputs)
    indices = set(plan.indices)
    return {index: shard for index, shard in committed.items() if index in indices}


def replan(plan: StepPlan, committed: Iterable[int]) -> StepPlan:
    """The same plan with `committed` (e.g. `read_committed(plan)`) as its done shards."""
    return dataclasses.replace(plan, done=frozenset(committed) & frozenset(plan.indices))


def slice_result(plan: StepPlan, shards: Sequence[int], ran: ShardsRun) -> StepResult:
    """What one slice of a scaled-out step did: its shards computed now, their rows and
    statistics. Not sealed: the step's parent seals it once every slice is done."""
    stats = merge_stats(ran.stats.values())
    gain_mean, gain_median = gain_summary(stats.values.get("gain", []))
    return StepResult(
        stage=plan.target.stage,
        step=plan.target.step,
        uri=plan.uri,
        fingerprint=plan.fingerprint,
        rows=sum(ran.rows.values()),
        shards=len(shards),
        shards_computed=len(ran.computed),
        shards_skipped=len([i for i in shards if i in plan.done]),
        counts=stats.counts,
        gain_mean=gain_mean,
        gain_median=gain_median,
        seconds={k: round(v, 3) for k, v in stats.seconds.items()},
        sealed=False,
    )


def seal_step(
    plan: StepPlan,
    extra_counts: Mapping[str, int] | None = None,
    computed: int | None = None,
) -> StepResult:
    """Write the manifest once every shard of the plan is committed; the step's summary.

    Statistics come from the committed shards' footers, so a step finished over several
    attempts (or workers) reports all of its shards. `computed` is how many shards the caller
    computed itself (default: every shard that was pending when the step was planned).
    """
    manifest, shard_stats = plan.store.seal(
        plan.run, plan.target, plan.record_type, plan.fingerprint, list(plan.indices), plan.inputs
    )
    stats = merge_stats(ShardStats.model_validate(s) for s in shard_stats.values())
    for key, value in (extra_counts or {}).items():
        stats.counts[key] = value
    gain_mean, gain_median = gain_summary(stats.values.get("gain", []))
    means = {
        key: round(mean, 6)
        for key, values in sorted(stats.values.items())
        if key != "gain" and (mean := gain_summary(values)[0]) is not None
    }
    return StepResult(
        stage=plan.target.stage,
        step=plan.target.step,
        uri=plan.uri,
        fingerprint=manifest.fingerprint,
        rows=manifest.total_rows,
        shards=len(manifest.shards),
        shards_computed=len(plan.pending) if computed is None else computed,
        shards_skipped=len(plan.done),
        counts=stats.counts,
        gain_mean=gain_mean,
        gain_median=gain_median,
        means=means,
        seconds={k: round(v, 3) for k, v in stats.seconds.items()},
    )


def raise_failed_shards(plan: StepPlan, ran: ShardsRun) -> None:
    """`ShardsFailedError` naming every shard of `ran` that failed, if any did."""
    if ran.failed:
        listing = "; ".join(f"shard {i}: {why}" for i, why in sorted(ran.failed.items()))
        raise ShardsFailedError(
            f"{plan.uri}: {len(ran.failed)} of {len(plan.indices)} shards failed "
            f"(the others are committed; re-run to compute only these): {listing}"
        )


def run_step(
    plan: StepPlan,
    compute: ShardCompute,
    progress: ProgressCallback | None = None,
    extra_counts: Mapping[str, int] | None = None,
    worker: str | None = None,
) -> StepResult:
    """Every pending shard in this process, then the seal; failed shards raise after the rest."""
    ran = run_shards(plan, compute, progress=progress, worker=worker)
    raise_failed_shards(plan, ran)
    return seal_step(plan, extra_counts, computed=len(ran.computed))
