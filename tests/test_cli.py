"""The `avr` command: config overrides and their errors, and reading runs back from a store."""

from __future__ import annotations

from pathlib import Path

import pytest

from avr_core.schemas import Message, PromptRecord
from avr_core.storage import DatasetStore
from flows import cli
from flows.params import GenerateTreesParams, Stage1Params, TrainParams

ROOT = Path(__file__).resolve().parents[1]
DEMO_PROMPTS = str(ROOT / "avr_core" / "data" / "demo_prompts.jsonl")


# ---- --set parsing and validation ---------------------------------------------------------


def test_override_values_are_yaml() -> None:
    assert cli.parse_override("sampling.max_tokens=64") == (["sampling", "max_tokens"], 64)
    assert cli.parse_override("require_rating=true") == (["require_rating"], True)
    assert cli.parse_override("policy={backend: vllm, path: m}") == (
        ["policy"],
        {"backend": "vllm", "path": "m"},
    )
    assert cli.parse_override("run_name=a=b") == (["run_name"], "a=b")


@pytest.mark.parametrize("bad", ["sampling.max_tokens", "=3", "a..b=1", ".x=1"])
def test_malformed_override_is_rejected(bad: str) -> None:
    with pytest.raises(cli.ConfigError, match="KEY=VALUE"):
        cli.parse_override(bad)


def test_overrides_merge_into_nested_sections() -> None:
    config = {"sampling": {"temperature": 0.7, "max_tokens": 128}, "x": 2}
    params = cli.build_params(
        GenerateTreesParams,
        config,
        ["sampling.max_tokens=16", "x=1", "policy.dtype=float32", "run_name=r1"],
    )
    assert params.sampling.max_tokens == 16 and params.sampling.temperature == 0.7
    assert params.x == 1 and params.policy.dtype == "float32" and params.run_name == "r1"
    assert config["sampling"]["max_tokens"] == 128, "the loaded config is not mutated"


def test_free_form_dict_fields_take_any_key() -> None:
    params = cli.build_params(TrainParams, {}, ["training.extra.warmup_ratio=0.1"])
    assert params.training.extra == {"warmup_ratio": 0.1}


def test_unknown_key_names_the_key_and_the_choices() -> None:
    with pytest.raises(cli.ConfigError) as err:
        cli.build_params(GenerateTreesParams, {}, ["sampling.max_tokenz=3"])
    message = str(err.value)
    assert "sampling.max_tokenz" in message and "max_tokens" in message
    with pytest.raises(cli.ConfigError, match="no field 'polcy'"):
        cli.build_params(GenerateTreesParams, {}, ["polcy.path=x"])
    with pytest.raises(cli.ConfigError, match="x is not a section"):
        cli.build_params(GenerateTreesParams, {}, ["x.y=1"])


def test_wrong_type_names_the_field_and_value() -> None:
    with pytest.raises(cli.ConfigError) as err:
        cli.build_params(GenerateTreesParams, {}, ["sampling.max_tokens=lots", "x=0"])
    message = str(err.value)
    assert "sampling.max_tokens: Input should be a valid integer" in message
    assert "'lots'" in message
    assert "x: Input should be greater than or equal to 1" in message


