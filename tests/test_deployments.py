"""deployments/prefect.yaml: up to date with the configs, every entrypoint loads, every deployment's
parameters pass its flow's validation, the nightly schedule parses; the job templates render."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.templating import apply_values, find_placeholders

from flows import cli

ROOT = Path(__file__).resolve().parents[1]
JOB_TEMPLATES = ROOT / "deployments" / "job_templates"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return yaml.safe_load(cli.PREFECT_YAML.read_text())


def test_prefect_yaml_is_rendered_from_the_configs() -> None:
    assert cli.PREFECT_YAML.read_text() == cli.render_prefect_yaml(), (
        "deployments/prefect.yaml is stale: run `avr render-deployments`"
    )
    assert cli.main(["render-deployments", "--check"]) == 0


def test_prefect_accepts_the_file(document: dict[str, Any]) -> None:
    model = PrefectYamlModel.model_validate(document)  # what `prefect deploy` validates
    assert len(model.deployments) == len(document["deployments"])
    (pull,) = document["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == (
        "{{ $AVR_PROJECT_DIR }}"
    )


def test_every_flow_has_tiny_and_paper_deployments(document: dict[str, Any]) -> None:
    flows = cli.discover_flows()
    assert {"stage1", "regenerate", "generate-trees", "score-trees"} <= set(flows)
    by_entrypoint: dict[str, set[str]] = {}
    for deployment in document["deployments"]:
        by_entrypoint.setdefault(deployment["entrypoint"], set()).add(deployment["name"])
    for entry in flows.values():
        expected = {"tiny", "nightly" if entry.name == "regenerate" else "paper"}
        assert by_entrypoint.get(entry.entrypoint) == expected, entry.name


@pytest.mark.parametrize(
    "index", range(len(yaml.safe_load(cli.PREFECT_YAML.read_text())["deployments"]))
)
def test_deployment_loads_and_its_parameters_validate(
    document: dict[str, Any], index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = document["deployments"][index]
    monkeypatch.chdir(ROOT)  # entrypoints are relative to the project root, as on workers
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    # Prefect's own check of a run's parameters against the flow signature (pydantic models).
    validated = flow.validate_parameters(deployment["parameters"])
    entry = cli.discover_flows()[flow.name]
    params = validated[entry.param_name]
    # Loaded from its file path, the flow's module is a fresh copy: compare models by name.
    assert type(params).__name__ == entry.params_model.__name__
    pool = deployment["work_pool"]["name"]
    assert pool in (cli.CPU_POOL, cli.GPU_POOL)
    if deployment["name"] == "tiny":
        assert pool == cli.CPU_POOL
        assert "meta-llama" not in json.dumps(deployment["parameters"])
    else:
        assert params.storage_root.startswith("s3://")
    if deployment["name"] != "tiny" and flow.name in (
        "stage1",
        "generate-trees",
        "score-trees",
        "regenerate",
    ):
        assert pool == cli.GPU_POOL, "engines run on the gpu pool"


def test_nightly_schedule(document: dict[str, Any]) -> None:
    (nightly,) = [d for d in document["deployments"] if d["name"] == "nightly"]
    assert nightly["entrypoint"] == "flows/regenerate.py:regenerate"
    (schedule,) = nightly["schedules"]
    assert schedule["timezone"] and schedule["active"] is True
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert cron.timezone == "UTC"
    other = [d for d in document["deployments"] if d["name"] != "nightly"]
    assert not any(d.get("schedules") for d in other), "only the nightly run is scheduled"


def test_paper_config_mirrors_the_paper() -> None:
    paper = cli.load_config(cli.PAPER_CONFIG)
    assert paper["policy"] == {
        "backend": "vllm",
        "path": "meta-llama/Meta-Llama-3-8B-Instruct",
        "dtype": "bfloat16",
    }
    assert paper["reward"]["backend"] == "vllm" and "27B" in paper["reward"]["path"]
    assert (paper["x"], paper["y"]) == (2, 2)
    assert (paper["sampling"]["temperature"], paper["sampling"]["top_p"]) == (0.7, 0.8)
    assert paper["require_rating"] is True and paper["max_format_retries"] == 5
    selection = paper["selection"]
    assert (
        selection["degenerate_repeat_threshold"],
        selection["rsft_max_extra_chars"],
        selection["rsft_max_length_ratio"],
    ) == (60, 400, 1.2)
    assert paper["stage2"]["max_rounds"] == 5


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
