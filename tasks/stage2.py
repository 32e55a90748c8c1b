"""Stage II tasks: greedy search, trajectories, k long responses, their scores, LC pairs.

Each loads its engines once (lazily: not at all when every shard is already done) and hands one
function per shard to the step protocol; the rules live in avr_core.recursive and
avr_core.selection.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from avr_core.config import (
    ExecutionConfig,
    LongResponseConfig,
    ModelSpec,
    SearchConfig,
    SelectionConfig,
)
from avr_core.devices import sharing_gpu_memory
from avr_core.engines.base import Generator, RewardModel
from avr_core.fingerprint import (
    long_response_step_config,
    search_step_config,
    selection_step_config,
)
from avr_core.results import StepResult
from avr_core.schemas import (
    CoTSample,
    GreedySearch,
    Lineage,
    PreferencePair,
    PromptRecord,
    SFTExample,
)
from avr_core.step_kinds import (
    lc_pair_shards,
    long_response_shards,
    long_scoring_shards,
    search_shards,
    trajectory_shards,
)
from avr_core.steps import Source, StepIO, plan_step
from avr_core.templates import load_templates
from tasks.engines import LazyEngine, open_generator, open_reward_model, open_store
from tasks.step_runner import execute_plan
from tasks.trees import revision_of, score_step

__all__ = [
    "build_lc_pairs_task",
    "greedy_search_task",
    "sample_long_responses_task",
    "score_long_responses_task",
    "select_trajectories_task",
]

# A retry recomputes only the shards that are not committed yet.
_SHARD_RETRIES = {"retries": 1, "retry_delay_seconds": 5}


@task(name="greedy-search", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def greedy_search_task(
    io: StepIO,
    models: tuple[ModelSpec, ModelSpec],
    search: SearchConfig,
    templates_dir: str | None,
    execution: ExecutionConfig,
) -> StepResult:
    """Reads: prompts (PromptRecord). Writes: one GreedySearch per prompt.

    `models` = (policy, reward model): every round generates with one and scores with the other,
    so both stay loaded. Fingerprint: both models (+ revisions), templates, search settings.
    """
    policy, reward = models
    templates = load_templates(templates_dir)
    plan = plan_step(
        open_store(io.storage_root),
        io.run,
        io.target,
        GreedySearch,
        search_step_config(
            policy, revision_of(policy), reward, revision_of(reward), templates.version, search
        ),
        [Source(io.source, PromptRecord)],
    )
    lineage = Lineage(
        run=io.run,
        stage=io.target.stage,
        step=io.target.step,
        generator=policy.model_id,
        reward_model=reward.model_id,
        template_version=templates.version,
        sampling=search.sampling,
    )
    # Both engines run in this one process, from the worker's first GPU on: two vLLM engines
    # split execution.gpu_memory_utilization between them. A big reward model is better served
    # by `vllm serve` (backend openai), or spread over more GPUs (tensor_parallel_size).
    together = sharing_gpu_memory(execution, [policy, reward])
    generator: LazyEngine[Generator] = LazyEngine(lambda: open_generator(policy, together))
    scorer: LazyEngine[RewardModel] = LazyEngine(lambda: open_reward_model(reward, together))
    compute = search_shards(generator.get, scorer.get, templates, search, lineage)
    return execute_plan(
        plan, compute, (generator, scorer), execution=execution, models=[policy, reward]
    )


@task(name="select-trajectories", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def select_trajectories_task(
    io: StepIO, selection: SelectionConfig, templates_dir: str | None
) -> StepResult:
    """Reads: searches (GreedySearch). Writes: SFTExample rows of kind "trajectory".

    Fingerprint: selection thresholds, templates, the searches.
    """
    templates = load_templates(templates_dir)
    plan = plan_step(
        open_store(io.storage_root),
        io.run,
        io.target,
        SFTExample,
        selection_step_config("trajectories", selection, templates.version),
        [Source(io.source, GreedySearch)],
    )
    return execute_plan(plan, trajectory_shards(selection, templates))


@task(name="sample-long-responses", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def sample_long_responses_task(
    io: StepIO, policy: ModelSpec, long: LongResponseConfig, execution: ExecutionConfig
) -> StepResult:
    """Reads: searches (their prompts and starting scores). Writes: CoTSample rows, unscored.

    Fingerprint: the (Stage II SFT) policy (+ revision), sampling, the searches.
    """
    plan = plan_step(
        open_store(io.storage_root),
        io.run,
        io.target,
        CoTSample,
        long_response_step_config(policy, revision_of(policy), long),
        [Source(io.source, GreedySearch)],
    )
    lineage = Lineage(
        run=io.run,
        stage=io.target.stage,
        step=io.target.step,
        generator=policy.model_id,
        sampling=long.sampling,
    )
    engine: LazyEngine[Generator] = LazyEngine(lambda: open_generator(policy, execution))
    compute = long_response_shards(engine.get, long, lineage)
    return execute_plan(plan, compute, engine, execution=execution, models=[policy])


@task(name="score-long-responses", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def score_long_responses_task(
    io: StepIO, reward: ModelSpec, execution: ExecutionConfig
) -> StepResult:
    """Reads: CoTSample rows. Writes: the same with every parsed final answer scored.

    Fingerprint: the reward model (+ revision) and the responses.
    """
    return score_step(io, reward, execution, CoTSample, long_scoring_shards)


@task(name="build-lc-pairs", cache_policy=NO_CACHE, **_SHARD_RETRIES)
def build_lc_pairs_task(io: StepIO, selection: SelectionConfig) -> StepResult:
    """Reads: scored CoTSample rows. Writes: PreferencePair rows of kind "trajectory".

    Fingerprint: selection thresholds and the scored responses.
    """
    plan = plan_step(
        open_store(io.storage_root),
        io.run,
        io.target,
        PreferencePair,
        {"step": "lc_pairs", "selection": selection.model_dump(mode="json")},
        [Source(io.source, CoTSample)],
    )
    return execute_plan(plan, lc_pair_shards(selection))
