"""One step over N workers, on Prefect's own machinery: work pools, workers, `run_deployment`
(DESIGN section 8).

A step task that loads a model (transformers, vLLM) and runs with `execution.workers > 1`
computes nothing itself. `run_slices` deals the step's shards into slices
(`avr_core.steps.slice_shards`), launches one flow run of `execution.slice_deployment` (the
`step-slice` flow, flows/slices.py) per slice with pending shards, linked to the step's task as a
subflow so the UI shows each slice under it, waits for them, and seals the step once from what
storage holds. A child calls the same task with `execution.shards` set (`slice_arguments`): the
ordinary step code, one engine load, its shards committed one by one, nothing sealed.

Only the task's name and its parameters as JSON go to a child. The parent learns what the
children did from storage (each shard's footer names its worker), never from Prefect's result
persistence.

Retries. A child's idempotency key is storage root, run, step, fingerprint, slice k of n and a
generation.
Slices are dealt from all of the step's shards, not only the pending ones, so a retried parent
computes the same keys: a child still running from an earlier attempt is waited for, never
doubled. A child that ended (failed, crashed, cancelled) leaving shards of its slice uncommitted
is replaced by the next generation, which computes only those. Children of the same step still
running under another slicing (a parent re-run with another `workers`) are waited for first, so
two children never compute one shard at once.

GPUs. A slice's flow run asks its pool for as many GPUs as the step's largest engine takes
(`avr_core.devices.gpus_for`: tensor x pipeline parallel), through the pool's `gpu_count` job
variable where its template has one (deployments/job_templates/gpu-kubernetes.json);
`execution.slice_job_variables` overrides it.
"""

from __future__ import annotations

import functools
import inspect
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterIdempotencyKey,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.context import TaskRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from pydantic import TypeAdapter

from avr_core.config import ExecutionConfig, ModelSpec, TransformersModel, VLLMModel
from avr_core.devices import gpus_for
from avr_core.fingerprint import sha256_hex
from avr_core.reporting import SliceProgress, render_slices_markdown
from avr_core.results import StepResult
from avr_core.steps import (
    ShardsFailedError,
    StepPlan,
    read_committed,
    replan,
    seal_step,
    slice_shards,
)
from avr_core.storage import CommittedShard, token_totals
from tasks.runlog import artifact_key, check_run_lease

__all__ = [
    "SliceDeploymentMissingError",
    "SlicesFailedError",
    "fans_out",
    "loads_model",
    "run_slices",
    "slice_arguments",
    "slice_job_variables",
    "slice_key",
    "task_parameters_from_json",
    "task_parameters_to_json",
]

# How often the parent reads its children's states: a slice runs for minutes to hours.
POLL_SECONDS = 2.0
# How often the parent's slice artifact is brought up to date while the children run.
PROGRESS_SECONDS = 30.0
# The job variable of a pool's template that sets a flow run's GPU count (Kubernetes template).
GPU_COUNT_VARIABLE = "gpu_count"
# A child still waiting for a worker after this long gets a warning naming its pool.
UNCLAIMED_WARNING_SECONDS = 300.0


class SlicesFailedError(ShardsFailedError):
    """Slices of a scaled-out step ended without committing all their shards (the committed
    ones stay; a retry computes only the missing ones)."""


class SliceDeploymentMissingError(RuntimeError):
    """The deployment the slices run on does not exist on the Prefect server."""


def loads_model(spec: ModelSpec | None) -> bool:
    """Whether a step with this model loads weights on its worker (transformers, vLLM): the
    steps worth a worker each. Rules rewards and served (openai) models run in-process."""
    return isinstance(spec, TransformersModel | VLLMModel)


def fans_out(
    plan: StepPlan, execution: ExecutionConfig | None, models: Sequence[ModelSpec | None]
) -> bool:
    """Whether this process hands the step's pending shards to slices on other workers."""
    return (
        execution is not None
        and execution.shards is None
        and execution.workers > 1
        and bool(plan.pending)
        and any(loads_model(model) for model in models)
    )