def test_unknown_key_in_config_file_fails(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"prompts: {DEMO_PROMPTS}\nsampling:\n  temprature: 0.5\n")
    with pytest.raises(cli.ConfigError, match=r"sampling\.temprature: unknown key"):
        cli.check_config(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(cli.ConfigError, match="must be a mapping"):
        cli.load_config(path)


def test_step_flows_take_their_part_of_a_stage1_config() -> None:
    config = cli.load_config(cli.TINY_CONFIG)
    part = cli.params_for_model(config, GenerateTreesParams)
    assert "reward" not in part and "sft" not in part and part["x"] == config["x"]
    # Stage I takes all of it; the paper config's `stage2` section is kept for Stage II only.
    paper = cli.load_config(cli.PAPER_CONFIG)
    assert "stage2" in paper and "stage2" not in cli.params_for_model(paper, Stage1Params)


def test_run_command_reports_bad_override_and_exits_2(capsys: pytest.CaptureFixture) -> None:
    code = cli.main(
        ["run", "stage1", "--config", str(cli.TINY_CONFIG), "--set", f"prompts={DEMO_PROMPTS}",
         "--set", "sampling.top_p=2"]
    )  # fmt: skip
    assert code == 2
    assert "sampling.top_p: Input should be less than or equal to 1" in capsys.readouterr().err
    assert cli.main(["run", "no-such-flow"]) == 2
    assert "known flows:" in capsys.readouterr().err


def test_missing_local_model_fails_before_the_run(tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"
    params = GenerateTreesParams(policy={"backend": "transformers", "path": str(missing)})
    with pytest.raises(cli.ConfigError, match=r"policy\.path: model .*no-model-here.* not found"):
        cli.check_models(params)
    cli.check_models(GenerateTreesParams())  # the bundled tiny model is there


def test_hub_model_absent_offline_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    params = GenerateTreesParams(policy={"backend": "vllm", "path": "nobody/no-such-model"})
    with pytest.raises(cli.ConfigError, match="not in the local cache"):
        cli.check_models(params)


# ---- runs and show on a store written directly ---------------------------------------------


def _prompt(i: int) -> PromptRecord:
    text = f"Write a haiku about the number {i}." + (" Long." * 200 if i == 0 else "")
    return PromptRecord(prompt_id=f"p{i}", messages=[Message(role="user", content=text)])


@pytest.fixture
def populated_store(tmp_path: Path) -> DatasetStore:
    store = DatasetStore(str(tmp_path / "store"))
    for index in range(2):
        records = [_prompt(2 * index), _prompt(2 * index + 1)]
        store.write_shard("run-a", "inputs", "prompts", index, records, PromptRecord, "fp1")
    store.write_manifest("run-a", "inputs", "prompts", PromptRecord, "fp1", expected_shards=2)
    # A step that was interrupted: one shard, no manifest.
    store.write_shard("run-a", "stage1", "seed_trees", 0, [_prompt(9)], PromptRecord, "fp2")
    store.write_json("runs/run-a/run.json", {"run": "run-a", "flow": "stage1", "started_at": "t0"})
    store.write_shard("run-b", "inputs", "prompts", 0, [_prompt(5)], PromptRecord, "fp3")
    store.write_manifest("run-b", "inputs", "prompts", PromptRecord, "fp3")
    return store


def test_list_steps_reports_complete_and_partial(populated_store: DatasetStore) -> None:
    steps = {f"{s.stage}/{s.step}": s for s in cli.list_steps(populated_store, "run-a")}
    assert steps["inputs/prompts"].status == "complete"
    assert steps["inputs/prompts"].rows == 4 and steps["inputs/prompts"].shards == 2
    assert (
        steps["stage1/seed_trees"].status == "partial" and steps["stage1/seed_trees"].rows is None
    )
    assert cli.summarize_run(populated_store, "run-a")["status"] == "incomplete"
    assert cli.summarize_run(populated_store, "run-b")["status"] == "complete"


def test_runs_command(populated_store: DatasetStore, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["runs", "--root", populated_store.root]) == 0
    out = capsys.readouterr().out
    for text in ("run-a", "run-b", "stage1", "inputs/prompts", "complete", "partial"):
        assert text in out
    assert cli.main(["runs", "--root", str(Path(populated_store.root) / "empty")]) == 0
    assert "no runs under" in capsys.readouterr().out


def test_show_step_prints_manifest_schema_and_rows(
    populated_store: DatasetStore, capsys: pytest.CaptureFixture
) -> None:
    shown = cli.show_step(populated_store, "run-a", "prompts", rows=1, width=50)
    assert (
        shown["manifest"]["total_rows"] == 4 and shown["manifest"]["record_type"] == "PromptRecord"
    )
    assert "prompt_id: string" in shown["schema"]
    assert len(shown["sample"]) == 1 and shown["sample"][0]["prompt_id"] == "p0"
    assert "chars]" in shown["sample"][0]["messages"][0]["content"], "long strings are cut"

    assert cli.main(["show", "run-a", "inputs/prompts", "--root", populated_store.root]) == 0
    out = capsys.readouterr().out
    assert "PromptRecord" in out and "fp1" in out and "haiku" in out
    assert cli.main(["show", "run-a", "--root", populated_store.root]) == 0
    assert "stage1/seed_trees: partial" in capsys.readouterr().out


def test_show_errors_name_what_exists(
    populated_store: DatasetStore, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["show", "run-a", "pairs", "--root", populated_store.root]) == 2
    assert "inputs/prompts" in capsys.readouterr().err
    assert cli.main(["show", "run-a", "seed_trees", "--root", populated_store.root]) == 2
    assert "has no manifest" in capsys.readouterr().err
    assert cli.main(["show", "run-z", "--root", populated_store.root]) == 2
    assert "run-a, run-b" in capsys.readouterr().err


def test_unreachable_storage_root_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    port = cli.free_port()  # nothing listens there
    monkeypatch.setenv(
        "AVR_STORAGE_OPTIONS",
        f'{{"key": "k", "secret": "s", "retries": 1, "client_kwargs": {{"endpoint_url": '
        f'"http://127.0.0.1:{port}"}}, "config_kwargs": {{"connect_timeout": 1, '
        f'"retries": {{"max_attempts": 1}}}}}}',
    )
    assert cli.main(["runs", "--root", "s3://avr-nowhere/prefix"]) == 2
    err = capsys.readouterr().err
    assert "storage root 's3://avr-nowhere/prefix' is not readable" in err
    assert "AVR_STORAGE_OPTIONS" in err


@pytest.mark.slow
def test_run_command_runs_a_flow_in_process(
    tmp_path: Path, prefect_harness: Path, capsys: pytest.CaptureFixture
) -> None:
    """`avr run` on a real (test-harness) Prefect API: the cheap ingest flow, then `avr show`."""
    root = str(tmp_path / "store")
    code = cli.main(
        ["run", "ingest-prompts", "--config", str(cli.TINY_CONFIG), "--set", f"storage_root={root}",
         "--set", "run_name=cli-run", "--set", "max_prompts=3", "--set", "shard_size=2"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert f"outputs: file://{root}/runs/cli-run" in out
    assert "inputs/prompts: complete, rows=3, shards=2" in out
    assert cli.main(["show", "cli-run", "inputs/prompts", "--root", root, "--rows", "1"]) == 0
    assert "PromptRecord" in capsys.readouterr().out
