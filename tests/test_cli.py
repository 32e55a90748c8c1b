"""The `avr` command: config files, `--set` overrides read against the field types, their errors,
and reading runs back from a store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from avr_core.config import OpenAIModel, TransformersModel
from avr_core.layout import RunLayout, StepRef
from avr_core.reporting import format_run_summary
from avr_core.results import RunSummary, StepResult
from avr_core.schemas import Message, PromptRecord
from avr_core.settings import AvrSettings
from avr_core.storage import DatasetStore
from flows import cli, inspect_runs
from flows.config_files import (
    TINY_CONFIG,
    ConfigError,
    apply_overrides,
    build_params,
    check_keys,
    check_models,
    load_config,
    sections_for,
)
from flows.local_prefect import free_port
from flows.params import (
    GenerateTreesParams,
    IngestParams,
    RegenerateParams,
    ScoreTreesParams,
    Stage1Params,
    TrainDPOParams,
    TrainSFTParams,
)
from tasks.runlog import record_run_start

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = StepRef("inputs", "prompts")


# ---- --set: values read against the field's type --------------------------------------------


def test_scalar_values_are_read_by_their_field_type() -> None:
    params = build_params(RegenerateParams, {}, ["version=20261120", "templates_dir=a=b"])
    assert params.version == "20261120", "a str field keeps the digits as a string"
    assert params.templates_dir == "a=b", "the value is everything after the first '='"
    params = build_params(
        GenerateTreesParams,
        {},
        ["tree.sampling.max_tokens=64", "tree.require_rating=true", "tree.sampling.top_p=0.5"],
    )
    assert params.tree.sampling.max_tokens == 64 and params.tree.require_rating is True
    assert params.tree.sampling.top_p == 0.5


def test_null_is_none_where_the_field_allows_it() -> None:
    config = {"ingest": {"max_prompts": 3}}
    params = build_params(Stage1Params, config, ["ingest.max_prompts=null", "templates_dir=null"])
    assert params.ingest.max_prompts is None and params.templates_dir is None
    with pytest.raises(ConfigError, match=r"tree\.x: Input should be a valid integer"):
        build_params(GenerateTreesParams, {}, ["tree.x=null"])


def test_sections_lists_and_free_form_values_are_yaml() -> None:
    params = build_params(
        Stage1Params,
        {},
        ["policy={backend: vllm, path: m}", "dpo.loss_type=[sigmoid, sft]",
         "sft.extra.warmup_steps=0.1"],
    )  # fmt: skip
    assert params.policy.backend == "vllm" and params.policy.path == "m"
    assert params.dpo.loss_type == ["sigmoid", "sft"]
    assert params.sft.extra == {"warmup_steps": 0.1}, "free-form values keep their YAML type"
    params = build_params(GenerateTreesParams, {}, ["source=[inputs, today]"])
    assert tuple(params.source) == ("inputs", "today")


def test_overrides_merge_into_sections_without_touching_the_config() -> None:
    config = {"tree": {"x": 1, "sampling": {"temperature": 0.3, "max_tokens": 128}}}
    params = build_params(GenerateTreesParams, config, ["tree.sampling.max_tokens=16"])
    assert params.tree.sampling.max_tokens == 16 and params.tree.sampling.temperature == 0.3
    assert params.tree.x == 1
    assert config["tree"]["sampling"]["max_tokens"] == 128, "the loaded config is not mutated"


def test_a_missing_section_starts_from_the_flows_default() -> None:
    # Stage I's SFT default is its own (not TrainingConfig's): one key changes, the rest stay.
    default = Stage1Params().sft
    params = build_params(Stage1Params, {}, ["sft.max_steps=3"])
    assert params.sft.max_steps == 3 and params.sft.learning_rate == default.learning_rate
    # The default policy's backend selects the union member a nested key belongs to.
    params = build_params(GenerateTreesParams, {}, ["policy.dtype=float32"])
    assert isinstance(params.policy, TransformersModel) and params.policy.dtype == "float32"


def test_nested_keys_of_a_union_member_follow_its_backend() -> None:
    config = {"policy": {"backend": "openai", "path": "served"}}
    params = build_params(GenerateTreesParams, config, ["policy.base_url=http://h:8000/v1"])
    assert isinstance(params.policy, OpenAIModel)
    assert params.policy.base_url == "http://h:8000/v1"
    params = build_params(
        GenerateTreesParams,
        {},
        ["policy.backend=openai", "policy.path=m", "policy.base_url=http://h/v1"],
    )
    assert isinstance(params.policy, OpenAIModel)
    with pytest.raises(ConfigError, match=r"policy\.base_url: Field required for policy with"):
        build_params(GenerateTreesParams, config)
    with pytest.raises(ConfigError, match=r"reward\.path: unknown key for reward with backend"):
        build_params(ScoreTreesParams, {"reward": {"backend": "rules"}}, ["reward.path=x"])


@pytest.mark.parametrize("bad", ["tree.sampling.max_tokens", "=3", "a..b=1", ".x=1"])
def test_malformed_override_is_rejected(bad: str) -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, [bad], GenerateTreesParams)


def test_unknown_key_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError) as err:
        build_params(GenerateTreesParams, {}, ["tree.sampling.max_tokenz=3"])
    message = str(err.value)
    assert "--set tree.sampling.max_tokenz" in message and "max_tokens" in message
    with pytest.raises(ConfigError, match="has no field 'polcy'"):
        build_params(GenerateTreesParams, {}, ["polcy.path=x"])
    with pytest.raises(ConfigError, match=r"tree\.x is not a section"):
        build_params(GenerateTreesParams, {}, ["tree.x.y=1"])
    with pytest.raises(ConfigError, match="has no field 'reward'"):
        build_params(GenerateTreesParams, {}, ["reward.backend=rules"])


def test_wrong_type_names_the_key_and_the_value() -> None:
    with pytest.raises(ConfigError) as err:
        build_params(GenerateTreesParams, {}, ["tree.sampling.max_tokens=lots", "tree.x=0"])
    message = str(err.value)
    assert "tree.sampling.max_tokens: Input should be a valid integer" in message
    assert "'lots'" in message
    assert "tree.x: Input should be greater than or equal to 1" in message
    with pytest.raises(ConfigError, match=r"dpo\.loss_type\.1: Input should be 'sigmoid'"):
        build_params(TrainDPOParams, {}, ["dpo.loss_type=[sigmoid, nope]"])
    with pytest.raises(ConfigError, match=r"--set policy: value .* is not valid YAML"):
        build_params(GenerateTreesParams, {}, ["policy={backend: [vllm"])


# ---- config files --------------------------------------------------------------------------


def test_a_flow_takes_its_sections_of_a_config() -> None:
    config = load_config(TINY_CONFIG)
    part = sections_for(config, GenerateTreesParams)
    assert set(part) == set(config) & set(GenerateTreesParams.model_fields)
    assert "reward" not in part and "sft" not in part and part["tree"] == config["tree"]
    params = build_params(TrainSFTParams, config)
    assert params.sft.max_steps == config["sft"]["max_steps"]
    assert params.execution.device == config["execution"]["device"]


def test_unknown_keys_in_a_config_file_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no flow has the key\(s\) 'stage2'"):
        check_keys({"run_name": "r", "stage2": {}}, [Stage1Params, RegenerateParams])
    config = {"tree": {"sampling": {"temprature": 0.5}}}
    with pytest.raises(ConfigError, match=r"tree\.sampling\.temprature: unknown key"):
        build_params(Stage1Params, config)
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)
    path.write_text("tree: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_run_command_reports_bad_config_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = cli.main(
        ["run", "stage1", "--config", str(TINY_CONFIG), "--set", "tree.sampling.top_p=2"]
    )
    assert code == 2
    assert "tree.sampling.top_p: Input should be less than or equal to 1" in capsys.readouterr().err
    flat = tmp_path / "flat.yaml"
    flat.write_text("run_name: r\nshard_size: 8\n")  # the old flat layout
    assert cli.main(["run", "ingest-prompts", "--config", str(flat)]) == 2
    assert "no flow has the key(s) 'shard_size'" in capsys.readouterr().err
    assert cli.main(["run", "no-such-flow"]) == 2
    assert "known flows: stage1, ingest-prompts" in capsys.readouterr().err


def test_missing_local_model_fails_before_the_run(tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"
    params = GenerateTreesParams(policy={"backend": "transformers", "path": str(missing)})
    with pytest.raises(ConfigError, match=r"policy\.path: model .*no-model-here.* not found"):
        check_models(params)
    with pytest.raises(ConfigError, match=r"base_model: model .*no-model-here.* not found"):
        check_models(TrainDPOParams(base_model=str(missing)))
    check_models(GenerateTreesParams())  # the bundled tiny model is there
    check_models(TrainDPOParams())  # None: this run's SFT model, found at run time


def test_hub_model_absent_offline_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = GenerateTreesParams(policy={"backend": "vllm", "path": "nobody/no-such-model"})
    with pytest.raises(ConfigError, match="not in the local cache"):
        check_models(params)


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
    store.seal("run-a", PROMPTS, PromptRecord, "fp1", range(2))
    # A step that was interrupted: one shard, no manifest.
    store.write_shard("run-a", "stage1", "seed_trees", 0, [_prompt(9)], PromptRecord, "fp2")
    # The run record as flows write it (the same writer, so `avr runs` reads what runs leave).
    record_run_start(store, "run-a", "stage1", IngestParams(run_name="run-a"))
    store.write_shard("run-b", "inputs", "prompts", 0, [_prompt(5)], PromptRecord, "fp3")
    store.seal("run-b", PROMPTS, PromptRecord, "fp3", range(1))
    return store


def test_summarize_run_reports_complete_and_partial(populated_store: DatasetStore) -> None:
    overview = inspect_runs.summarize_run(populated_store, "run-a")
    assert overview.status == "incomplete" and overview.flow == "stage1"
    assert overview.code_version is not None and "git_commit" in overview.code_version
    assert overview.config["run_name"] == "run-a"
    steps = {f"{s.stage}/{s.step}": s for s in overview.steps}
    assert steps["inputs/prompts"].status == "complete"
    assert steps["inputs/prompts"].rows == 4 and steps["inputs/prompts"].shards == 2
    assert steps["stage1/seed_trees"].status == "partial"
    assert inspect_runs.summarize_run(populated_store, "run-b").status == "complete"


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
    shown = inspect_runs.show_step(populated_store, "run-a", "prompts", rows=1, width=50)
    assert shown.manifest["total_rows"] == 4 and shown.manifest["record_type"] == "PromptRecord"
    assert "prompt_id: string" in shown.schema_text
    assert len(shown.sample) == 1 and shown.sample[0]["prompt_id"] == "p0"
    assert "chars]" in shown.sample[0]["messages"][0]["content"], "long strings are cut"

    assert cli.main(["show", "run-a", "inputs/prompts", "--root", populated_store.root]) == 0
    out = capsys.readouterr().out
    assert "PromptRecord" in out and "fp1" in out and "haiku" in out
    assert cli.main(["show", "run-a", "--root", populated_store.root]) == 0
    out = capsys.readouterr().out
    assert "stage1/seed_trees: partial" in out and '"run_name": "run-a"' in out


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
    port = free_port()  # nothing listens there
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
    monkeypatch.setenv("AVR_STORAGE_OPTIONS", "[1, 2]")
    assert cli.main(["runs", "--root", "s3://avr-nowhere/prefix"]) == 2
    assert "AVR_STORAGE_OPTIONS must be a JSON object" in capsys.readouterr().err


def test_outputs_are_printed_by_the_type_of_the_result(
    populated_store: DatasetStore, capsys: pytest.CaptureFixture
) -> None:
    step = StepResult(
        stage="inputs", step="prompts", uri=populated_store.uri("runs/run-a/inputs/prompts"),
        fingerprint="fp1", rows=4, shards=2, shards_computed=2, shards_skipped=0,
        counts={"prompts_in": 4},
    )  # fmt: skip
    summary = RunSummary(
        flow="stage1", run="run-a", storage_root=populated_store.root,
        run_record_uri=populated_store.uri(RunLayout("run-a").run_record), steps=[step],
    )  # fmt: skip
    params = Stage1Params(run_name="run-a", storage_root=populated_store.root)
    inspect_runs.print_outputs(params, summary, AvrSettings())
    out = capsys.readouterr().out
    assert out.strip() == format_run_summary(summary)
    inspect_runs.print_outputs(params, step, AvrSettings())
    out = capsys.readouterr().out
    assert "inputs/prompts: 4 rows in 2 shards" in out
    assert "stage1/seed_trees: partial, rows=-, shards=1" in out, "and the run's step table"


def test_cli_sets_prefect_and_progress_env_before_they_are_imported() -> None:
    """`avr` without a terminal: Prefect sees analytics off (the ephemeral server of `avr demo`
    inherits it; its telemetry hit SQLite locks), progress bars are off for hub downloads and
    model loading here and in the trainer child, which inherits the environment."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_SERVER_ANALYTICS", "TQDM_", "HF_HUB_DISABLE_PROGRESS"))
    }
    script = (
        "import flows.cli, os, huggingface_hub.constants as hub\n"
        "from prefect.settings import get_current_settings\n"
        "print(get_current_settings().server.analytics_enabled, os.environ['TQDM_DISABLE'],"
        " hub.HF_HUB_DISABLE_PROGRESS_BARS)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "1", "True"]


@pytest.mark.slow
def test_run_command_runs_a_flow_in_process(
    tmp_path: Path, prefect_harness: Path, capsys: pytest.CaptureFixture
) -> None:
    """`avr run` on a real (test-harness) Prefect API: the cheap ingest flow, then `avr show`."""
    root = str(tmp_path / "store")
    code = cli.main(
        ["run", "ingest-prompts", "--config", str(TINY_CONFIG), "--set", f"storage_root={root}",
         "--set", "run_name=cli-run", "--set", "ingest.max_prompts=3",
         "--set", "ingest.shard_size=2"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert f"outputs: file://{root}/runs/cli-run" in out
    assert "inputs/prompts: complete, rows=3, shards=2" in out
    assert cli.main(["show", "cli-run", "inputs/prompts", "--root", root, "--rows", "1"]) == 0
    assert "PromptRecord" in capsys.readouterr().out
    assert inspect_runs.open_store(root, AvrSettings()).list_runs() == ["cli-run"]