# ---- a task's parameters as JSON, and back -----------------------------------------------------


@functools.cache
def _parameter_adapters(fn: Callable[..., Any]) -> dict[str, TypeAdapter[Any]]:
    """One pydantic adapter per parameter of `fn`, from its type hints (Annotated kept: model
    specs are unions discriminated by `backend`)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    return {name: TypeAdapter(hints[name]) for name in inspect.signature(fn).parameters}


def task_parameters_to_json(
    fn: Callable[..., Any], parameters: Mapping[str, Any]
) -> dict[str, Any]:
    """A task's call parameters as JSON-ready values, each dumped by its parameter's type."""
    adapters = _parameter_adapters(fn)
    unknown = sorted(set(parameters) - set(adapters))
    if unknown:
        raise TypeError(f"{fn.__qualname__} has no parameter(s) {unknown}")
    return {
        name: adapters[name].dump_python(value, mode="json") for name, value in parameters.items()
    }


def task_parameters_from_json(fn: Callable[..., Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """The typed call parameters of `fn` from `task_parameters_to_json`'s output."""
    adapters = _parameter_adapters(fn)
    unknown = sorted(set(data) - set(adapters))
    if unknown:
        raise TypeError(f"{fn.__qualname__} has no parameter(s) {unknown}")
    return {name: adapters[name].validate_python(value) for name, value in data.items()}


def slice_arguments(arguments: Mapping[str, Any], shards: Sequence[int]) -> dict[str, Any]:
    """A step task's arguments for one slice: its execution computes `shards` in-process and
    seals nothing."""
    names = [name for name, value in arguments.items() if isinstance(value, ExecutionConfig)]
    if len(names) != 1:
        raise ValueError(f"a sliced step task takes one ExecutionConfig argument, got {names}")
    (name,) = names
    execution = arguments[name].model_copy(update={"workers": 1, "shards": list(shards)})
    return {**arguments, name: execution}


def _current_task_call() -> tuple[str, dict[str, Any]]:
    """The running task's name and its parameters as JSON: what a child needs to run it."""
    context = TaskRunContext.get()
    if context is None:
        raise RuntimeError(
            "execution.workers > 1 scales a step out from its Prefect task; this step runs "
            "outside one (call the task, or set execution.workers to 1)"
        )
    return context.task.name, task_parameters_to_json(context.task.fn, context.parameters)


# ---- the parent: launch, wait, seal ------------------------------------------------------------


@dataclass
class _Slice:
    """One slice: every shard dealt to it, those pending at launch, and its child flow run."""

    index: int
    shards: list[int]
    todo: list[int]
    flow_run: FlowRun | None = None


def _step_key(plan: StepPlan) -> str:
    """What every child key of this step starts with. The storage root is in it (hashed: a
    bucket name is not for the UI), so two teams' runs of one name on one server stay apart."""
    root = sha256_hex(plan.store.root.encode())[:12]
    return f"{root}:{plan.run}:{plan.target}:{plan.fingerprint}:"


def slice_key(plan: StepPlan, index: int, count: int, generation: int) -> str:
    """The idempotency key of slice `index` of `count` of a step: the same for every attempt of
    its parent; `generation` counts the children that ended before computing all of it."""
    return f"{_step_key(plan)}slice-{index}-of-{count}:{generation}"


def slice_job_variables(
    chosen: Mapping[str, Any], template_variables: Sequence[str], gpus: int
) -> dict[str, Any]:
    """A slice's job variables: `chosen` (execution.slice_job_variables) over the GPU count its
    engines need, where the pool's template has a variable for it (process pools do not)."""
    derived = (
        {GPU_COUNT_VARIABLE: gpus} if gpus and GPU_COUNT_VARIABLE in template_variables else {}
    )
    return {**derived, **chosen}


def _state(run: FlowRun | None) -> str:
    return run.state.type.value if run is not None and run.state is not None else "-"


