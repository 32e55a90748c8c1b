"""FLOWS and deployments/prefect.yaml: every config file validates for every flow, the yaml is up
to date, every entrypoint loads the flow FLOWS names, every deployment's parameters pass its flow's
validation, engine-holding flows run on the gpu pool, the nightly schedule parses; the job
templates render."""

from __future__ import annotations

import inspect
import json
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.templating import apply_values, find_placeholders

from avr_core.config import TrainingConfig
from flows import deployments
from flows.config_files import ConfigError, build_params, load_config, sections_for
from flows.deployments import (
    CONFIG_FILES,
    CPU_POOL,
    FLOWS,
    GPU_POOL,
    PARAM_NAME,
    PREFECT_YAML,
    SLICE_DEPLOYMENTS,
    SLICE_ENTRYPOINT,
    check_config_file,
    get_flow,
    render_prefect_yaml,
)

ROOT = Path(__file__).resolve().parents[1]
JOB_TEMPLATES = ROOT / "deployments" / "job_templates"
DEPLOYMENTS = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
# The flows of FLOWS; step-slice (launched by scaled-out steps, never by hand) is checked apart.
FLOW_DEPLOYMENTS = [d for d in DEPLOYMENTS if d["entrypoint"] != SLICE_ENTRYPOINT]


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _holds_engine_or_trains(model: type) -> bool:
    """A flow that loads a policy or reward model, or trains one, needs a GPU in the paper setup."""
    fields = model.model_fields
    return (
        "policy" in fields
        or "reward" in fields
        or any(f.annotation is TrainingConfig for f in fields.values())
    )


# ---- FLOWS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", FLOWS, ids=lambda e: e.name)
def test_entry_describes_its_flow(entry: deployments.FlowEntry) -> None:
    assert entry.flow.name == entry.name
    (parameter,) = inspect.signature(entry.flow.fn).parameters.values()
    assert parameter.name == PARAM_NAME
    annotation = typing.get_type_hints(entry.flow.fn)[PARAM_NAME]
    assert entry.params_model in (annotation, *typing.get_args(annotation))
    assert get_flow(entry.name) is entry


def test_flow_names_are_unique_and_unknown_names_list_the_known() -> None:
    names = [entry.name for entry in FLOWS]
    assert len(set(names)) == len(names)
    with pytest.raises(ConfigError, match="known flows: stage1, ingest-prompts"):
        get_flow("stage3")


# ---- config files -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("entry", FLOWS, ids=lambda e: e.name)
def test_every_config_validates_for_every_flow(path: Path, entry: deployments.FlowEntry) -> None:
    params = build_params(entry.params_model, load_config(path))
    assert params.run_name == load_config(path)["run_name"]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_key_of_a_config_is_taken_by_some_flow(path: Path) -> None:
    config = check_config_file(path)
    taken = {key for entry in FLOWS for key in sections_for(config, entry.params_model)}
    assert taken == set(config)


def test_a_key_no_flow_has_fails_naming_it(tmp_path: Path) -> None:
    config = load_config(CONFIG_FILES[1])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**config, "stage2": {"max_rounds": 5}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: no flow has the key\(s\) 'stage2'"):
        check_config_file(bad)
    bad.write_text(yaml.safe_dump({**config, "tree": {**config["tree"], "z": 3}}))
    with pytest.raises(ConfigError, match=r"tree\.z: unknown key"):
        check_config_file(bad)


# ---- prefect.yaml -----------------------------------------------------------------------------


def test_prefect_yaml_is_rendered_from_the_configs() -> None:
    assert PREFECT_YAML.read_text() == render_prefect_yaml(), (
        "deployments/prefect.yaml is stale: run `avr render-deployments`"
    )
    assert deployments.render_deployments(check=True) == 0


def test_prefect_accepts_the_file(document: dict[str, Any]) -> None:
    model = PrefectYamlModel.model_validate(document)  # what `prefect deploy` validates
    assert len(model.deployments) == len(document["deployments"])
    (pull,) = document["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == (
        "{{ $AVR_PROJECT_DIR }}"
    )


def test_every_flow_has_a_tiny_and_a_paper_deployment(document: dict[str, Any]) -> None:
    by_entrypoint: dict[str, set[str]] = {}
    for deployment in document["deployments"]:
        by_entrypoint.setdefault(deployment["entrypoint"], set()).add(deployment["name"])
    assert set(by_entrypoint) == {entry.entrypoint for entry in FLOWS} | {SLICE_ENTRYPOINT}
    for entry in FLOWS:
        assert by_entrypoint[entry.entrypoint] == {"tiny", entry.paper_name}, entry.name
    assert by_entrypoint[SLICE_ENTRYPOINT] == set(SLICE_DEPLOYMENTS)


