"""Resuming Stage I: a failed or killed run is re-run and recomputes only the missing shards.

Two real crashes: (1) an engine that fails on one shard, inside the Prefect task (the task's retry
and a later re-run must each touch only that shard); (2) a Stage I flow in a child process killed
with SIGKILL after its first tree shard is committed, then re-run with the same run name.
Both check that committed shard files were not rewritten (mtime and sha256 unchanged), how many
engine calls the re-run made, and that the final datasets hold exactly one row per prompt.
"""

from __future__ import annotations

import json
import time

import pytest

import tasks.trees
from avr_core.config import (
    ExecutionConfig,
    IngestConfig,
    ModelSpec,
    RulesModel,
    SelectionConfig,
    TransformersModel,
    TreeConfig,
)
from avr_core.layout import RunLayout
from avr_core.schemas import (
    PreferencePair,
    PromptRecord,
    RefinementTree,
    Sampling,
    SFTExample,
)
from avr_core.steps import ShardsFailedError, Stage1Steps
from avr_core.storage import DatasetStore
from flows.params import (
    BuildPairsParams,
    GenerateTreesParams,
    IngestParams,
    ScoreTreesParams,
    SelectRSFTParams,
    Stage1Params,
)
from flows.steps import (
    build_pairs_flow,
    generate_trees_flow,
    ingest_prompts_flow,
    score_trees_flow,
    select_rsft_flow,
)
from tests.crashes import file_states, kill_once_committed
from tests.fakes import EngineCall, RecordingGenerator

pytestmark = pytest.mark.slow  # starts a Prefect API server


def _shard_of(store: DatasetStore, run: str, index: int) -> set[str]:
    records = store.read_shard_records(run, *Stage1Steps.PROMPTS, index, PromptRecord)
    return {r.messages[-1].content for r in records}


def test_failed_shard_is_the_only_one_recomputed(prefect_harness, tmp_path, monkeypatch):
    root = f"file://{tmp_path}/store"
    run = "inject"
    ingest_prompts_flow(
        IngestParams(
            run_name=run, storage_root=root, ingest=IngestConfig(max_prompts=8, shard_size=2)
        )
    )
    store = DatasetStore(root)
    prompt_ids = {r.prompt_id for r in store.read_records(run, *Stage1Steps.PROMPTS, PromptRecord)}
    shard_prompts = {i: _shard_of(store, run, i) for i in range(4)}

    calls: list[EngineCall] = []
    loads: list[str] = []
    failing = set(shard_prompts[2])

    def open_fake(spec: ModelSpec, execution: ExecutionConfig) -> RecordingGenerator:
        assert isinstance(spec, TransformersModel)
        loads.append(spec.path)
        # Shares `failing` and `calls` across engine loads; the attempt is the load's number.
        engine = RecordingGenerator(calls=calls, attempt=len(loads))
        engine.failing = failing
        return engine

    monkeypatch.setattr(tasks.trees, "open_generator", open_fake)
    params = GenerateTreesParams(
        run_name=run,
        storage_root=root,
        policy=TransformersModel(path="fake-policy"),
        tree=TreeConfig(x=2, y=2),
    )
    with pytest.raises(ShardsFailedError, match=r"1 of 4 shards failed.*shard 2: EngineError"):
        generate_trees_flow(params)

    def shards_called() -> dict[int, set[int]]:
        """Per attempt (engine load), the shards whose prompts reached the engine."""
        by_attempt: dict[int, set[int]] = {}
        for attempt, prompts in calls:
            touched = {i for i, ps in shard_prompts.items() if prompts & ps}
            by_attempt.setdefault(attempt, set()).update(touched)
        return by_attempt

    # First attempt: every shard tried (shard 2 fails at its first call); the task's automatic
    # retry then touches only shard 2. Shards may run in any order (or on several workers).
    assert shards_called() == {1: {0, 1, 2, 3}, 2: {2}}
    assert len(loads) == 2  # one engine load per attempt, not per shard
    assert sum(1 for attempt, _ in calls if attempt == 1) == 3 * 3 + 1  # 3 levels x 3 shards + 1
    trees_dir = tmp_path / "store/runs" / run / "stage1/seed_trees"
    committed = file_states(trees_dir)
    assert sorted(committed) == ["part-00000.parquet", "part-00001.parquet", "part-00003.parquet"]
    assert not (trees_dir / "_manifest.json").exists()

    # Re-run with a healthy engine: only shard 2 is computed; the others are untouched.
    failing.clear()
    calls.clear()
    loads.clear()
    time.sleep(0.05)  # let a rewrite, if any, show up as a new mtime
    result = generate_trees_flow(params)
    assert shards_called() == {1: {2}} and len(calls) == 3  # answers, critiques, refinements
    assert (result.shards_computed, result.shards_skipped) == (1, 3)
    after = file_states(trees_dir)
    assert {name: after[name] for name in committed} == committed
    trees = store.read_records(run, *Stage1Steps.SEED_TREES, RefinementTree)
    assert sorted(t.prompt_id for t in trees) == sorted(prompt_ids)
    assert result.rows == 8 and result.counts["trees"] == 8
    assert result.counts["critiques"] == 16 and result.counts["refinements"] == 32

    # A third run has nothing to do and does not even load the engine.
    calls.clear()
    loads.clear()
    again = generate_trees_flow(params)
    assert calls == [] and loads == [] and again.shards_computed == 0
    assert file_states(trees_dir) == after

    # The downstream data steps run on the resumed trees with the real rules reward.
    reward = RulesModel(length_penalty=1.0)
    scored = score_trees_flow(ScoreTreesParams(run_name=run, storage_root=root, reward=reward))
    selection = SelectionConfig()
    rsft = select_rsft_flow(SelectRSFTParams(run_name=run, storage_root=root, selection=selection))
    pairs = build_pairs_flow(
        BuildPairsParams(
            run_name=run, storage_root=root, selection=selection, source=Stage1Steps.SEED_SCORED
        )
    )
    scored_trees = store.read_records(run, *Stage1Steps.SEED_SCORED, RefinementTree)
    assert sorted(t.prompt_id for t in scored_trees) == sorted(prompt_ids)
    assert all(t.answer_score is not None for t in scored_trees)
    assert scored.counts["scored_candidates"] == 8 * (1 + 4)
    examples = store.read_records(run, *Stage1Steps.RSFT, SFTExample)
    assert len(examples) == rsft.rows == rsft.counts["rsft_examples"]
    assert len({e.prompt_id for e in examples}) == len(examples)
    stored_pairs = store.read_records(run, *Stage1Steps.PAIRS, PreferencePair)
    assert len(stored_pairs) == pairs.rows == pairs.counts.get("pairs", 0)
    assert rsft.rows > 0 and pairs.rows > 0  # shorter refinements beat the answer
    # One record per step (no shared run.json read-modify-write by parallel tasks).
    layout = RunLayout(run)
    for ref in (Stage1Steps.PROMPTS, Stage1Steps.SEED_TREES, Stage1Steps.PAIRS):
        assert store.read_json(layout.step_record(ref)) is not None, ref
    trees_entry = store.read_json(layout.step_record(Stage1Steps.SEED_TREES))
    assert trees_entry["wall_seconds"] > 0 and trees_entry["rows"] == 8
    assert trees_entry["seconds"]["compute"] > 0  # per-phase time, summed over shards