def _slice_pool(client: SyncPrefectClient, execution: ExecutionConfig) -> tuple[str, list[str]]:
    """The work pool of the slice deployment and its template's job variables."""
    try:
        deployment = client.read_deployment_by_name(execution.slice_deployment)
    except ObjectNotFound as err:
        raise SliceDeploymentMissingError(
            f"execution.workers={execution.workers} runs the slices on deployment "
            f"{execution.slice_deployment!r}, which the Prefect server does not have: deploy it "
            f"(prefect deploy --prefect-file deployments/prefect.yaml --name "
            f"{execution.slice_deployment}) or set execution.slice_deployment"
        ) from err
    pool = deployment.work_pool_name or execution.slice_deployment
    if deployment.work_pool_name is None:
        return pool, []
    template = client.read_work_pool(deployment.work_pool_name).base_job_template
    return pool, sorted(template.get("variables", {}).get("properties", {}))


def _other_slicings(client: SyncPrefectClient, plan: StepPlan, count: int) -> list[FlowRun]:
    """Children of this step (same root, run, fingerprint) still running under another slice
    count: left by an earlier parent run with another `workers`."""
    running = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=["step-slice", plan.run]),
            state=FlowRunFilterState(
                type=FlowRunFilterStateType(
                    not_any_=[
                        StateType.COMPLETED,
                        StateType.FAILED,
                        StateType.CRASHED,
                        StateType.CANCELLED,
                    ]
                )
            ),
        )
    )
    prefix = _step_key(plan)
    return [
        run
        for run in running
        if (run.idempotency_key or "").startswith(prefix)
        and f"-of-{count}:" not in (run.idempotency_key or "")
    ]


def _launch(
    client: SyncPrefectClient,
    plan: StepPlan,
    call: tuple[str, dict[str, Any]],
    piece: _Slice,
    count: int,
    deployment: str,
    job_variables: Mapping[str, Any],
) -> FlowRun:
    """The child flow run of `piece`: one still running from an earlier attempt, or a new one."""
    logger = get_run_logger()
    generation = 0
    while True:
        key = slice_key(plan, piece.index, count, generation)
        earlier = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[key])),
            limit=1,
        )
        if not earlier:
            break
        child = earlier[0]
        if child.state is None or not child.state.is_final():
            logger.info(
                "%s slice %d: %s from an earlier attempt is still %s; waiting for it",
                plan.target,
                piece.index,
                child.name,
                _state(child),
            )
            return child
        # It ended, and this slice still has pending shards (else it would not be launched):
        # the next generation computes only those.
        generation += 1
    task_name, parameters = call
    name = f"{plan.run}-{plan.target.step}-slice-{piece.index}"
    created = run_deployment(
        name=deployment,
        parameters={"task_name": task_name, "parameters": parameters, "shards": piece.todo},
        flow_run_name=f"{name}-retry-{generation}" if generation else name,
        timeout=0,  # launch only: the parent polls every child below
        idempotency_key=key,
        tags=["avr", "step-slice", plan.run],
        job_variables=dict(job_variables) or None,
    )
    # A sync task has no event loop: run_deployment ran synchronously and returned the run.
    assert isinstance(created, FlowRun)
    logger.info(
        "%s slice %d: shards %s -> flow run %s on %s%s",
        plan.target,
        piece.index,
        piece.todo,
        created.name,
        deployment,
        f" with {job_variables}" if job_variables else "",
    )
    return created


def _wait_for_earlier(client: SyncPrefectClient, plan: StepPlan, runs: list[FlowRun]) -> None:
    """Wait until children of another slicing of this step have ended."""
    logger = get_run_logger()
    logger.info(
        "%s: %d child flow run(s) of an earlier slicing still run (%s); waiting for them before "
        "dealing the step anew",
        plan.target,
        len(runs),
        ", ".join(run.name for run in runs),
    )
    waiting = list(runs)
    while waiting:
        waiting = [client.read_flow_run(run.id) for run in waiting]
        waiting = [run for run in waiting if run.state is None or not run.state.is_final()]
        check_run_lease(plan.store.root, plan.run)
        if waiting:
            time.sleep(POLL_SECONDS)


