"""`avr plan`: the estimate's arithmetic, its calibration from step records, the command, and (slow)
a preview on the tiny model whose calibration predicts a bigger run's tokens within 20%."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avr_core.config import IngestConfig, LongResponseConfig, SearchConfig, TreeConfig
from avr_core.estimate import (
    GenerationStep,
    calibrate,
    estimate_run,
    estimate_step,
    format_estimate,
    planned_work,
)
from avr_core.layout import RunLayout, StepRef
from avr_core.schemas import Sampling
from avr_core.settings import AvrSettings
from avr_core.storage import DatasetStore
from flows import cli
from flows.config_files import TINY_CONFIG, build_params, load_config
from flows.params import AvrParams, RefineParams, Stage1Params, Stage2Params, ThinkParams
from flows.plan import count_prompts, find_calibrations, generation_steps, plan_flow
from flows.preview import preview

TREES = GenerationStep(step="stage1/seed_trees", kind="trees", model="m", max_tokens=100, x=2, y=3)


def test_planned_work_per_step_kind() -> None:
    # A tree: 1 answer + x critiques + x*y refinements per prompt, three calls per shard.
    assert planned_work(TREES, prompts=10, shards=2) == (6, 10 * (1 + 2 + 6))
    search = GenerationStep(step="s", kind="search", model="m", max_tokens=1, x=2, y=2, rounds=5)
    # Starting answers (one call) then two calls a round; x + x*y texts a round per prompt.
    assert planned_work(search, 4, 1) == (1 + 10, 4 + 4 * 5 * 6)
    from_reference = search.model_copy(update={"starts_from_policy": False})
    assert planned_work(from_reference, 4, 1) == (10, 4 * 5 * 6)
    long = GenerationStep(step="l", kind="long_responses", model="m", max_tokens=1, k=5)
    assert planned_work(long, 3, 1) == (1, 15)
    refine = GenerationStep(step="r", kind="refine", model="m", max_tokens=1, rounds=2)
    assert planned_work(refine, 3, 2) == (8, 12)
    think = GenerationStep(step="t", kind="think", model="m", max_tokens=1)
    assert planned_work(think, 3, 2) == (2, 3)


def test_uncalibrated_estimate_is_the_bound() -> None:
    step = estimate_step(TREES, prompts=10, shard_size=4, tokens_per_second=90.0)
    assert (step.shards, step.engine_calls, step.texts) == (3, 9, 90)
    assert step.completion_tokens == step.bound_tokens == 9000
    assert step.seconds == pytest.approx(100.0) and step.calibration is None


def test_calibration_scales_texts_and_length_and_measures_speed() -> None:
    # Measured on 4 prompts: 36 texts planned, 40 generated (retries), 25 tokens each, in 20 s.
    record = {"rows": 4, "counts": {"generated_texts": 40, "completion_tokens": 1000}}
    record["seconds"] = {"compute": 20.0}
    calibration = calibrate(TREES, "run x", record)
    assert calibration is not None
    assert calibration.tokens_per_text == 25.0 and calibration.tokens_per_second == 50.0
    assert calibration.texts_per_planned == pytest.approx(40 / 36)
    step = estimate_step(
        TREES, prompts=100, shard_size=8, tokens_per_second=1e6, calibration=calibration
    )
    assert step.completion_tokens == round(900 * 40 / 36 * 25)  # 100 prompts x 9 texts
    assert step.seconds == pytest.approx(step.completion_tokens / 50.0)  # the measured speed
    assert calibrate(TREES, "old", {"rows": 4, "counts": {"engine_calls": 3}}) is None


def test_estimate_table_says_what_is_measured() -> None:
    calibration = calibrate(
        TREES,
        "run p-preview stage1/seed_trees",
        {"rows": 2, "counts": {"generated_texts": 18, "completion_tokens": 360}},
    )
    sft = TREES.model_copy(update={"step": "stage1/sft_trees"})
    estimate = estimate_run("stage1", [TREES, sft], 16, 8, 100.0, {TREES.step: calibration})
    text = format_estimate(estimate)
    assert "stage1: 16 prompts in 2 shards" in text
    assert "measured" in text and "bound" in text
    assert "calibrated on run p-preview stage1/seed_trees (2 prompts): 20.0 tokens per text" in text
    assert estimate.completion_tokens == 16 * 9 * 20 + 16 * 9 * 100


def test_generation_steps_follow_the_flow() -> None:
    stage1 = Stage1Params(tree=TreeConfig(x=3, y=1, sampling=Sampling(max_tokens=64)))
    assert [(s.step, s.x, s.y, s.max_tokens) for s in generation_steps(stage1)] == [
        ("stage1/seed_trees", 3, 1, 64),
        ("stage1/sft_trees", 3, 1, 64),
    ]
    stage2 = Stage2Params(
        search=SearchConfig(max_rounds=4, start="reference"), long=LongResponseConfig(k=3)
    )
    search, long = generation_steps(stage2)
    assert (search.rounds, search.starts_from_policy, long.k) == (4, False, 3)
    assert [s.step for s in generation_steps(AvrParams())] == [
        "stage1/seed_trees",
        "stage1/sft_trees",
        "stage2/search",
        "stage2/long_responses",
    ]
    assert [s.kind for s in generation_steps(RefineParams())] == ["answers", "refine"]
    assert [s.step for s in generation_steps(ThinkParams(name="t2"))] == ["testtime/t2"]


def test_count_prompts_reads_the_set_as_ingest_does_and_writes_nothing(tmp_path: Path) -> None:
    settings = AvrSettings()
    assert count_prompts(Stage1Params(), settings) == (24, 8)  # bundled:train
    capped = Stage1Params(ingest=IngestConfig(max_prompts=5, shard_size=2))
    assert count_prompts(capped, settings) == (5, 2)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\nnot json\n{"prompt": "a"}\n')
    skipping = Stage1Params(ingest=IngestConfig(prompts=str(prompts), on_bad_row="skip"))
    assert count_prompts(skipping, settings)[0] == 2  # a bad row and a duplicate left out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]  # no rejects file written
    failing = Stage1Params(ingest=IngestConfig(prompts=str(prompts)))
    with pytest.raises(ValueError, match="p.jsonl: row 2: .*not valid JSON"):
        count_prompts(failing, settings)


def _record_step(store: DatasetStore, run: str, step: str, record: dict) -> None:
    stage, name = step.split("/")
    store.write_json(RunLayout(run).step_record(StepRef(stage, name)), record)


def test_calibrations_come_from_the_run_then_its_preview_and_borrow_by_kind(tmp_path: Path) -> None:
    store = DatasetStore(str(tmp_path))
    counts = {"generated_texts": 18, "completion_tokens": 540}
    _record_step(store, "r-preview", "stage1/seed_trees", {"rows": 2, "counts": counts})
    steps = generation_steps(Stage1Params(tree=TreeConfig(x=2, y=3)))
    found = find_calibrations(store, ["r", "r-preview"], steps)
    assert found["stage1/seed_trees"].source == "run r-preview stage1/seed_trees"
    # The SFT model's trees were never measured: they borrow the seed trees' calibration.
    assert found["stage1/sft_trees"] == found["stage1/seed_trees"]
    _record_step(store, "r", "stage1/seed_trees", {"rows": 4, "counts": counts})
    assert find_calibrations(store, ["r", "r-preview"], steps)["stage1/seed_trees"].prompts == 4
    assert find_calibrations(store, ["other"], steps) == {}


def test_avr_plan_prints_the_estimate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["plan", "stage1", "--config", str(TINY_CONFIG), "--set", f"storage_root={tmp_path}"]
    assert cli.main([*argv, "--tokens-per-second", "50"]) == 0
    out = capsys.readouterr().out
    assert "stage1: 24 prompts in 3 shards" in out and "stage1/sft_trees" in out
    assert "time at 50 tokens/s" in out
    assert cli.main([*argv, "--set", "tree.nope=1"]) == 2  # the config is checked as `avr run` does
    assert "tree.nope" in capsys.readouterr().err
    assert cli.main(["plan", "evaluate", "--config", str(TINY_CONFIG)]) == 2
    assert "nothing to estimate" in capsys.readouterr().err


@pytest.mark.slow
def test_preview_calibrates_a_bigger_run_within_20_percent(prefect_harness, tmp_path: Path) -> None:
    config = load_config(TINY_CONFIG)
    root = f"file://{tmp_path}/store"
    sets = [f"storage_root={root}", "tree.sampling.max_tokens=40", "tree.x=1", "tree.y=2"]
    small = build_params(Stage1Params, config, [*sets, "run_name=small"])
    settings = AvrSettings()
    steps = preview(small, 4, settings)
    assert steps[:2] == ["inputs/prompts", "stage1/seed_trees"]

    big = build_params(Stage1Params, config, [*sets, "run_name=big", "ingest.max_prompts=8"])
    estimate = plan_flow("stage1", big, settings, calibrate_from="small-preview")
    seed = next(s for s in estimate.steps if s.step == "stage1/seed_trees")
    assert seed.calibration is not None and seed.calibration.prompts == 4

    preview(big, 8, settings)  # the "run": the same step over 8 prompts, measured
    store = DatasetStore(root)
    manifest = store.read_manifest("big-preview", "stage1", "seed_trees")
    assert manifest is not None
    measured = manifest.tokens["completion_tokens"]
    assert abs(seed.completion_tokens - measured) <= 0.2 * measured, (seed, measured)
    record = json.loads(
        (tmp_path / "store/runs/big-preview/_records/stage1/seed_trees.json").read_text()
    )
    assert record["counts"]["completion_tokens"] == measured