_CHILD = """
import sys
from flows.params import Stage1Params
from flows.stage1 import stage1
stage1(Stage1Params.model_validate_json(sys.argv[1]))
"""


def _kill_params(root: str) -> Stage1Params:
    return Stage1Params(
        run_name="killed",
        storage_root=root,
        ingest=IngestConfig(max_prompts=4, shard_size=1),
        tree=TreeConfig(x=1, y=1, sampling=Sampling(max_tokens=12, seed=0)),
        execution=ExecutionConfig(batch_size=4, device="cpu"),
    )


def test_killed_stage1_run_resumes_without_recomputing(prefect_harness, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    root = f"file://{tmp_path}/store"
    params = _kill_params(root)
    trees_dir = tmp_path / "store/runs/killed/stage1/seed_trees"
    kill_once_committed(
        _CHILD, params.model_dump_json(), trees_dir / "part-00000.parquet", PREFECT_API_URL.value()
    )
    committed = file_states(trees_dir)
    assert 1 <= len(committed) < 4, committed
    assert not (trees_dir / "_manifest.json").exists()

    # Re-run the same steps for the same run, counting engine calls on the real tiny model.
    calls: list[int] = []
    real_open = tasks.trees.open_generator

    def counting_open(spec, execution):
        generator = real_open(spec, execution)
        chat = generator.chat

        def counted(conversations, sampling):
            calls.append(len(conversations))
            return chat(conversations, sampling)

        generator.chat = counted
        return generator

    monkeypatch.setattr(tasks.trees, "open_generator", counting_open)
    step = dict(run_name=params.run_name, storage_root=root, execution=params.execution)
    time.sleep(0.05)
    result = generate_trees_flow(
        GenerateTreesParams(**step, policy=params.policy, tree=params.tree)
    )
    missing = 4 - len(committed)
    assert len(calls) == 3 * missing  # answers, critiques, refinements per missing shard
    assert (result.shards_computed, result.shards_skipped) == (missing, len(committed))
    after = file_states(trees_dir)
    assert {name: after[name] for name in committed} == committed

    store = DatasetStore(root)
    prompt_ids = [
        r.prompt_id for r in store.read_records("killed", *Stage1Steps.PROMPTS, PromptRecord)
    ]
    score_trees_flow(ScoreTreesParams(**step, reward=params.reward))
    scored = store.read_records("killed", *Stage1Steps.SEED_SCORED, RefinementTree)
    assert sorted(t.prompt_id for t in scored) == sorted(prompt_ids) and len(prompt_ids) == 4
    manifest = json.loads((trees_dir / "_manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0, 1, 2, 3]