def _wait(
    client: SyncPrefectClient,
    plan: StepPlan,
    pieces: list[_Slice],
    pool: str,
    publish: Callable[[], None],
) -> None:
    """Poll the children until every one has ended; log each change of state, and `publish`
    their progress on each change and every PROGRESS_SECONDS."""
    logger = get_run_logger()
    started = time.monotonic()
    published = started
    seen: dict[int, str] = {}
    warned = False
    waiting = list(pieces)
    while waiting:
        changed = False
        for piece in list(waiting):
            assert piece.flow_run is not None
            piece.flow_run = client.read_flow_run(piece.flow_run.id)
            state = _state(piece.flow_run)
            if seen.get(piece.index) != state:
                seen[piece.index] = state
                changed = True
                logger.info(
                    "%s slice %d (%s): %s", plan.target, piece.index, piece.flow_run.name, state
                )
            if piece.flow_run.state is not None and piece.flow_run.state.is_final():
                waiting.remove(piece)
        if waiting and (changed or time.monotonic() - published >= PROGRESS_SECONDS):
            publish()
            published = time.monotonic()
        unclaimed = [p.index for p in waiting if seen.get(p.index) in ("SCHEDULED", "PENDING")]
        if unclaimed and not warned and time.monotonic() - started > UNCLAIMED_WARNING_SECONDS:
            warned = True
            logger.warning(
                "%s slices %s still wait for a worker of %s: start workers on its pool",
                plan.target,
                unclaimed,
                pool,
            )
        # The parent holds the run's lease for its children: stop if another run took it over.
        check_run_lease(plan.store.root, plan.run)
        if waiting:
            time.sleep(POLL_SECONDS)


class _LiveProgress:
    """The slice artifact and a progress bar, kept up to date while the children run from one
    listing of the step per update (no shard is read): a shard pending at launch counts as done
    once its file has been written since. `finish` shows the exact figures (rows, tokens,
    workers) when every child has ended."""

    def __init__(self, plan: StepPlan, pieces: list[_Slice], title: str) -> None:
        self.plan, self.pieces, self.title = plan, pieces, title
        self.before = plan.store.shard_versions(plan.run, plan.target)
        self.key = artifact_key(plan.run, f"{plan.target.stage}-{plan.target.step}-slices")
        self.bar: Any = None

    def done_now(self) -> set[int]:
        now = self.plan.store.shard_versions(self.plan.run, self.plan.target)
        return set(self.plan.done) | {i for i, v in now.items() if self.before.get(i) != v}

    def publish(self) -> None:
        """The artifacts while the children run."""
        done = self.done_now()
        rows = [_running(piece, done, time.time()) for piece in self.pieces]
        self._show(f"{self.title} (running)", rows, len(done & set(self.plan.indices)), "running")

    def finish(self, rows: list[SliceProgress], done: int) -> None:
        """The artifacts once every child has ended, from the committed shards."""
        self._show(self.title, rows, done, "ended")

    def _show(self, title: str, rows: list[SliceProgress], done: int, phase: str) -> None:
        try:
            create_markdown_artifact(
                markdown=render_slices_markdown(title, rows),
                key=self.key,
                description=f"slices of {self.plan.target} in run {self.plan.run}, {phase}",
            )
            percent = 100.0 * done / max(len(self.plan.indices), 1)
            if self.bar is None:
                self.bar = create_progress_artifact(
                    percent,
                    key=f"{self.key}-progress",
                    description=f"shards of {self.plan.target} committed, %",
                )
            else:
                update_progress_artifact(self.bar, percent)
        except Exception as err:  # noqa: BLE001 - progress display must never fail the step
            get_run_logger().warning("%s: slice progress not shown: %s", self.plan.target, err)


def _running(piece: _Slice, done: set[int], now: float) -> SliceProgress:
    """A slice while its child may still run: shards done from the listing, time so far."""
    run = piece.flow_run
    seconds = None
    if run is not None and run.start_time is not None:
        end = run.end_time.timestamp() if run.end_time is not None else now
        seconds = end - run.start_time.timestamp()
    return SliceProgress(
        slice=piece.index,
        shards=len(piece.shards),
        done=len([i for i in piece.shards if i in done]),
        rows=None,
        flow_run=run.name if run is not None else None,
        state=_state(run) if run is not None else None,
        seconds=seconds,
    )


