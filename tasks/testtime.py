"""Test-time tasks: starting answers (the model's own, or another system's file), N refinement
rounds, and autonomous thinking. Rules live in avr_core.testtime; engines load lazily.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from avr_core.config import ExecutionConfig, ModelSpec, RefineConfig, ThinkConfig
from avr_core.devices import sharing_gpu_memory
from avr_core.engines.base import Generator, RewardModel
from avr_core.fingerprint import (
    answers_step_config,
    own_answers_step_config,
    refine_step_config,
    think_step_config,
)
from avr_core.ingest import read_answers, source_sha256
from avr_core.layout import RunLayout
from avr_core.results import StepResult
from avr_core.schemas import Lineage, PromptRecord, RefinedAnswers, ThoughtAnswer
from avr_core.step_kinds import own_answer_shards, refine_shards, think_shards
from avr_core.steps import ShardOutput, Source, StepIO, plan_step, split_into_shards
from avr_core.templates import load_templates
from tasks.engines import LazyEngine, open_generator, open_reward_model, open_store, settings
from tasks.prompts import retry_transient_only
from tasks.step_runner import execute_plan
from tasks.trees import revision_of

__all__ = ["import_answers_task", "own_answers_task", "refine_task", "think_task"]

_SHARD_RETRIES = {"retries": 1, "retry_delay_seconds": 5}


def _lineage(io: StepIO, policy: ModelSpec) -> Lineage:
    return Lineage(
        run=io.run, stage=io.target.stage, step=io.target.step, generator=policy.model_id
    )


@task(
    name="import-answers",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient_only,
)
def import_answers_task(io: StepIO, refine: RefineConfig) -> StepResult:
    """Reads: another system's outputs (`refine.answers`). Writes: RefinedAnswers round 0.

    Fingerprint: the file's bytes, bad-row handling and shard size. Bad rows fail naming the
    file/row/field, or (on_bad_row=skip) go to the run's rejects file.
    """
    if refine.answers is None:
        raise ValueError("refine.answers names no file of answers to import")
    config = settings()
    store = open_store(io.storage_root, config)
    read = read_answers(
        refine.answers,
        on_bad_row=refine.on_bad_row,
        rejects_path=store.uri(RunLayout(io.run).rejects(io.target)),
        storage_options=config.storage_options,
    )
    if not read.answers:
        raise ValueError(f"{refine.answers}: no usable answers ({read.rejects} rejected)")
    shards = split_into_shards(read.answers, refine.shard_size)
    get_run_logger().info(
        "%d answers from %s in %d shards (%d rejected, %d duplicates)",
        len(read.answers),
        refine.answers,
        len(shards),
        read.rejects,
        read.duplicates,
    )
    plan = plan_step(
        store,
        io.run,
        io.target,
        RefinedAnswers,
        answers_step_config(source_sha256(refine.answers, config.storage_options), refine),
        shard_count=len(shards),
    )
    return execute_plan(
        plan,
        lambda index, _: ShardOutput(shards[index]),
        extra_counts={
            "prompts_in": len(read.answers),
            "rejected_rows": read.rejects,
            "duplicates": read.duplicates,
        },
    )


@task(name="own-answers", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def own_answers_task(
    io: StepIO, policy: ModelSpec, refine: RefineConfig, execution: ExecutionConfig
) -> StepResult:
    """Reads: prompts. Writes: RefinedAnswers round 0, answered by `policy` itself.

    Fingerprint: the policy (+ revision), the sampling, the prompts.
    """
    plan = plan_step(
        open_store(io.storage_root),
        io.run,
        io.target,
        RefinedAnswers,
        own_answers_step_config(policy, revision_of(policy), refine.sampling),
        [Source(io.source, PromptRecord)],
    )
    engine: LazyEngine[Generator] = LazyEngine(lambda: open_generator(policy, execution))
    compute = own_answer_shards(engine.get, refine.sampling, _lineage(io, policy))
    return execute_plan(plan, compute, engine, execution=execution, models=[policy])


@task(name="refine", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def refine_task(
    io: StepIO,
    models: tuple[ModelSpec, ModelSpec | None],
    refine: RefineConfig,
    templates_dir: str | None,
    execution: ExecutionConfig,
) -> StepResult:
    """Reads: starting answers (RefinedAnswers round 0). Writes: RefinedAnswers rounds 0..N.

    `models` = (the refining Stage I model, an optional reward model that scores every round and
    decides keep_best). Fingerprint: both models, templates, rounds, sampling, keep_best, the
    starting answers.
    """
    policy, reward = models
    templates = load_templates(templates_dir)
    plan = plan_step(
        open_store(io.storage_root),
        io.run,
        io.target,
        RefinedAnswers,
        refine_step_config(
            policy,
            revision_of(policy),
            reward,
            None if reward is None else revision_of(reward),
            templates.version,
            refine,
        ),
        [Source(io.source, RefinedAnswers)],
    )
    # Policy and reward model in one process: two vLLM engines split the GPU memory.
    together = sharing_gpu_memory(execution, [policy, reward])
    generator: LazyEngine[Generator] = LazyEngine(lambda: open_generator(policy, together))
    engines: list[LazyEngine[Generator] | LazyEngine[RewardModel]] = [generator]
    scorer = None
    if reward is not None:
        reward_spec = reward
        scorer = LazyEngine(lambda: open_reward_model(reward_spec, together))
        engines.append(scorer)
    compute = refine_shards(
        generator.get, scorer.get if scorer is not None else None, templates, refine
    )
    return execute_plan(plan, compute, engines, execution=execution, models=[policy, reward])


@task(name="think", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def think_task(
    io: StepIO, policy: ModelSpec, think: ThinkConfig, execution: ExecutionConfig
) -> StepResult:
    """Reads: prompts. Writes: ThoughtAnswer rows (long response, final answer, retries).

    Fingerprint: the (Stage II) model (+ revision), sampling, retry bound, the prompts.
    """
    plan = plan_step(
        open_store(io.storage_root),
        io.run,
        io.target,
        ThoughtAnswer,
        think_step_config(policy, revision_of(policy), think),
        [Source(io.source, PromptRecord)],
    )
    engine: LazyEngine[Generator] = LazyEngine(lambda: open_generator(policy, execution))
    compute = think_shards(engine.get, think, _lineage(io, policy))
    return execute_plan(plan, compute, engine, execution=execution, models=[policy])
