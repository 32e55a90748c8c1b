"""Scale-out (issue 10, DESIGN section 8): one step's shards over N Prefect workers.

Fast: slices are dealt deterministically, cover every shard once and are never empty; every
step task that loads a model is in the step-slice registry; a task's parameters survive the trip
to JSON and back; two slices computed by two "workers" through the Prefect-free protocol seal
into the step a single process would write; settings, GPU keys, `avr workers`, `avr runs` k/n.

Slow (a real Prefect server on 127.0.0.1, PostgreSQL when reachable, a process work pool, two
process workers with `--limit 1`): `avr run generate-trees` with `execution.workers=2` on the tiny
model, and the same with one child killed by SIGKILL mid-slice.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import os
import pkgutil
import shlex
import signal
import socket
import subprocess
import threading
import time
import typing
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import Task
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterTags,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun

import tasks
from avr_core.config import (
    ExecutionConfig,
    OpenAIModel,
    RefineConfig,
    RulesModel,
    SearchConfig,
    TransformersModel,
    TreeConfig,
    VLLMModel,
)
from avr_core.devices import engine_gpus, gpus_for, models_in, sharing_gpu_memory
from avr_core.engines.vllm_backend import build_engine_kwargs, build_serve_command
from avr_core.fingerprint import model_identity
from avr_core.ingest import read_prompts
from avr_core.layout import RunLayout, StepRef
from avr_core.reporting import ShardStats, SliceProgress, render_slices_markdown
from avr_core.schemas import Message, PromptRecord, RefinementTree, SFTExample
from avr_core.settings import AvrSettings
from avr_core.steps import (
    ShardOutput,
    Source,
    Stage1Steps,
    StepIO,
    plan_step,
    read_committed,
    replan,
    run_shards,
    run_step,
    seal_step,
    slice_result,
    slice_shards,
    split_into_shards,
)
from avr_core.storage import DatasetStore
from flows import cli
from flows.config_files import PROJECT_DIR
from flows.deployments import GPU_POOL, PREFECT_YAML
from flows.local_prefect import LocalPrefect, ensure_pool, start_local_prefect, worker_commands
from flows.slices import SLICE_TASKS, step_slice
from tasks import step_runner
from tasks.engines import LazyEngine, gpu_limit_name
from tasks.runlog import artifact_key
from tasks.slices import (
    _other_slicings,
    fans_out,
    slice_arguments,
    slice_job_variables,
    slice_key,
    task_parameters_from_json,
    task_parameters_to_json,
)
from tests.commands import ONE_THREAD, SLICE_DEPLOYMENT, generate_trees_command
from tests.crashes import flow_run_processes

RUN = "scale-test"
PROMPTS = StepRef("inputs", "prompts")
TARGET = StepRef("test", "answers")


# ---- slices ------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, 16])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_slices_cover_every_shard_once_and_none_is_empty(count: int, workers: int) -> None:
    indices = list(range(100, 100 + count))
    slices = slice_shards(indices, workers)
    assert slices == slice_shards(tuple(indices), workers), "deterministic"
    assert sorted(i for piece in slices for i in piece) == indices
    assert all(slices), "no empty slice"
    assert len(slices) == min(workers, count)
    sizes = [len(piece) for piece in slices]
    assert not sizes or max(sizes) - min(sizes) <= 1, "balanced"


def test_slices_are_dealt_round_robin() -> None:
    # A step resumed after a one-process attempt has its first shards done: dealing spreads the
    # rest over every slice, where contiguous runs would give all of them to the last slice.
    assert slice_shards([0, 1, 2, 3, 4, 5, 6], 3) == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="workers must be >= 1"):
        slice_shards([0, 1], 0)
    with pytest.raises(ValueError, match="distinct"):
        slice_shards([0, 0], 2)


# ---- the registry and the parameters a child receives ----------------------------------------


def _step_tasks() -> dict[str, Task[..., Any]]:
    """Every Prefect task defined in tasks/*.py."""
    found: dict[str, Task[..., Any]] = {}
    for info in pkgutil.iter_modules(tasks.__path__, "tasks."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, Task) and value.fn.__module__ == module.__name__:
                found[value.name] = value
    return found


def _takes_execution(task: Task[..., Any]) -> bool:
    hints = typing.get_type_hints(task.fn)
    return any(hints[name] is ExecutionConfig for name in inspect.signature(task.fn).parameters)


def test_the_registry_covers_every_step_task_that_loads_a_model() -> None:
    # A task takes an ExecutionConfig when it loads an engine or trains; training is one job per
    # step (its own process, checkpoints), not shards, so it never runs in slices.
    not_sharded = {"train-model"}
    with_execution = {name for name, t in _step_tasks().items() if _takes_execution(t)}
    assert with_execution - not_sharded == set(SLICE_TASKS)
    for name, task in SLICE_TASKS.items():
        assert task.name == name and _step_tasks()[name] is task
        assert "execute_plan" in inspect.getsource(task.fn) or "score_step" in inspect.getsource(
            task.fn
        ), f"{name} does not end in execute_plan"


def _io() -> StepIO:
    return StepIO(
        storage_root="s3://bucket/prefix",
        run="exp-1",
        target=StepRef("stage1", "seed_trees"),
        sources=(PROMPTS,),
    )


EXECUTION = ExecutionConfig(batch_size=4, device="cpu", workers=3)
CALLS: dict[str, dict[str, Any]] = {
    "generate-trees": {
        "policy": VLLMModel(path="meta-llama/Meta-Llama-3-8B-Instruct", dtype="bfloat16"),
        "tree": TreeConfig(x=3, require_rating=True),
        "templates_dir": None,
        "execution": EXECUTION,
    },
    "greedy-search": {
        "models": (
            TransformersModel(path="smollm2-135m-instruct"),
            VLLMModel(path="rm", tensor_parallel_size=2),
        ),
        "search": SearchConfig(max_rounds=3),
        "templates_dir": "/templates",
        "execution": EXECUTION,
    },
    "refine": {
        "models": (OpenAIModel(path="m", base_url="http://h:8000/v1"), None),
        "refine": RefineConfig(rounds=3, keep_best=False),
        "templates_dir": None,
        "execution": EXECUTION,
    },
    "score-trees": {"reward": RulesModel(length_penalty=0.5), "execution": EXECUTION},
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_task_parameters_round_trip_through_json(name: str) -> None:
    task = SLICE_TASKS[name]
    parameters = {"io": _io(), **CALLS[name]}
    wire = json.loads(json.dumps(task_parameters_to_json(task.fn, parameters)))
    back = task_parameters_from_json(task.fn, wire)
    assert back == parameters
    assert type(back["io"].target) is StepRef  # a NamedTuple again, not a list


def test_every_registered_task_has_typed_json_parameters() -> None:
    for name, task in SLICE_TASKS.items():
        hints = typing.get_type_hints(task.fn)
        names = list(inspect.signature(task.fn).parameters)
        assert [n for n in names if hints[n] is ExecutionConfig] == ["execution"], name
        with pytest.raises(TypeError, match="no parameter"):
            task_parameters_to_json(task.fn, {"nope": 1})


def test_a_slice_runs_its_shards_in_process_and_nothing_else_changes() -> None:
    arguments = {"io": "x", "tree": TreeConfig(), "execution": EXECUTION}
    sliced = slice_arguments(arguments, [4, 1])
    assert sliced["execution"].shards == [4, 1] and sliced["execution"].workers == 1
    assert sliced["execution"].batch_size == 4 and sliced["tree"] is arguments["tree"]
    assert EXECUTION.shards is None, "the parent's config is not modified"
    with pytest.raises(ValueError, match="one ExecutionConfig"):
        slice_arguments({"io": "x"}, [0])


def test_the_child_flow_names_an_unknown_task() -> None:
    with pytest.raises(ValueError, match="no step task 'nope'"):
        step_slice.fn("nope", {}, [0])


def test_execution_knobs_of_scale_out_are_validated_and_never_fingerprinted() -> None:
    assert ExecutionConfig().workers == 1 and ExecutionConfig().shards is None
    assert ExecutionConfig().slice_deployment == "step-slice/gpu"
    for bad in ({"workers": 0}, {"slice_deployment": "step-slice"}, {"shards": [-1]}):
        with pytest.raises(ValueError):
            ExecutionConfig(**bad)
    # How a model is spread over GPUs does not change what it produces.
    one, two = VLLMModel(path="rm"), VLLMModel(path="rm", tensor_parallel_size=2)
    assert model_identity(one, None) == model_identity(two, None)
    assert model_identity(one, None) == model_identity(
        VLLMModel(path="rm", pipeline_parallel_size=2), None
    )
    assert ExecutionConfig(slice_job_variables={"gpu_count": 2}).slice_job_variables == {
        "gpu_count": 2
    }


def test_vllm_engines_get_tensor_and_pipeline_parallel_sizes() -> None:
    spec = VLLMModel(path="rm", tensor_parallel_size=2, pipeline_parallel_size=3)
    kwargs = build_engine_kwargs(Path("m"), spec, ExecutionConfig(), "pooling", on_cpu=False)
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["pipeline_parallel_size"] == 3
    command = " ".join(
        build_serve_command(["serve"], Path("m"), spec, ExecutionConfig(), "pooling", False, "rm")
    )
    assert "--tensor-parallel-size 2" in command and "--pipeline-parallel-size 3" in command


# ---- the protocol a parent and its children run, without Prefect -----------------------------


def _prompt(i: int) -> PromptRecord:
    return PromptRecord(prompt_id=f"p{i}", messages=[Message(role="user", content=f"q{i}")])


def _answers(index: int, inputs: tuple[list[Any], ...]) -> ShardOutput:
    (prompts,) = inputs
    rows = [
        SFTExample(
            prompt_id=p.prompt_id,
            messages=[*p.messages, Message(role="assistant", content=f"a{index}")],
            kind="refinement",
        )
        for p in prompts
    ]
    return ShardOutput(rows, ShardStats(counts={"answers": len(rows)}))


def _plans(store: DatasetStore, count: int = 7) -> Any:
    shards = split_into_shards([_prompt(i) for i in range(count)], 1)
    prompts = plan_step(store, RUN, PROMPTS, PromptRecord, {"p": 1}, shard_count=len(shards))
    run_step(prompts, lambda index, _: ShardOutput(shards[index]))
    return lambda: plan_step(
        store, RUN, TARGET, SFTExample, {"step": "answers"}, [Source(PROMPTS, PromptRecord)]
    )


def test_two_slices_on_two_workers_seal_into_what_one_process_writes(tmp_path: Path) -> None:
    store = DatasetStore(f"file://{tmp_path}/store")
    plan_target = _plans(store)
    parent = plan_target()
    slices = slice_shards(parent.pending, 2)
    for worker, shards in zip(("gpu-0", "gpu-1"), slices, strict=True):
        child = plan_target()  # each child plans again, as the task does
        ran = run_shards(child, _answers, shards, worker=worker)
        result = slice_result(child, shards, ran)
        assert not result.sealed and result.shards_computed == len(shards)
        assert result.rows == len(shards) and result.counts == {"answers": len(shards)}
        assert store.read_manifest(RUN, *TARGET) is None, "a slice never seals"
    committed = read_committed(parent)
    assert {i: c.stats["worker"] for i, c in committed.items()} == {
        i: "gpu-0" if i % 2 == 0 else "gpu-1" for i in range(7)
    }
    after = replan(parent, committed)
    assert after.pending == [] and parent.pending == list(range(7))
    sealed = seal_step(parent, computed=len(after.done - parent.done))
    assert sealed.sealed and sealed.rows == 7 and sealed.shards_computed == 7
    assert sealed.counts == {"answers": 7}

    # The same step in one process, in another run: the same rows.
    other = DatasetStore(f"file://{tmp_path}/one")
    run_step(_plans(other)(), _answers)
    assert store.read_records(RUN, *TARGET, SFTExample) == other.read_records(
        RUN, *TARGET, SFTExample
    )


def test_a_retried_slice_computes_only_what_it_left(tmp_path: Path) -> None:
    store = DatasetStore(f"file://{tmp_path}/store")
    plan_target = _plans(store, count=4)
    calls: list[int] = []

    def dies_after_one(index: int, inputs: tuple[list[Any], ...]) -> ShardOutput:
        if calls:
            raise RuntimeError("killed")
        calls.append(index)
        return _answers(index, inputs)

    first = run_shards(plan_target(), dies_after_one, [1, 3], worker="gpu-1")
    assert first.computed == [1] and list(first.failed) == [3]
    calls.clear()
    again = run_shards(plan_target(), lambda i, x: (calls.append(i), _answers(i, x))[1], [1, 3])
    assert calls == [3] and again.computed == [3]


def test_the_parent_fans_out_only_a_step_with_a_model_and_pending_shards(tmp_path: Path) -> None:
    store = DatasetStore(f"file://{tmp_path}/store")
    plan = _plans(store, count=2)()
    policy = TransformersModel()
    two = ExecutionConfig(workers=2)
    assert fans_out(plan, two, [policy])
    assert fans_out(plan, two, [RulesModel(), VLLMModel(path="rm")])
    assert not fans_out(plan, ExecutionConfig(), [policy]), "workers=1: in process"
    assert not fans_out(plan, two, [RulesModel(), None]), "rules only: in process"
    assert not fans_out(plan, two, [OpenAIModel(path="m", base_url="http://h/v1")])
    assert not fans_out(plan, two.model_copy(update={"shards": [0]}), [policy]), "a child"
    assert not fans_out(plan, None, [policy])
    run_step(plan, _answers)
    assert not fans_out(_plans(store, count=2)(), two, [policy]), "nothing pending"


def test_slice_keys_are_stable_and_distinct(tmp_path: Path) -> None:
    plan = _plans(DatasetStore(f"file://{tmp_path}/store"), count=2)()
    keys = {slice_key(plan, k, 2, g) for k in range(2) for g in range(3)}
    assert len(keys) == 6 and slice_key(plan, 0, 2, 0) == slice_key(plan, 0, 2, 0)
    assert plan.fingerprint in slice_key(plan, 1, 2, 0) and "slice-1-of-2" in slice_key(
        plan, 1, 2, 0
    )


def test_slice_keys_keep_two_storage_roots_apart(tmp_path: Path) -> None:
    """Two teams on one Prefect server, same run name and config, different buckets: a retried
    parent of one must never wait on (or reuse) the other's children."""
    one = _plans(DatasetStore(f"file://{tmp_path}/one"), count=2)()
    two = _plans(DatasetStore(f"file://{tmp_path}/two"), count=2)()
    assert one.fingerprint == two.fingerprint
    assert slice_key(one, 0, 2, 0) != slice_key(two, 0, 2, 0)
    assert str(tmp_path) not in slice_key(one, 0, 2, 0), "no bucket or path in the UI"


def test_slices_ask_their_pool_for_the_gpus_of_the_largest_engine() -> None:
    kubernetes = ["gpu_count", "image", "namespace"]
    policy, reward = VLLMModel(path="p"), VLLMModel(path="rm", tensor_parallel_size=2)
    assert slice_job_variables({}, kubernetes, gpus_for([policy, reward])) == {"gpu_count": 2}
    assert slice_job_variables({}, kubernetes, gpus_for([policy, RulesModel()])) == {"gpu_count": 1}
    # What the operator set wins; a pool whose template has no such variable gets none.
    assert slice_job_variables({"gpu_count": 4}, kubernetes, 2) == {"gpu_count": 4}
    assert slice_job_variables({}, ["command", "env"], 2) == {}
    assert slice_job_variables({"env": {"A": "1"}}, ["command", "env"], 2) == {"env": {"A": "1"}}
    assert slice_job_variables({}, kubernetes, gpus_for([RulesModel(), None])) == {}


def test_engine_gpus_and_engines_that_share_a_process() -> None:
    tp2 = VLLMModel(path="rm", tensor_parallel_size=2, pipeline_parallel_size=2)
    served = OpenAIModel(path="m", base_url="http://h/v1")
    assert [engine_gpus(m) for m in (tp2, VLLMModel(), TransformersModel(), served, None)] == [
        4,
        1,
        1,
        0,
        0,
    ]
    assert gpus_for([]) == 0 and gpus_for([VLLMModel(), tp2]) == 4, "they share, not add up"
    # Two in-process vLLM engines (a greedy search's policy and reward model) split the memory
    # each would take alone; with one vLLM engine nothing changes.
    execution = ExecutionConfig(gpu_memory_utilization=0.9)
    shared = sharing_gpu_memory(execution, [VLLMModel(path="p"), tp2])
    assert shared.gpu_memory_utilization == pytest.approx(0.45)
    assert shared.model_copy(update={"gpu_memory_utilization": 0.9}) == execution
    assert sharing_gpu_memory(execution, [VLLMModel(path="p"), RulesModel()]) is execution
    assert sharing_gpu_memory(execution, [TransformersModel(), served]) is execution


def test_models_in_finds_every_local_model_of_a_flows_parameters() -> None:
    from flows.params import Stage2Params

    params = Stage2Params(
        policy=VLLMModel(path="p"), reward=VLLMModel(path="rm", tensor_parallel_size=2)
    )
    assert [m.path for m in models_in(params)] == ["p", "rm"]
    assert gpus_for(models_in(params)) == 2


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_rewritten_shard_gets_a_new_version_in_one_listing(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """How a parent sees its children's progress without reading a shard."""
    if where == "s3":
        location = request.getfixturevalue("s3_location")
        store = DatasetStore(location.root, location.storage_options)
    else:
        store = DatasetStore(f"file://{tmp_path}/store")
    store.files.write_bytes("d/part-00000.parquet", b"old")
    store.files.write_bytes("d/part-00001.parquet", b"same")
    before = store.files.list_versions("d")
    assert set(before) == {"part-00000.parquet", "part-00001.parquet"}
    time.sleep(0.05 if where == "local" else 1.1)  # S3 LastModified has whole seconds
    store.files.write_bytes("d/part-00000.parquet", b"newer")
    store.files.write_bytes("d/part-00002.parquet", b"new")
    after = store.files.list_versions("d")
    changed = {name for name, version in after.items() if before.get(name) != version}
    assert changed == {"part-00000.parquet", "part-00002.parquet"}
    assert store.files.list_versions("nowhere") == {}


def test_children_of_another_slicing_of_the_step_are_found(
    prefect_harness: Path, tmp_path: Path
) -> None:
    """A parent re-run with another `workers` while the first slicing's children still run must
    wait for them: else two children compute one shard at once."""
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    plan = _plans(DatasetStore(f"file://{tmp_path}/store"), count=4)()
    other = _plans(DatasetStore(f"file://{tmp_path}/elsewhere"), count=4)()

    async def children() -> dict[str, Any]:
        async with get_client() as client:
            flow_id = await client.create_flow_from_name("step-slice")
            deployment = await client.create_deployment(flow_id=flow_id, name="finder-test")
            runs = {}
            for name, key, state in [
                ("old-running", slice_key(plan, 0, 3, 0), Running()),
                ("old-done", slice_key(plan, 1, 3, 0), Completed()),
                ("same-count", slice_key(plan, 0, 2, 0), Running()),
                ("other-root", slice_key(other, 0, 3, 0), Running()),
            ]:
                run = await client.create_flow_run_from_deployment(
                    deployment, idempotency_key=key, tags=["avr", "step-slice", RUN]
                )
                await client.set_flow_run_state(run.id, state, force=True)
                runs[name] = run.id
            return runs

    runs = asyncio.run(children())
    with get_client(sync_client=True) as client:
        found = _other_slicings(client, plan, 2)
    assert [run.id for run in found] == [runs["old-running"]]


def test_slice_artifact_shows_each_slice() -> None:
    text = render_slices_markdown(
        "stage1/seed_trees on step-slice/gpu",
        [
            SliceProgress(
                slice=0,
                shards=3,
                done=3,
                rows=24,
                generated_chars=5120,
                completion_tokens=1300,
                workers=["gpu-0"],
                flow_run="a",
                state="COMPLETED",
                seconds=61.25,
            ),
            SliceProgress(
                slice=1, shards=3, done=1, rows=8, workers=["gpu-1"], flow_run="b", state="CRASHED"
            ),
        ],
    )
    assert "2 slices, 4/6 shards" in text
    assert "| 0 | 3/3 | 24 | 5120 | 1300 | 61.2 | a | COMPLETED | gpu-0 |" in text
    assert "| 1 | 1/3 | 8 | - | - | - | b | CRASHED | gpu-1 |" in text


# ---- GPU binding, `avr workers`, `avr runs` ---------------------------------------------------


def test_gpu_limit_is_keyed_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AVR_WORKER_ID", raising=False)
    assert AvrSettings().worker_id == socket.gethostname()
    monkeypatch.setenv("AVR_WORKER_ID", "gpu-3")
    assert gpu_limit_name(AvrSettings().worker_id) == "gpu:gpu-3"


def test_workers_command_prints_one_worker_per_gpu(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["workers", "--gpus", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "prefect gcl create gpu:gpu-1 --limit 1" in out
    assert (
        "CUDA_VISIBLE_DEVICES=1 AVR_WORKER_ID=gpu-1 prefect worker start --pool gpu "
        "--type process --name gpu-1 --limit 1"
    ) in out
    pairs = worker_commands(4, "big", gpus_per_worker=2)
    assert any(line.startswith("CUDA_VISIBLE_DEVICES=2,3 AVR_WORKER_ID=big-1 ") for line in pairs)
    assert pairs[-1].endswith("execution.workers=2 and execution.slice_deployment=step-slice/big.")
    assert cli.main(["workers", "--gpus", "3", "--gpus-per-worker", "2"]) == 2


def test_runs_shows_a_partial_step_as_k_of_n_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    store = DatasetStore(f"file://{tmp_path}/store")
    plan = _plans(store, count=5)()
    # What execute_plan writes before it computes anything.
    store.write_json(RunLayout(RUN).step_plan(TARGET), {"fingerprint": "x", "shards": 5})
    run_shards(plan, _answers, [0, 3])
    (step,) = [s for s in store.list_steps(RUN) if s.step == TARGET.step]
    assert (step.status, step.shards, step.shards_total) == ("partial", 2, 5)
    assert cli.main(["runs", "--root", store.root]) == 0
    assert "2/5" in capsys.readouterr().out
    Path(store.files.path(store.uri(RunLayout(RUN).step_plan(TARGET)))).write_text("{bad")
    (step,) = [s for s in store.list_steps(RUN) if s.step == TARGET.step]
    assert step.shards_total is None, "a damaged plan file only hides the total"


# ---- slow: a real Prefect server, a process work pool, two workers ---------------------------

DEMO_PROMPTS = PROJECT_DIR / "avr_core" / "data" / "demo_prompts.jsonl"
SLICES = SLICE_DEPLOYMENT
TREES = Stage1Steps.SEED_TREES


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, postgres_database_url: str | None
) -> Iterator[LocalPrefect]:
    """A Prefect server on 127.0.0.1 (state in PostgreSQL when one answers), the `gpu` pool as
    a process pool, step-slice/gpu deployed from prefect.yaml, and two workers started with
    exactly the commands `avr workers --gpus 2` prints (their GPU limits created too)."""
    home = tmp_path_factory.mktemp("prefect-home")
    extra = {"PREFECT_WORKER_QUERY_SECONDS": "1"}  # workers look for runs every second
    if postgres_database_url:
        extra["PREFECT_API_DATABASE_CONNECTION_URL"] = postgres_database_url
    with start_local_prefect(home, extra_env=extra) as local:
        ensure_pool(local, GPU_POOL)
        local.prefect("deploy", "--prefect-file", str(PREFECT_YAML), "--name", SLICES)
        for line in worker_commands(2, GPU_POOL):
            words = shlex.split(line, comments=True)
            if words[:3] == ["prefect", "gcl", "create"]:
                local.prefect(*words[1:])
            elif "worker" in words:  # comments are gone: a worker start line
                start = words.index("prefect")
                env = dict(word.split("=", 1) for word in words[:start])
                name = env["AVR_WORKER_ID"]
                assert words[start:] == (
                    ["prefect", "worker", "start", "--pool", GPU_POOL, "--type", "process"]
                    + ["--name", name, "--limit", "1"]
                )
                local.start_worker(GPU_POOL, name=name, limit=1, env={**env, **ONE_THREAD})
        yield local


def _call(local: LocalPrefect, fn: Callable[[PrefectClient], Awaitable[Any]]) -> Any:
    """`fn(client)` against the test's server (not the session's Prefect test harness)."""

    async def call() -> Any:
        async with PrefectClient(local.api_url) as client:
            return await fn(client)

    return asyncio.run(call())


def _children(local: LocalPrefect, run: str) -> list[FlowRun]:
    """The step-slice flow runs of `run` (tagged with it by their parent), by name."""
    runs = _call(
        local,
        lambda client: client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["step-slice", run]))
        ),
    )
    return sorted(runs, key=lambda r: r.name)


def _artifact_versions(local: LocalPrefect, key: str) -> list[Any]:
    """Every version of the artifact `key`, oldest first."""
    found = _call(
        local,
        lambda client: client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        ),
    )
    return sorted(found, key=lambda artifact: artifact.created)


def _parent_of(local: LocalPrefect, child: FlowRun) -> FlowRun:
    """The flow run a child is linked under (run_deployment links it to the step's task)."""
    assert child.parent_task_run_id is not None, "a slice is a subflow of its step's task"

    async def read(client: PrefectClient) -> FlowRun:
        task_run = await client.read_task_run(child.parent_task_run_id)
        return await client.read_flow_run(task_run.flow_run_id)

    return _call(local, read)


def _ingest(root: Path, run: str, count: int) -> list[str]:
    """`count` demo prompts as the run's inputs/prompts step, one prompt per shard."""
    prompts = read_prompts(str(DEMO_PROMPTS)).prompts[:count]
    shards = split_into_shards(prompts, 1)
    store = DatasetStore(f"file://{root}")
    plan = plan_step(store, run, PROMPTS, PromptRecord, {"n": count}, shard_count=len(shards))
    run_step(plan, lambda index, _: ShardOutput(shards[index]))
    return [p.prompt_id for p in prompts]


def _generate(local: LocalPrefect, root: Path, run: str, workers: int, max_tokens: int) -> Any:
    """`avr run generate-trees` against the server, as a user types it; its output in a log."""
    command = generate_trees_command(root, run, workers, max_tokens)
    log = (root.parent / f"{run}.log").open("wb")
    return subprocess.Popen(
        command,
        cwd=PROJECT_DIR,
        env={**local.env, **ONE_THREAD},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _finish(process: Any, root: Path, run: str, timeout: float = 420) -> None:
    """Wait for an `avr run`; fail with the end of its output unless it exited with 0."""
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
    log = (root.parent / f"{run}.log").read_text(errors="replace")
    assert code == 0, f"avr run {run} exited with {code}:\n{log[-6000:]}"


class Writes:
    """Every distinct mtime of each shard file and of the manifest of a step directory, sampled
    every 20 ms while a step runs: a shard written twice shows two."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: dict[str, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _sample(self) -> None:
        for path in [*self.directory.glob("part-*.parquet"), self.directory / "_manifest.json"]:
            try:
                self.seen.setdefault(path.name, set()).add(path.stat().st_mtime_ns)
            except FileNotFoundError:
                continue

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.02)

    def __enter__(self) -> Writes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _trees(store: DatasetStore, run: str) -> list[dict[str, Any]]:
    """A run's trees without the run name in their lineage: what two runs can share."""
    records = store.read_records(run, *TREES, RefinementTree)
    return [r.model_dump(mode="json", exclude={"lineage": {"run"}}) for r in records]


@pytest.mark.slow
def test_two_workers_compute_each_shard_once_and_write_what_one_process_writes(
    cluster: LocalPrefect, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    ids = _ingest(root, "scale", 4)
    trees = root / "runs" / "scale" / TREES.stage / TREES.step
    with Writes(trees) as writes:
        _finish(_generate(cluster, root, "scale", workers=2, max_tokens=8), root, "scale")

    # Two children, one per slice, each a subflow of the step that launched them.
    children = _children(cluster, "scale")
    assert [c.name for c in children] == ["scale-seed_trees-slice-0", "scale-seed_trees-slice-1"]
    assert [c.state.type.value for c in children] == ["COMPLETED", "COMPLETED"]
    assert [c.parameters["shards"] for c in children] == [[0, 2], [1, 3]]
    parents = {_parent_of(cluster, c).id: _parent_of(cluster, c) for c in children}
    assert [p.state.type.value for p in parents.values()] == ["COMPLETED"], "one parent"

    # Each shard computed once, by the worker of its slice; the two slices on the two workers.
    store = DatasetStore(f"file://{root}")
    manifest = store.read_manifest("scale", *TREES)
    assert manifest is not None and manifest.total_rows == 4
    committed = store.committed_shards("scale", *TREES, manifest.fingerprint)
    workers = {index: shard.stats["worker"] for index, shard in committed.items()}
    print("shard -> worker:", workers)
    assert workers[0] == workers[2] and workers[1] == workers[3]
    assert {workers[0], workers[1]} == {"gpu-0", "gpu-1"}
    assert {name: len(times) for name, times in writes.seen.items()} == {
        **{f"part-{i:05d}.parquet": 1 for i in range(4)},
        "_manifest.json": 1,
    }, "a shard or the manifest was written twice"
    # The manifest was written once, after both slices had ended.
    (sealed,) = writes.seen["_manifest.json"]
    assert sealed / 1e9 >= max(c.end_time.timestamp() for c in children)
    assert sorted(t.prompt_id for t in store.read_records("scale", *TREES, RefinementTree)) == (
        sorted(ids)
    )

    # The parent's slice artifact: kept up to date while the children ran, then one row per
    # slice with its rows and worker; the progress bar ends at 100%.
    key = artifact_key("scale", f"{TREES.stage}-{TREES.step}-slices")
    versions = _artifact_versions(cluster, key)
    artifact = versions[-1]
    assert any("(running)" in v.data for v in versions[:-1]), [v.data for v in versions]
    assert "(running)" not in artifact.data
    for child in children:
        assert "| 2/2 | 2 | " in artifact.data and child.name in artifact.data
    assert "gpu-0" in artifact.data and "gpu-1" in artifact.data
    progress = _artifact_versions(cluster, f"{key}-progress")
    assert progress and float(progress[-1].data) == 100.0

    # The same step with one worker (in the `avr run` process), same prompts, same seed.
    _ingest(root, "scale-one", 4)
    _finish(_generate(cluster, root, "scale-one", workers=1, max_tokens=8), root, "scale-one")
    assert _children(cluster, "scale-one") == []
    assert _trees(store, "scale") == _trees(store, "scale-one")


@pytest.mark.slow
def test_a_child_killed_mid_slice_costs_only_its_missing_shards(
    cluster: LocalPrefect, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    ids = _ingest(root, "fault", 6)
    trees = root / "runs" / "fault" / TREES.stage / TREES.step
    with Writes(trees) as writes:
        # Long enough generations that slice 1 (shards 1, 3, 5) is still running after shard 1.
        parent = _generate(cluster, root, "fault", workers=2, max_tokens=48)
        deadline = time.monotonic() + 300
        while not (trees / "part-00001.parquet").exists():
            assert parent.poll() is None, "the step ended before slice 1 committed a shard"
            assert time.monotonic() < deadline, "slice 1 committed nothing"
            time.sleep(0.02)
        (victim,) = [c for c in _children(cluster, "fault") if c.name.endswith("slice-1")]
        pids = flow_run_processes(str(victim.id))
        assert pids, "the child's process was not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # a crash: no cleanup, no final state from the child
        # What the killed child had committed (it writes nothing more).
        kept = {i for i in (1, 3, 5) if (trees / f"part-{i:05d}.parquet").exists()}
        _finish(parent, root, "fault")

    children = {c.name: c for c in _children(cluster, "fault")}
    states = {name: c.state.type.value for name, c in children.items()}
    assert states == {
        "fault-seed_trees-slice-0": "COMPLETED",
        "fault-seed_trees-slice-1": "CRASHED",
        "fault-seed_trees-slice-1-retry-1": "COMPLETED",
    }
    store = DatasetStore(f"file://{root}")
    manifest = store.read_manifest("fault", *TREES)
    assert manifest is not None
    committed = store.committed_shards("fault", *TREES, manifest.fingerprint)
    # The replacement got only what the killed child had not committed.
    retry = children["fault-seed_trees-slice-1-retry-1"]
    assert 1 in kept and retry.parameters["shards"] == sorted({1, 3, 5} - kept)
    print("shard -> worker:", {i: c.stats["worker"] for i, c in committed.items()})

    # No shard computed twice, none lost, no row twice.
    assert {name: len(times) for name, times in writes.seen.items()} == {
        **{f"part-{i:05d}.parquet": 1 for i in range(6)},
        "_manifest.json": 1,
    }
    rows = store.read_records("fault", *TREES, RefinementTree)
    assert manifest.total_rows == 6 and sorted(r.prompt_id for r in rows) == sorted(ids)

    # The parent's first attempt failed naming the slice; its task retry relaunched only it.
    parent = _parent_of(cluster, children["fault-seed_trees-slice-0"])
    logs = _call(
        cluster,
        lambda client: client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[parent.id])), limit=200
        ),
    )
    failure = [log.message for log in logs if "shards are still missing" in log.message]
    assert failure, [log.message for log in logs]
    assert "slice 1 (fault-seed_trees-slice-1, CRASHED)" in failure[0]
    assert parent.state.type.value == "COMPLETED"


def test_engines_close_before_the_gpu_slot_is_given_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next engine on this worker's GPU must find its memory free: a step closes its engines
    inside the slot, on success and on failure alike."""
    events: list[str] = []

    @contextlib.contextmanager
    def slot(spec: Any, execution: ExecutionConfig) -> Iterator[None]:
        events.append(f"take {spec.path}")
        try:
            yield
        finally:
            events.append("give back")

    class Engine:
        def close(self) -> None:
            events.append("close")

    monkeypatch.setattr(step_runner, "gpu_slot", slot)
    monkeypatch.setattr(step_runner, "uses_local_gpu", lambda spec, execution: True)
    engine = LazyEngine(Engine)
    engine.get()
    policy, cuda = TransformersModel(path="p"), ExecutionConfig(device="cuda")
    with (
        pytest.raises(RuntimeError),
        step_runner._computing_here([engine], [policy, RulesModel()], cuda),
    ):
        raise RuntimeError("a shard failed")
    assert events == ["take p", "close", "give back"]
    events.clear()
    with step_runner._computing_here([engine], [policy], None):  # no execution: no slot
        engine.get()
    assert events == ["close"]