def _progress(piece: _Slice, committed: Mapping[int, CommittedShard]) -> SliceProgress:
    """What storage holds of one slice now, and its child."""
    done = [committed[i] for i in piece.shards if i in committed]
    run = piece.flow_run
    seconds = None
    if run is not None and run.start_time is not None and run.end_time is not None:
        seconds = (run.end_time - run.start_time).total_seconds()
    workers = {shard.stats.get("worker") for shard in done}
    chars = [shard.stats.get("counts", {}).get("generated_chars") for shard in done]
    return SliceProgress(
        slice=piece.index,
        shards=len(piece.shards),
        done=len(done),
        rows=sum(shard.info.rows for shard in done),
        generated_chars=sum(c for c in chars if isinstance(c, int)) if any(chars) else None,
        completion_tokens=token_totals(shard.stats for shard in done).get("completion_tokens"),
        workers=sorted(w for w in workers if isinstance(w, str)),
        flow_run=run.name if run is not None else None,
        state=_state(run) if run is not None else None,
        seconds=seconds,
    )


def run_slices(
    plan: StepPlan,
    execution: ExecutionConfig,
    models: Sequence[ModelSpec | None] = (),
    extra_counts: Mapping[str, int] | None = None,
) -> StepResult:
    """Compute the pending shards of `plan` in `execution.workers` child flow runs, wait for
    them, publish their progress, and seal the step once every shard is committed. `models`
    are the step's engines: each child asks its pool for the GPUs the largest one takes."""
    logger = get_run_logger()
    call = _current_task_call()
    title = f"{plan.target} on {execution.slice_deployment}"
    with get_client(sync_client=True) as client:
        pool, variables = _slice_pool(client, execution)
        earlier = _other_slicings(client, plan, execution.workers)
        if earlier:
            _wait_for_earlier(client, plan, earlier)
            plan = replan(plan, read_committed(plan))
        pieces = [
            _Slice(k, shards, [i for i in shards if i not in plan.done])
            for k, shards in enumerate(slice_shards(plan.indices, execution.workers))
        ]
        launched = [piece for piece in pieces if piece.todo]
        logger.info(
            "%s: %d of %d shards to compute in %d slice(s) on %s",
            plan.target,
            len(plan.pending),
            len(plan.indices),
            len(launched),
            execution.slice_deployment,
        )
        progress = _LiveProgress(plan, pieces, title)
        job_variables = slice_job_variables(
            execution.slice_job_variables, variables, gpus_for(models)
        )
        for piece in launched:
            piece.flow_run = _launch(
                client, plan, call, piece, len(pieces), execution.slice_deployment, job_variables
            )
        progress.publish()
        _wait(client, plan, launched, pool, progress.publish)

    committed = read_committed(plan)
    after = replan(plan, committed)
    progress.finish([_progress(piece, committed) for piece in pieces], len(after.done))
    if after.pending:
        short = [
            f"slice {p.index} ({p.flow_run.name if p.flow_run else '-'}, {_state(p.flow_run)}): "
            f"{len([i for i in p.todo if i not in after.done])} of {len(p.todo)} shards missing"
            for p in launched
            if any(i not in after.done for i in p.todo)
        ]
        raise SlicesFailedError(
            f"{plan.uri}: {len(after.pending)} of {len(plan.indices)} shards are still missing "
            f"after its slices ended: {'; '.join(short)}. Committed shards stay; a retry (of "
            "this flow run, or a re-run with the same run_name) computes only the missing ones"
        )
    for piece in launched:
        if _state(piece.flow_run) != StateType.COMPLETED.value:
            logger.warning(
                "%s slice %d ended %s but committed all its shards",
                plan.target,
                piece.index,
                _state(piece.flow_run),
            )
    return seal_step(plan, extra_counts, computed=len(after.done - plan.done))
