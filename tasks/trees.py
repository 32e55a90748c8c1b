"""Refinement-tree tasks: build trees with a policy, score them with a reward model.

Each loads its engine once (lazily: not at all when every shard is already done) and hands one
function per shard to the step protocol; the rules live in avr_core.synthesis.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from avr_core.checkpoints import model_revision
from avr_core.config import ExecutionConfig, ModelSpec, OpenAIModel, RulesModel, TreeConfig
from avr_core.engines.base import Generator, RewardModel
from avr_core.fingerprint import scoring_step_config, tree_step_config
from avr_core.results import StepResult
from avr_core.schemas import ArrowRecord, Lineage, PromptRecord, RefinementTree
from avr_core.step_kinds import scoring_shards, tree_shards
from avr_core.steps import ShardCompute, Source, StepIO, plan_step
from avr_core.templates import load_templates
from tasks.engines import (
    LazyEngine,
    open_generator,
    open_reward_model,
    open_store,
    settings,
)
from tasks.step_runner import execute_plan

__all__ = ["generate_trees_task", "revision_of", "score_step", "score_trees_task"]

# A retry recomputes only the shards that are not committed yet.
_SHARD_RETRIES = {"retries": 1, "retry_delay_seconds": 5}


def revision_of(spec: ModelSpec) -> str | None:
    """The training fingerprint of a model this factory trained (None for any other model)."""
    if isinstance(spec, OpenAIModel | RulesModel):
        return None
    return model_revision(spec.path, settings().storage_options)


@task(name="generate-trees", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def generate_trees_task(
    io: StepIO,
    policy: ModelSpec,
    tree: TreeConfig,
    templates_dir: str | None,
    execution: ExecutionConfig,
) -> StepResult:
    """Reads: prompts (PromptRecord). Writes: trees (RefinementTree).

    Fingerprint: policy (+ the revision of a trained one), templates, tree settings, prompts.
    """
    templates = load_templates(templates_dir)
    plan = plan_step(
        open_store(io.storage_root),
        io.run,
        io.target,
        RefinementTree,
        tree_step_config(policy, revision_of(policy), templates.version, tree),
        [Source(io.source, PromptRecord)],
    )
    lineage = Lineage(
        run=io.run,
        stage=io.target.stage,
        step=io.target.step,
        generator=policy.model_id,
        template_version=templates.version,
        sampling=tree.sampling,
    )
    engine: LazyEngine[Generator] = LazyEngine(lambda: open_generator(policy, execution))

    compute = tree_shards(engine.get, templates, tree, lineage)
    return execute_plan(plan, compute, engine, execution=execution, models=[policy])


def score_step(
    io: StepIO,
    reward: ModelSpec,
    execution: ExecutionConfig,
    record_type: type[ArrowRecord],
    shards: Callable[[Callable[[], RewardModel]], ShardCompute],
) -> StepResult:
    """A scoring step: `record_type` rows in, the same rows scored by `reward` out.

    Fingerprint: the reward model (+ its revision) and the rows (the upstream fingerprint).
    """
    plan = plan_step(
        open_store(io.storage_root),
        io.run,
        io.target,
        record_type,
        scoring_step_config(reward, revision_of(reward)),
        [Source(io.source, record_type)],
    )
    engine: LazyEngine[RewardModel] = LazyEngine(lambda: open_reward_model(reward, execution))
    return execute_plan(plan, shards(engine.get), engine, execution=execution, models=[reward])


@task(name="score-trees", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def score_trees_task(io: StepIO, reward: ModelSpec, execution: ExecutionConfig) -> StepResult:
    """Reads: trees (RefinementTree). Writes: the same trees with every candidate scored.

    Fingerprint: the reward model (+ its revision) and the trees.
    """
    return score_step(io, reward, execution, RefinementTree, scoring_shards)
