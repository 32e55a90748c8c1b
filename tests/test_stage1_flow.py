"""Stage I end to end on the tiny model: datasets, artifacts, run records, and trained weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from avr_core.checkpoints import download_dir
from avr_core.config import (
    ExecutionConfig,
    IngestConfig,
    RulesModel,
    SelectionConfig,
    TrainingConfig,
    TreeConfig,
)
from avr_core.layout import RunLayout
from avr_core.models import ensure_tiny_model
from avr_core.reporting import ShardStats, format_run_summary, gain_summary, merge_stats
from avr_core.results import RunSummary, StepResult
from avr_core.schemas import (
    PreferencePair,
    PromptRecord,
    RefinementTree,
    Sampling,
    SFTExample,
    table_to_records,
)
from avr_core.settings import AvrSettings
from avr_core.steps import Stage1Steps
from avr_core.storage import DatasetStore
from flows.params import Stage1Params, resolve_storage_root
from flows.stage1 import stage1

PROBE_TENSOR = "model.layers.0.self_attn.q_proj.weight"


def _tiny_params(run: str, root: str) -> Stage1Params:
    return Stage1Params(
        run_name=run,
        storage_root=root,
        ingest=IngestConfig(max_prompts=4, shard_size=2),
        # Short generations: the test machine has 2 shared cores (about 1 tok/s per sequence).
        tree=TreeConfig(x=2, y=2, sampling=Sampling(max_tokens=32, seed=0)),
        # A length penalty breaks ties between equally compliant answers: pairs get made.
        reward=RulesModel(length_penalty=1.0),
        selection=SelectionConfig(rsft_include_original=True),
        # No intermediate checkpoints (1.5 GB each with optimizer state on this model): training
        # resume from a synced checkpoint is tested in test_training.py.
        sft=TrainingConfig(learning_rate=1e-4, max_steps=2, max_length=256, save_steps=100),
        dpo=TrainingConfig(learning_rate=1e-4, max_steps=2, max_length=256, save_steps=100),
        execution=ExecutionConfig(batch_size=8, device="cpu"),
    )


def _tensor(model_dir: Path, name: str = PROBE_TENSOR):
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    assert files, f"no safetensors in {model_dir}"
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            if name in handle.keys():  # noqa: SIM118 - safe_open has no __contains__
                return handle.get_tensor(name)
    raise AssertionError(f"{name} not in {model_dir}")


def _local_model(uri: str, store: DatasetStore, tmp_path: Path) -> Path:
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    target = tmp_path / uri.rsplit("/", 2)[-2]
    return download_dir(store.files, uri, target)


def _artifact_markdown(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert found, f"no artifact {key!r}"
    return found[-1].data


def _check_run(
    summary: RunSummary, params: Stage1Params, store: DatasetStore, tmp_path: Path
) -> None:
    run = params.run_name
    steps = {step.name: step.model_dump() for step in summary.steps}
    prompts = table_to_records(
        store.read_table(run, *Stage1Steps.PROMPTS, PromptRecord), PromptRecord
    )
    prompt_ids = sorted(p.prompt_id for p in prompts)
    assert len(prompt_ids) == 4 == steps["inputs/prompts"]["counts"]["prompts_in"]

    for ref in (Stage1Steps.SEED_SCORED, Stage1Steps.SFT_SCORED):
        table = store.read_table(run, *ref, RefinementTree)
        trees = table_to_records(table, RefinementTree)
        assert sorted(t.prompt_id for t in trees) == prompt_ids  # one tree per prompt
        assert all(t.answer_score is not None for t in trees)
        assert all(len(c.refinements) == 2 for t in trees for c in t.critiques)
        assert sum(len(t.critiques) for t in trees) == 8
        assert steps[str(ref)]["counts"]["scored_candidates"] == 4 * (1 + 2 * 2)
    sft_trees = table_to_records(
        store.read_table(run, *Stage1Steps.SFT_TREES, RefinementTree), RefinementTree
    )
    sft_uri = summary.checkpoints[Stage1Steps.TRAIN_SFT.step]
    assert all(t.lineage.generator == f"transformers:{sft_uri}" for t in sft_trees)
    assert all(t.lineage.run == run for t in sft_trees)

    examples = table_to_records(store.read_table(run, *Stage1Steps.RSFT, SFTExample), SFTExample)
    rsft_counts = steps["stage1/rsft"]["counts"]
    assert len(examples) == 4 == rsft_counts["rsft_examples"] + rsft_counts["original_examples"]
    assert sum(e.kind == "refinement" for e in examples) == rsft_counts["rsft_examples"]

    pairs = table_to_records(
        store.read_table(run, *Stage1Steps.PAIRS, PreferencePair), PreferencePair
    )
    pair_counts = steps["stage1/pairs"]["counts"]
    assert len(pairs) == pair_counts["pairs"] > 0
    for kind in ("generation", "critique", "refinement"):
        assert sum(p.kind == kind for p in pairs) == pair_counts.get(f"pairs_{kind}", 0)
    _check_trl_preference_rows(store.read_dataset(run, *Stage1Steps.PAIRS, PreferencePair))

    # The artifact of the pairs step shows the same counts as the summary.
    key = f"{run}-stage1-pairs".replace("_", "-")
    markdown = _artifact_markdown(key)
    assert f"| pairs | {pair_counts['pairs']} |" in markdown
    layout = RunLayout(run)
    run_json = store.read_json(layout.run_record)
    assert run_json["config"]["run_name"] == run
    assert "git_commit" in run_json["code_version"]
    assert summary.run_record_uri == store.uri(layout.run_record)
    # One small record per step (never one shared file that parallel tasks rewrite).
    assert store.read_json(layout.step_record(Stage1Steps.SFT_TREES))["wall_seconds"] > 0
    for ref in (Stage1Steps.SEED_TREES, Stage1Steps.TRAIN_SFT, Stage1Steps.TRAIN_DPO):
        assert store.read_json(layout.step_record(ref)) is not None, ref

    # SFT moved the base weights; DPO moved the SFT weights.
    base = _tensor(ensure_tiny_model())
    sft = _tensor(_local_model(sft_uri, store, tmp_path))
    dpo_uri = summary.checkpoints[Stage1Steps.TRAIN_DPO.step]
    dpo = _tensor(_local_model(dpo_uri, store, tmp_path))
    assert base.shape == sft.shape == dpo.shape
    assert not base.equal(sft) and not sft.equal(dpo)
    printed = format_run_summary(summary)
    assert dpo_uri in printed and sft_uri in printed and str(Stage1Steps.PAIRS) in printed


def _check_trl_preference_rows(dataset) -> None:
    """Every row is TRL conversational preference data that the tiny model's template renders."""
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template, is_conversational

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model())
    for row in dataset.select_columns(["prompt", "chosen", "rejected"]):
        assert is_conversational(row)
        assert row["prompt"][-1]["role"] == "user"
        assert (
            [m["role"] for m in row["chosen"]]
            == ["assistant"]
            == [m["role"] for m in row["rejected"]]
        )
        rendered = apply_chat_template(row, tokenizer)
        assert rendered["chosen"] and rendered["rejected"] and rendered["prompt"]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_stage1_end_to_end_local(prefect_harness, tmp_path):
    params = _tiny_params("e2e-local", f"file://{tmp_path}/store")
    summary = stage1(params)
    _check_run(summary, params, DatasetStore(params.storage_root), tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_stage1_end_to_end_on_s3(prefect_harness, s3_location, tmp_path, monkeypatch):
    import json

    # Credentials and endpoint are infrastructure: they reach the tasks through the environment.
    monkeypatch.setenv("AVR_STORAGE_OPTIONS", json.dumps(s3_location.storage_options))
    assert AvrSettings().storage_options == s3_location.storage_options
    params = _tiny_params("e2e-s3", s3_location.root)
    summary = stage1(params)
    assert summary.checkpoints[Stage1Steps.TRAIN_DPO.step].startswith("s3://")
    store = DatasetStore(s3_location.root, s3_location.storage_options)
    _check_run(summary, params, store, tmp_path)


def test_storage_root_defaults_to_absolute_file_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = Stage1Params()
    assert params.storage_root == f"file://{tmp_path}/avr-output"
    assert resolve_storage_root("rel/dir") == f"file://{tmp_path}/rel/dir"
    assert resolve_storage_root("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert params.reward.backend == "rules" and params.policy.backend == "transformers"
    with pytest.raises(ValueError, match="run_name"):
        Stage1Params(run_name="../escape")


def test_storage_options_setting_must_be_a_json_object(monkeypatch):
    monkeypatch.setenv("AVR_STORAGE_OPTIONS", "[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        AvrSettings()
    monkeypatch.setenv("AVR_STORAGE_OPTIONS", "{bad")
    with pytest.raises(ValueError, match="storage_options"):
        AvrSettings()
    monkeypatch.setenv("AVR_STORAGE_OPTIONS", '{"anon": true}')
    assert AvrSettings().storage_options == {"anon": True}
    monkeypatch.delenv("AVR_STORAGE_OPTIONS")
    assert AvrSettings().storage_options == {}


def _step(counts: dict[str, int], gain: tuple[float | None, float | None]) -> StepResult:
    return StepResult(
        stage="stage1",
        step="pairs",
        uri="s3://b/p",
        fingerprint="f",
        rows=3,
        shards=2,
        shards_computed=1,
        shards_skipped=1,
        counts=counts,
        gain_mean=gain[0],
        gain_median=gain[1],
    )


def test_step_report_merges_shards_and_renders_every_counter():
    from avr_core.reporting import render_step_markdown

    merged = merge_stats(
        [
            ShardStats(
                counts={"pairs": 2, "pairs_generation": 2},
                values={"gain": [0.5]},
                seconds={"compute": 1},
            ),
            ShardStats(
                counts={"pairs": 1, "pairs_critique": 1}, values={"gain": [-0.1, float("nan")]}
            ),
        ]
    )
    assert merged.counts == {"pairs": 3, "pairs_generation": 2, "pairs_critique": 1}
    assert merged.seconds == {"compute": 1}
    mean, median = gain_summary(merged.values["gain"])
    assert mean == pytest.approx(0.2) and median == pytest.approx(0.2)
    markdown = render_step_markdown(_step(merged.counts, (mean, median)))
    assert "| pairs | 3 |" in markdown and "| pairs: critique | 1 |" in markdown
    assert "| mean score gain | +0.2000 |" in markdown
    assert "| shards reused (already done) | 1 |" in markdown
    assert gain_summary([]) == (None, None)
