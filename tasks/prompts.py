"""Prompt tasks: read, validate and shard a prompt set into a run's input step."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from avr_core.config import IngestConfig
from avr_core.fingerprint import ingest_step_config
from avr_core.ingest import bundled_prompts_path, read_prompts, source_sha256
from avr_core.layout import RunLayout
from avr_core.results import StepResult
from avr_core.schemas import PromptRecord
from avr_core.steps import ShardOutput, StepIO, plan_step, split_into_shards
from tasks.engines import open_store, settings
from tasks.step_runner import execute_plan

__all__ = ["ingest_prompts_task"]


@task(
    name="ingest-prompts",
    cache_policy=NO_CACHE,
    # Reading the prompt source or storage can fail transiently; a retry skips committed shards.
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
)
def ingest_prompts_task(io: StepIO, ingest: IngestConfig) -> StepResult:
    """Reads: the prompt source. Writes: PromptRecord shards of `ingest.shard_size` prompts.

    Fingerprint: the source's bytes and the ingest settings. Bad rows fail the task naming
    file/row/field, or (on_bad_row=skip) go to the run's rejects file.
    """
    config = settings()
    run, target = io.run, io.target
    store = open_store(io.storage_root, config)
    source = ingest.prompts or bundled_prompts_path()
    ingested = read_prompts(
        source,
        on_bad_row=ingest.on_bad_row,
        rejects_path=store.uri(RunLayout(run).rejects(target)),
        storage_options=config.storage_options,
    )
    records = ingested.prompts[: ingest.max_prompts] if ingest.max_prompts else ingested.prompts
    if not records:
        raise ValueError(f"{source}: no usable prompts ({ingested.rejects} rejected)")
    shards = split_into_shards(records, ingest.shard_size)
    get_run_logger().info(
        "%d prompts from %s in %d shards (%d rejected, %d duplicates)",
        len(records),
        source,
        len(shards),
        ingested.rejects,
        ingested.duplicates,
    )
    plan = plan_step(
        store,
        run,
        target,
        PromptRecord,
        ingest_step_config(source_sha256(source, config.storage_options), ingest),
        shard_count=len(shards),
    )
    return execute_plan(
        plan,
        lambda index, _: ShardOutput(shards[index]),
        extra_counts={
            "prompts_in": len(records),
            "rejected_rows": ingested.rejects,
            "duplicates": ingested.duplicates,
        },
    )
