"""The `refine`, `think` and `evaluate` flows end to end on the tiny model under a Prefect harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avr_core.config import (
    EvaluationConfig,
    ExecutionConfig,
    IngestConfig,
    RefineConfig,
    RulesModel,
    SystemRef,
    ThinkConfig,
    TransformersModel,
)
from avr_core.schemas import Judgement, RefinedAnswers, Sampling, ThoughtAnswer
from avr_core.storage import DatasetStore
from flows.evaluate import evaluate
from flows.params import EvaluateParams, RefineParams, ThinkParams
from flows.testtime import refine, think
from tests.test_stage1_flow import _artifact_markdown

pytestmark = pytest.mark.slow  # Prefect API server and the tiny model

EXECUTION = ExecutionConfig(batch_size=8, device="cpu")


def _steps(summary) -> dict:
    return {step.name: step for step in summary.steps}


def test_refine_own_answers_keeps_every_round_and_publishes_the_curve(prefect_harness, tmp_path):
    params = RefineParams(
        run_name="refine-own",
        storage_root=f"file://{tmp_path}/store",
        ingest=IngestConfig(max_prompts=3, shard_size=2),
        reward=RulesModel(length_penalty=1.0),
        refine=RefineConfig(rounds=2, sampling=Sampling(max_tokens=24, seed=0)),
        execution=EXECUTION,
    )
    summary = refine(params)
    store = DatasetStore(params.storage_root)
    records = store.read_records("refine-own", "testtime", "refine", RefinedAnswers)
    assert len(records) == 3
    for record in records:
        assert len(record.rounds) == 3 and record.rounds[0].critique is None
        assert all(r.critique and r.refinement == r.answer for r in record.rounds[1:])
        assert all(r.score is not None for r in record.rounds)
        assert record.generator == "transformers:smollm2-135m-instruct"
    step = _steps(summary)["testtime/refine"]
    for k in range(3):
        mean = sum(r.rounds[k].score for r in records) / 3
        assert step.means[f"score_round_{k}"] == pytest.approx(mean, abs=1e-6)
    markdown = _artifact_markdown("refine-own-testtime-refine")
    assert "| mean score_round_2 |" in markdown


def test_refine_over_another_systems_outputs(prefect_harness, tmp_path):
    answers = tmp_path / "other.jsonl"
    rows = [
        {"prompt": "Name three fruits.", "response": "Apples.", "generator": "other-7b"},
        {"prompt": "Say hello politely.", "response": "Hello there.", "generator": "other-7b"},
        {"prompt": "Broken row without a response."},
    ]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = RefineParams(
        run_name="refine-cross",
        storage_root=f"file://{tmp_path}/store",
        reward=RulesModel(),
        refine=RefineConfig(
            rounds=1,
            sampling=Sampling(max_tokens=24, seed=0),
            keep_best=True,
            answers=str(answers),
            on_bad_row="skip",
        ),
        execution=EXECUTION,
    )
    summary = refine(params)
    steps = _steps(summary)
    assert steps["testtime/refine_start"].counts["rejected_rows"] == 1
    records = DatasetStore(params.storage_root).read_records(
        "refine-cross", "testtime", "refine", RefinedAnswers
    )
    assert sorted(r.rounds[0].answer for r in records) == ["Apples.", "Hello there."]
    assert {r.generator for r in records} == {"other-7b"}
    for record in records:
        last = record.rounds[-1]
        # keep_best: the answer after round 1 is the refinement only if it scored higher
        assert last.answer == (record.rounds[0].answer if last.kept_previous else last.refinement)
        assert last.score >= record.rounds[0].score


def test_think_records_every_prompt_and_counts_format_failures(prefect_harness, tmp_path):
    params = ThinkParams(
        run_name="think",
        storage_root=f"file://{tmp_path}/store",
        ingest=IngestConfig(max_prompts=3, shard_size=3),
        think=ThinkConfig(sampling=Sampling(max_tokens=24, seed=0), max_format_retries=1),
        execution=EXECUTION,
    )
    summary = think(params)
    records = DatasetStore(params.storage_root).read_records(
        "think", "testtime", "think", ThoughtAnswer
    )
    assert len(records) == 3  # one per prompt, parsed or not
    counts = _steps(summary)["testtime/think"].counts
    assert counts["format_failures"] == sum(r.format_failure for r in records)
    assert counts["format_retries"] == sum(r.format_retries for r in records)
    for record in records:
        assert record.format_failure == (record.final_answer is None)
        assert record.response


def test_evaluate_refine_rounds_and_thinking_against_the_start(prefect_harness, tmp_path):
    from PIL import Image

    root = f"file://{tmp_path}/store"
    run = "evaluated"
    ingest = IngestConfig(max_prompts=4, shard_size=2)
    refine(
        RefineParams(
            run_name=run,
            storage_root=root,
            ingest=ingest,
            refine=RefineConfig(rounds=1, sampling=Sampling(max_tokens=24, seed=0)),
            execution=EXECUTION,
        )
    )
    think(
        ThinkParams(
            run_name=run,
            storage_root=root,
            ingest=ingest,
            think=ThinkConfig(sampling=Sampling(max_tokens=24, seed=0), max_format_retries=0),
            execution=EXECUTION,
        )
    )
    evaluation = EvaluationConfig(
        systems=[
            SystemRef(name="refined", step="testtime/refine"),
            SystemRef(name="thinker", step="testtime/think"),
        ],
        baseline=SystemRef(name="start", step="testtime/refine", round=0),
        judge_sampling=Sampling(temperature=0.0, max_tokens=16, seed=0),
        resamples=200,
        shard_size=2,
    )
    report = evaluate(
        EvaluateParams(
            run_name=run,
            storage_root=root,
            evaluation=evaluation,
            reward=RulesModel(length_penalty=1.0),
            judge=TransformersModel(),  # the tiny model as pairwise judge
            execution=EXECUTION,
        )
    )
    store = DatasetStore(root)
    rows = store.read_records(run, "eval", "eval", Judgement)
    systems = ["refined@round0", "refined@round1", "thinker"]
    assert len(rows) == 4 * len(systems) * 2  # prompts x systems x judges
    assert {r.system for r in rows} == set(systems) and {r.baseline for r in rows} == {"start"}
    summaries = {(s.system, s.judge.split(":")[0]): s for s in report.summaries}
    assert set(summaries) == {(s, j) for s in systems for j in ("reward", "pairwise")}
    for summary in report.summaries:
        assert summary.prompts == 4 and summary.judged + summary.unjudged == 4
        for estimate in (summary.win_rate, summary.lc_win_rate):
            if estimate is not None:
                assert estimate.ci_low <= estimate.value <= estimate.ci_high
    # round 0 against itself: every reward game is a tie
    assert summaries[("refined@round0", "reward")].win_rate.value == 50.0
    for uri in report.plots.values():
        image = Image.open(uri.removeprefix("file://"))
        image.load()
        assert image.format == "PNG"
    assert set(report.plots) == {"win_rate", "scaling"}
    for name in ("refined@round1", "thinker", "start"):
        exported = json.loads(Path(report.alpaca_eval[name].removeprefix("file://")).read_text())
        assert len(exported) == 4
        assert all(set(row) == {"instruction", "output", "generator"} for row in exported)
        assert {row["generator"] for row in exported} == {name}
    markdown = _artifact_markdown(f"{run}-evaluation-eval")
    assert "win rate % [95% CI]" in markdown and "thinker" in markdown
    assert report.plots["win_rate"] in markdown
