"""Stage II on the tiny model: the `avr` flow end to end, Stage II on S3, a killed search resumed.

The end-to-end test checks every Stage II dataset against its schema and the counts its step
reported (and published as an artifact), that trajectories parse back, that every
length-controlled pair obeys the length rule, and that both Stage II trainings moved the weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import tasks.stage2
from avr_core.config import (
    ExecutionConfig,
    IngestConfig,
    LongResponseConfig,
    RulesModel,
    SearchConfig,
    SelectionConfig,
    TrainingConfig,
    TransformersModel,
    TreeConfig,
)
from avr_core.reporting import COUNT_LABELS
from avr_core.results import RunSummary
from avr_core.schemas import (
    CoTSample,
    GreedySearch,
    PreferencePair,
    PromptRecord,
    Sampling,
    SFTExample,
)
from avr_core.selection import CHOSEN_LONGER, length_controlled_outcome
from avr_core.settings import AvrSettings
from avr_core.steps import Stage1Steps, Stage2Steps
from avr_core.storage import DatasetStore
from avr_core.templates import extract_final_answer
from flows.avr import avr
from flows.inspect_runs import show_step, summarize_run
from flows.params import AvrParams, GreedySearchParams, IngestParams, Stage2Params
from flows.stage2 import stage2
from flows.steps import greedy_search_flow, ingest_prompts_flow
from tests.crashes import file_states, kill_once_committed
from tests.test_stage1_flow import _artifact_markdown, _local_model, _tensor

pytestmark = pytest.mark.slow  # Prefect API server, the tiny model, training

CLOSING_REVIEW = "Let me review this draft once more."


def _stage2_sections(k: int = 3) -> dict:
    return dict(
        search=SearchConfig(x=2, y=2, max_rounds=3, sampling=Sampling(max_tokens=48, seed=0)),
        long=LongResponseConfig(
            k=k, sampling=Sampling(max_tokens=512, seed=0), max_format_retries=2
        ),
        # Enough steps at a high rate for the tiny model to learn the trajectory's shape (and
        # so end its long responses with the final-answer marker); no intermediate checkpoints.
        stage2_sft=TrainingConfig(learning_rate=3e-4, max_steps=12, max_length=768, save_steps=100),
        stage2_dpo=TrainingConfig(learning_rate=1e-4, max_steps=2, max_length=768, save_steps=100),
    )


def _avr_params(run: str, root: str, prompts: int = 8) -> AvrParams:
    return AvrParams(
        run_name=run,
        storage_root=root,
        ingest=IngestConfig(max_prompts=prompts, shard_size=4),
        tree=TreeConfig(x=2, y=2, sampling=Sampling(max_tokens=32, seed=0)),
        reward=RulesModel(length_penalty=1.0),
        selection=SelectionConfig(rsft_include_original=True),
        sft=TrainingConfig(learning_rate=1e-4, max_steps=2, max_length=256, save_steps=100),
        dpo=TrainingConfig(learning_rate=1e-4, max_steps=2, max_length=256, save_steps=100),
        execution=ExecutionConfig(batch_size=8, device="cpu"),
        **_stage2_sections(),
    )


def _step_counts(summary: RunSummary) -> dict[str, dict[str, int]]:
    return {step.name: step.counts for step in summary.steps}


def _check_stage2(summary: RunSummary, run: str, store: DatasetStore, tmp_path: Path, k: int):
    counts = _step_counts(summary)
    prompt_ids = sorted(
        p.prompt_id for p in store.read_records(run, *Stage1Steps.PROMPTS, PromptRecord)
    )

    searches = store.read_records(run, *Stage2Steps.SEARCH, GreedySearch)
    assert sorted(s.prompt_id for s in searches) == prompt_ids  # one search per prompt
    search_counts = counts[str(Stage2Steps.SEARCH)]
    assert search_counts["searches"] == len(prompt_ids)
    assert search_counts["improved_rounds"] == sum(
        r.best is not None for s in searches for r in s.rounds
    )
    assert search_counts["improved_searches"] == sum(
        any(r.best is not None for r in s.rounds) for s in searches
    )
    assert sum(v for key, v in search_counts.items() if key.startswith("searches_with_")) == len(
        prompt_ids
    )
    for search in searches:
        for round_ in search.rounds:
            assert all(len(c.refinements) == 2 for c in round_.critiques)
        # rounds continue only after an improving one
        assert all(r.best is not None for r in search.rounds[:-1])

    trajectories = store.read_records(run, *Stage2Steps.TRAJECTORIES, SFTExample)
    trajectory_counts = counts[str(Stage2Steps.TRAJECTORIES)]
    assert len(trajectories) == trajectory_counts["trajectories"] > 0
    dropped = sum(v for key, v in trajectory_counts.items() if key.startswith("dropped_"))
    assert len(trajectories) + dropped == len(prompt_ids)
    by_search = {s.prompt_id: s for s in searches}
    for example in trajectories:
        assert example.kind == "trajectory"
        assert [m.role for m in example.messages] == ["user", "assistant"]
        text = example.messages[-1].content
        # It parses back to the search's final answer: the last improving round's winner.
        last_improving = [r for r in by_search[example.prompt_id].rounds if r.best is not None][-1]
        assert last_improving.best is not None
        ci, ri = last_improving.best
        winner = last_improving.critiques[ci].refinements[ri].text.strip()
        assert extract_final_answer(text) == winner
        assert text.count(CLOSING_REVIEW) == 1
    trajectory_markdown = _artifact_markdown(f"{run}-stage2-trajectories".replace("_", "-"))
    assert f"| trajectories kept | {len(trajectories)} |" in trajectory_markdown
    for key, value in trajectory_counts.items():
        if key.startswith("dropped_"):  # each reason a search was not kept, with its count
            assert f"| {COUNT_LABELS[key]} | {value} |" in trajectory_markdown

    long = store.read_records(run, *Stage2Steps.LONG_SCORED, CoTSample)
    assert sorted(s.prompt_id for s in long) == prompt_ids
    long_counts = counts[str(Stage2Steps.LONG_RESPONSES)]
    assert long_counts["responses"] == k * len(prompt_ids) == sum(len(s.samples) for s in long)
    unparsed = sum(r.final_answer is None for s in long for r in s.samples)
    long_markdown = _artifact_markdown(f"{run}-stage2-long-responses")
    retries = sum(r.format_retries for s in long for r in s.samples)
    assert long_counts["format_retries"] == retries
    assert f"| format retries | {retries} |" in long_markdown
    assert long_counts["unparsed"] == unparsed == counts[str(Stage2Steps.LONG_SCORED)]["unparsed"]
    reference = {s.prompt_id: s.initial_score for s in searches}
    for sample in long:
        assert sample.reference_score == reference[sample.prompt_id]
        for response in sample.samples:
            assert (response.score is None) == (response.final_answer is None)
            assert response.final_answer == extract_final_answer(response.response)

    pairs = store.read_records(run, *Stage2Steps.LC_PAIRS, PreferencePair)
    pair_counts = counts[str(Stage2Steps.LC_PAIRS)]
    assert len(pairs) == pair_counts["lc_pairs"] > 0
    by_prompt = {s.prompt_id: s for s in long}
    for pair in pairs:
        assert pair.kind == "trajectory"
        chosen, rejected = pair.chosen[0].content, pair.rejected[0].content
        assert chosen != rejected
        assert len(extract_final_answer(chosen)) <= len(extract_final_answer(rejected))
        assert pair.chosen_score > pair.rejected_score
        assert pair.chosen_score > by_prompt[pair.prompt_id].reference_score
        assert [m.role for m in pair.prompt] == ["user"]
    markdown = _artifact_markdown(f"{run}-stage2-lc-pairs".replace("_", "-"))
    assert f"| length-controlled pairs kept | {len(pairs)} |" in markdown
    assert "| mean chosen_final_chars |" in markdown
    length_rule = sum(
        outcome == CHOSEN_LONGER
        for outcome in (length_controlled_outcome(s, SelectionConfig())[1] for s in long)
    )
    assert pair_counts["dropped_chosen_longer"] == length_rule  # shown even when 0
    assert f"| {COUNT_LABELS['dropped_chosen_longer']} | {length_rule} |" in markdown
    search_markdown = _artifact_markdown(f"{run}-stage2-search".replace("_", "-"))
    assert f"| searches | {len(prompt_ids)} |" in search_markdown
    assert "| round_1_engine_calls |" in search_markdown

    # Stage II SFT moved the Stage I model; Stage II DPO moved the Stage II SFT model.
    checkpoints = summary.checkpoints
    stage2_sft = _tensor(_local_model(checkpoints[Stage2Steps.TRAIN_SFT.step], store, tmp_path))
    stage2_dpo = _tensor(_local_model(checkpoints[Stage2Steps.TRAIN_DPO.step], store, tmp_path))
    return stage2_sft, stage2_dpo


@pytest.mark.timeout(3000)
def test_avr_end_to_end_local(prefect_harness, tmp_path):
    params = _avr_params("avr-local", f"file://{tmp_path}/store")
    summary = avr(params)
    store = DatasetStore(params.storage_root)
    stage2_sft, stage2_dpo = _check_stage2(summary, params.run_name, store, tmp_path, k=3)
    stage1_dpo_uri = summary.checkpoints[Stage1Steps.TRAIN_DPO.step]
    stage1_dpo = _tensor(_local_model(stage1_dpo_uri, store, tmp_path))
    assert not stage1_dpo.equal(stage2_sft) and not stage2_sft.equal(stage2_dpo)
    # Stage II started from the Stage I DPO model.
    searches = store.read_records(params.run_name, *Stage2Steps.SEARCH, GreedySearch)
    assert {s.lineage.generator for s in searches} == {f"transformers:{stage1_dpo_uri}"}
    names = [step.name for step in summary.steps]
    assert names[:7] == [
        "inputs/prompts",
        "stage1/seed_trees",
        "stage1/seed_scored",
        "stage1/rsft",
        "stage1/sft_trees",
        "stage1/sft_scored",
        "stage1/pairs",
    ]
    # `avr runs` / `avr show` read the Stage II records back
    overview = summarize_run(store, params.run_name)
    assert overview.status == "complete" and overview.flow == "avr"
    shown = show_step(store, params.run_name, "search", rows=1, width=200)
    assert "rounds" in shown.schema_text and len(shown.sample) == 1
    assert "samples" in show_step(store, params.run_name, "long_scored", 1, 200).schema_text
    assert names[7:] == [
        str(ref)
        for ref in (
            Stage2Steps.SEARCH,
            Stage2Steps.TRAJECTORIES,
            Stage2Steps.LONG_RESPONSES,
            Stage2Steps.LONG_SCORED,
            Stage2Steps.LC_PAIRS,
        )
    ]


@pytest.mark.timeout(3000)
def test_stage2_on_s3(prefect_harness, s3_location, tmp_path, monkeypatch):
    monkeypatch.setenv("AVR_STORAGE_OPTIONS", json.dumps(s3_location.storage_options))
    assert AvrSettings().storage_options == s3_location.storage_options
    params = Stage2Params(
        run_name="stage2-s3",
        storage_root=s3_location.root,
        ingest=IngestConfig(max_prompts=8, shard_size=4),
        reward=RulesModel(length_penalty=1.0),
        execution=ExecutionConfig(batch_size=8, device="cpu"),
        **_stage2_sections(),
    )
    summary = stage2(params)
    assert summary.checkpoints[Stage2Steps.TRAIN_DPO.step].startswith("s3://")
    store = DatasetStore(s3_location.root, s3_location.storage_options)
    stage2_sft, stage2_dpo = _check_stage2(summary, params.run_name, store, tmp_path, k=3)
    assert not stage2_sft.equal(stage2_dpo)


_CHILD = """
import sys
from flows.params import GreedySearchParams
from flows.steps import greedy_search_flow
greedy_search_flow(GreedySearchParams.model_validate_json(sys.argv[1]))
"""


@pytest.mark.timeout(1800)
def test_killed_greedy_search_resumes_without_recomputing(prefect_harness, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    root = f"file://{tmp_path}/store"
    run = "killed-search"
    ingest_prompts_flow(
        IngestParams(
            run_name=run, storage_root=root, ingest=IngestConfig(max_prompts=4, shard_size=1)
        )
    )
    params = GreedySearchParams(
        run_name=run,
        storage_root=root,
        policy=TransformersModel(),
        reward=RulesModel(length_penalty=1.0),
        search=SearchConfig(x=1, y=1, max_rounds=2, sampling=Sampling(max_tokens=12, seed=0)),
        execution=ExecutionConfig(batch_size=4, device="cpu"),
    )
    search_dir = tmp_path / f"store/runs/{run}/stage2/search"
    kill_once_committed(
        _CHILD, params.model_dump_json(), search_dir / "part-00000.parquet", PREFECT_API_URL.value()
    )
    committed = file_states(search_dir)
    assert 1 <= len(committed) < 4, committed
    assert not (search_dir / "_manifest.json").exists()

    # Re-run, recording which prompts reach the real tiny model.
    store = DatasetStore(root)
    done_prompts = {
        s.messages[0].content
        for name in committed
        for s in store.read_shard_records(run, *Stage2Steps.SEARCH, int(name[5:10]), GreedySearch)
    }
    seen: set[str] = set()
    real_open = tasks.stage2.open_generator

    def recording_open(spec, execution):
        generator = real_open(spec, execution)
        chat = generator.chat

        def recorded(conversations, sampling):
            seen.update(next(m.content for m in c if m.role == "user") for c in conversations)
            return chat(conversations, sampling)

        generator.chat = recorded
        return generator

    monkeypatch.setattr(tasks.stage2, "open_generator", recording_open)
    time.sleep(0.05)  # mtimes of rewritten files would differ
    result = greedy_search_flow(params)
    missing = 4 - len(committed)
    assert (result.shards_computed, result.shards_skipped) == (missing, len(committed))
    assert seen and not seen & done_prompts  # no committed prompt was searched again
    after = file_states(search_dir)
    assert {name: after[name] for name in committed} == committed
    prompts = store.read_records(run, *Stage1Steps.PROMPTS, PromptRecord)
    searches = store.read_records(run, *Stage2Steps.SEARCH, GreedySearch)
    assert sorted(s.prompt_id for s in searches) == sorted(p.prompt_id for p in prompts)
    assert len(searches) == 4
