"""Prompt tasks: read, validate and shard a prompt set into a run's input step."""

from __future__ import annotations

from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import exponential_backoff

from avr_core.config import IngestConfig, ModelSpec, TreeConfig
from avr_core.fingerprint import ingest_step_config
from avr_core.ingest import (
    TokenCounter,
    is_retryable_ingest_error,
    load_chat_token_counter,
    model_context_length,
    prompt_token_limit,
    read_prompts,
    resolve_prompt_source,
    source_sha256,
)
from avr_core.layout import RunLayout
from avr_core.results import StepResult
from avr_core.schemas import PromptRecord
from avr_core.settings import AvrSettings
from avr_core.steps import ShardOutput, StepIO, plan_step, split_into_shards
from tasks.engines import local_model_dir, open_store, settings
from tasks.step_runner import execute_plan

__all__ = ["ingest_prompts_task", "retry_transient_only"]


def retry_transient_only(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's retry_condition_fn: a bad or missing source fails the same way every time."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and is_retryable_ingest_error(error)


def _token_limit(
    ingest: IngestConfig, policy: ModelSpec | None, tree: TreeConfig | None, config: AvrSettings
) -> tuple[int | None, TokenCounter | None]:
    """The prompt token limit and the policy's token counter, or (None, None) without a tokenizer.

    An explicit `max_prompt_tokens` wins; else the policy's context minus the tree's room.
    """
    model_dir = local_model_dir(policy, config) if policy is not None else None
    if model_dir is None:
        if ingest.max_prompt_tokens is not None:
            raise ValueError(
                "ingest.max_prompt_tokens needs the policy's tokenizer: "
                + (
                    "this flow passes no policy"
                    if policy is None
                    else f"{policy.model_id} has none"
                )
            )
        return None, None
    limit = ingest.max_prompt_tokens
    if limit is None:
        context = model_context_length(model_dir)
        if context is None:
            return None, None
        limit = prompt_token_limit(context, (tree or TreeConfig()).sampling.max_tokens)
    return limit, load_chat_token_counter(model_dir)


@task(
    name="ingest-prompts",
    cache_policy=NO_CACHE,
    # Reading the prompt source or storage can fail transiently; a retry skips committed shards.
    # A bad, missing or unreadable source is not retried: it would fail the same way again.
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_condition_fn=retry_transient_only,
)
def ingest_prompts_task(
    io: StepIO,
    ingest: IngestConfig,
    policy: ModelSpec | None = None,
    tree: TreeConfig | None = None,
) -> StepResult:
    """Reads: the prompt source. Writes: PromptRecord shards of `ingest.shard_size` prompts.

    Fingerprint: the source's bytes and the ingest settings (with the token limit in effect and
    the tokenizer's model). Bad rows (malformed, not UTF-8, too long) fail the task naming
    file/row/field, or (on_bad_row=skip) go to the run's rejects file. Given the `policy` (and
    the `tree`, for the room its generations take), prompts are also limited in tokens.
    """
    config = settings()
    run, target = io.run, io.target
    store = open_store(io.storage_root, config)
    source = resolve_prompt_source(ingest.prompts)
    token_limit, count_tokens = _token_limit(ingest, policy, tree, config)
    rejects_path = store.uri(RunLayout(run).rejects(target))
    ingested = read_prompts(
        source,
        on_bad_row=ingest.on_bad_row,
        rejects_path=rejects_path,
        storage_options=config.storage_options,
        max_prompt_chars=ingest.max_prompt_chars,
        max_prompt_tokens=token_limit,
        count_tokens=count_tokens,
    )
    records = ingested.prompts[: ingest.max_prompts] if ingest.max_prompts else ingested.prompts
    if not records:
        raise ValueError(
            f"{source}: no usable prompts ({ingested.rejects} rejected"
            + (f", reasons in {ingested.rejects_path})" if ingested.rejects_path else ")")
        )
    shards = split_into_shards(records, ingest.shard_size)
    get_run_logger().info(
        "%d prompts from %s in %d shards (%d rejected, %d duplicates; token limit %s)",
        len(records),
        source,
        len(shards),
        ingested.rejects,
        ingested.duplicates,
        token_limit,
    )
    step_config = ingest_step_config(
        source_sha256(source, config.storage_options),
        ingest.model_copy(update={"max_prompt_tokens": token_limit}),
    )
    if token_limit is not None and policy is not None:
        step_config["tokenizer"] = policy.model_id  # which prompts fit depends on the tokenizer
    plan = plan_step(store, run, target, PromptRecord, step_config, shard_count=len(shards))
    return execute_plan(
        plan,
        lambda index, _: ShardOutput(shards[index]),
        extra_counts={
            "prompts_in": len(records),
            "rejected_rows": ingested.rejects,
            "duplicates": ingested.duplicates,
        },
    )