def test_slice_deployments_load_on_both_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    """step-slice/cpu and step-slice/gpu: no defaults, the parent passes every parameter."""
    monkeypatch.chdir(ROOT)
    slices = [d for d in DEPLOYMENTS if d["entrypoint"] == SLICE_ENTRYPOINT]
    assert {(d["name"], d["work_pool"]["name"]) for d in slices} == {
        (CPU_POOL, CPU_POOL),
        (GPU_POOL, GPU_POOL),
    }
    flow = load_flow_from_entrypoint(SLICE_ENTRYPOINT)
    assert flow.name == "step-slice"
    assert all(d["parameters"] == {} and d["enforce_parameter_schema"] for d in slices)
    checked = flow.validate_parameters(
        {"task_name": "generate-trees", "parameters": {"io": {}}, "shards": [0, 2]}
    )
    assert checked["shards"] == [0, 2]


@pytest.mark.parametrize(
    "deployment", FLOW_DEPLOYMENTS, ids=lambda d: f"{d['entrypoint'].rsplit(':')[-1]}/{d['name']}"
)
def test_deployment_loads_validates_and_has_its_pool(
    deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # entrypoints are relative to the project root, as on workers
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    entry = get_flow(flow.name)
    assert entry.entrypoint == deployment["entrypoint"]
    # Prefect's own check of a run's parameters against the flow signature (pydantic models).
    params = flow.validate_parameters(deployment["parameters"])[PARAM_NAME]
    # Loaded from its file path, the flow's module is a fresh copy: compare models by name.
    assert type(params).__name__ == entry.params_model.__name__
    pool = deployment["work_pool"]["name"]
    if deployment["name"] == "tiny":
        assert pool == CPU_POOL, "tiny runs anywhere"
        assert "meta-llama" not in json.dumps(deployment["parameters"])
    else:
        expected = GPU_POOL if _holds_engine_or_trains(entry.params_model) else CPU_POOL
        assert pool == expected == entry.pool
        assert params.storage_root.startswith("s3://")
        # A gpu flow run asks for the GPUs of its largest engine: the paper's reward model is
        # split over 2 (tensor_parallel_size), so a flow that loads it gets 2, others 1.
        variables = deployment["work_pool"]["job_variables"]
        if pool == GPU_POOL:
            reward = getattr(params, "reward", None)
            loads_reward = getattr(reward, "tensor_parallel_size", 1) == 2
            assert variables == {"gpu_count": 2 if loads_reward else 1}
        else:
            assert variables == {}


def test_stage2_paper_starts_from_the_model_stage1_paper_trains(document: dict[str, Any]) -> None:
    by_flow = {
        (d["entrypoint"].rsplit(":")[-1], d["name"]): d["parameters"][PARAM_NAME]
        for d in document["deployments"]
        if PARAM_NAME in d["parameters"]
    }
    stage1, stage2 = by_flow[("stage1", "paper")], by_flow[("stage2", "paper")]
    assert stage2["run_name"] == stage1["run_name"]
    final = f"runs/{stage1['run_name']}/checkpoints/stage1_dpo/final"
    assert stage2["policy"]["path"] == f"{stage1['storage_root']}/{final}"
    assert {k: v for k, v in stage2["policy"].items() if k != "path"} == {
        k: v for k, v in stage1["policy"].items() if k != "path"
    }
    assert by_flow[("stage2", "tiny")]["policy"] == by_flow[("stage1", "tiny")]["policy"]


def test_the_gpu_count_job_variable_reaches_the_kubernetes_pod() -> None:
    """What a paper deployment asks for is what the pod requests."""
    template = json.loads((JOB_TEMPLATES / "gpu-kubernetes.json").read_text())
    defaults = {
        k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v
    }
    rendered = apply_values(template["job_configuration"], {**defaults, "gpu_count": 2})
    container = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_nightly_schedule(document: dict[str, Any]) -> None:
    (nightly,) = [d for d in document["deployments"] if d["name"] == "nightly"]
    assert nightly["entrypoint"] == get_flow("regenerate").entrypoint
    (schedule,) = nightly["schedules"]
    assert schedule["active"] is True
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert cron.timezone == "UTC"
    other = [d for d in document["deployments"] if d["name"] != "nightly"]
    assert not any(d.get("schedules") for d in other), "only the nightly run is scheduled"


@pytest.mark.parametrize("name", ["gpu-kubernetes.json", "gpu-docker.json"])
def test_gpu_job_template_renders_with_its_defaults(name: str) -> None:
    template = json.loads((JOB_TEMPLATES / name).read_text())
    properties = template["variables"]["properties"]
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(properties), f"undeclared variables: {used - set(properties)}"
    defaults = {k: v["default"] for k, v in properties.items() if "default" in v}
    rendered = apply_values(template["job_configuration"], defaults)
    if name == "gpu-kubernetes.json":
        container = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"] == "avr-factory:gpu"
    else:
        (request,) = rendered["container_create_kwargs"]["device_requests"]
        assert request["capabilities"] == [["gpu"]] and request["device_ids"] == ["0"]
        assert rendered["image"] == "avr-factory:gpu"
