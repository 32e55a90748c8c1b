"""The flows the factory deploys, and deployments/prefect.yaml rendered from the config files.

`FLOWS` is the one list of deployable flows: its Prefect name, the flow object, its parameter
model, its entrypoint and the work pool of its paper deployment. A new flow is one more entry;
`avr run NAME` and `avr render-deployments` both read this list.

Every flow gets a `tiny` deployment (deployments/configs/tiny.yaml, cpu pool) and a `paper`
deployment (deployments/configs/paper.yaml, the entry's pool); regenerate's paper deployment is
the scheduled `nightly` one. Each deployment's parameters are the config sections its model has,
validated before the file is written.

The `step-slice` flow (flows/slices.py) is not in `FLOWS`: nobody runs it by hand or from a
config, a scaled-out step launches it once per slice. It is deployed once per pool,
`step-slice/cpu` and `step-slice/gpu` (`SLICE_DEPLOYMENTS`), with no default parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow
from pydantic import BaseModel

from avr_core.devices import gpus_for, models_in
from avr_core.layout import RunLayout
from avr_core.steps import Stage1Steps
from flows.avr import avr
from flows.config_files import (
    PAPER_CONFIG,
    PROJECT_DIR,
    TINY_CONFIG,
    ConfigError,
    build_params,
    load_config,
    sections_for,
    validate_config,
)
from flows.evaluate import evaluate
from flows.params import (
    AvrParams,
    BuildLCPairsParams,
    BuildPairsParams,
    EvaluateParams,
    GenerateTreesParams,
    GreedySearchParams,
    IngestParams,
    RefineParams,
    RegenerateParams,
    SampleLongResponsesParams,
    ScoreLongResponsesParams,
    ScoreTreesParams,
    SelectRSFTParams,
    SelectTrajectoriesParams,
    Stage1Params,
    Stage2Params,
    ThinkParams,
    TrainDPOParams,
    TrainSFTParams,
)
from flows.regenerate import regenerate
from flows.stage1 import stage1
from flows.stage2 import stage2
from flows.steps import (
    build_lc_pairs_flow,
    build_pairs_flow,
    generate_trees_flow,
    greedy_search_flow,
    ingest_prompts_flow,
    sample_long_responses_flow,
    score_long_responses_flow,
    score_trees_flow,
    select_rsft_flow,
    select_trajectories_flow,
    train_dpo_flow,
    train_sft_flow,
)
from flows.testtime import refine, think
from tasks.slices import GPU_COUNT_VARIABLE

__all__ = [
    "CONFIG_FILES",
    "CPU_POOL",
    "FLOWS",
    "GPU_POOL",
    "NIGHTLY_CRON",
    "NIGHTLY_TIMEZONE",
    "PARAM_NAME",
    "PREFECT_YAML",
    "SLICE_DEPLOYMENTS",
    "SLICE_ENTRYPOINT",
    "FlowEntry",
    "check_config_file",
    "get_flow",
    "render_deployments",
    "render_prefect_yaml",
]

PREFECT_YAML = PROJECT_DIR / "deployments" / "prefect.yaml"
CONFIG_FILES = (TINY_CONFIG, PAPER_CONFIG)

CPU_POOL = "cpu"
GPU_POOL = "gpu"
# The flow every slice of a scaled-out step runs, deployed on each pool as step-slice/{pool}.
SLICE_ENTRYPOINT = "flows/slices.py:step_slice"
SLICE_DEPLOYMENTS = (CPU_POOL, GPU_POOL)
NIGHTLY_CRON = "0 2 * * *"
NIGHTLY_TIMEZONE = "UTC"
# Every factory flow takes its parameters as one pydantic model named `params` (the UI form).
PARAM_NAME = "params"


@dataclass(frozen=True)
class FlowEntry:
    """A flow the factory deploys and `avr run` runs."""

    name: str  # the Prefect flow name: `avr run NAME`, deployments NAME/tiny, NAME/paper
    flow: Flow[..., Any]
    params_model: type[BaseModel]
    entrypoint: str  # path/to/file.py:function, relative to the project directory
    pool: str  # work pool of the paper deployment (tiny deployments all run on cpu)
    paper_name: str = "paper"
    cron: str | None = None  # a schedule for the paper deployment
    # What the paper deployment changes in its parameters from paper.yaml's sections.
    paper_params: Callable[[dict[str, Any]], dict[str, Any]] | None = None


def _stage1_model_as_policy(params: dict[str, Any]) -> dict[str, Any]:
    """`stage2`'s paper parameters: its policy is the Stage I DPO model of the config's own run
    (where `stage1/paper` writes it), not the seed model the config names for Stage I."""
    root, run = params["storage_root"].rstrip("/"), params["run_name"]
    final = RunLayout(run).final_model(Stage1Steps.TRAIN_DPO.step)
    return {**params, "policy": {**params["policy"], "path": f"{root}/{final}"}}


FLOWS: tuple[FlowEntry, ...] = (
    FlowEntry("stage1", stage1, Stage1Params, "flows/stage1.py:stage1", GPU_POOL),
    FlowEntry(
        "ingest-prompts",
        ingest_prompts_flow,
        IngestParams,
        "flows/steps.py:ingest_prompts_flow",
        CPU_POOL,
    ),
    FlowEntry(
        "generate-trees",
        generate_trees_flow,
        GenerateTreesParams,
        "flows/steps.py:generate_trees_flow",
        GPU_POOL,
    ),
    FlowEntry(
        "score-trees",
        score_trees_flow,
        ScoreTreesParams,
        "flows/steps.py:score_trees_flow",
        GPU_POOL,
    ),
    FlowEntry(
        "select-rsft",
        select_rsft_flow,
        SelectRSFTParams,
        "flows/steps.py:select_rsft_flow",
        CPU_POOL,
    ),
    FlowEntry(
        "build-pairs",
        build_pairs_flow,
        BuildPairsParams,
        "flows/steps.py:build_pairs_flow",
        CPU_POOL,
    ),
    FlowEntry(
        "train-sft", train_sft_flow, TrainSFTParams, "flows/steps.py:train_sft_flow", GPU_POOL
    ),
    FlowEntry(
        "train-dpo", train_dpo_flow, TrainDPOParams, "flows/steps.py:train_dpo_flow", GPU_POOL
    ),
    FlowEntry(
        "stage2",
        stage2,
        Stage2Params,
        "flows/stage2.py:stage2",
        GPU_POOL,
        paper_params=_stage1_model_as_policy,
    ),
    FlowEntry("avr", avr, AvrParams, "flows/avr.py:avr", GPU_POOL),
    FlowEntry(
        "greedy-search",
        greedy_search_flow,
        GreedySearchParams,
        "flows/steps.py:greedy_search_flow",
        GPU_POOL,
    ),
    FlowEntry(
        "select-trajectories",
        select_trajectories_flow,
        SelectTrajectoriesParams,
        "flows/steps.py:select_trajectories_flow",
        CPU_POOL,
    ),
    FlowEntry(
        "sample-long-responses",
        sample_long_responses_flow,
        SampleLongResponsesParams,
        "flows/steps.py:sample_long_responses_flow",
        GPU_POOL,
    ),
    FlowEntry(
        "score-long-responses",
        score_long_responses_flow,
        ScoreLongResponsesParams,
        "flows/steps.py:score_long_responses_flow",
        GPU_POOL,
    ),
    FlowEntry(
        "build-lc-pairs",
        build_lc_pairs_flow,
        BuildLCPairsParams,
        "flows/steps.py:build_lc_pairs_flow",
        CPU_POOL,
    ),
    FlowEntry("refine", refine, RefineParams, "flows/testtime.py:refine", GPU_POOL),
    FlowEntry("think", think, ThinkParams, "flows/testtime.py:think", GPU_POOL),
    FlowEntry("evaluate", evaluate, EvaluateParams, "flows/evaluate.py:evaluate", GPU_POOL),
    FlowEntry(
        "regenerate",
        regenerate,
        RegenerateParams,
        "flows/regenerate.py:regenerate",
        GPU_POOL,
        paper_name="nightly",
        cron=NIGHTLY_CRON,
    ),
)


def get_flow(name: str) -> FlowEntry:
    """The flow called `name`, or an error listing the known ones."""
    for entry in FLOWS:
        if entry.name == name:
            return entry
    known = ", ".join(entry.name for entry in FLOWS)
    raise ConfigError(f"unknown flow {name!r}; known flows: {known}")


def check_config_file(path: Path) -> dict[str, Any]:
    """Load a config file and validate it for every flow (a key no flow has fails)."""
    config = load_config(path)
    validate_config(config, [entry.params_model for entry in FLOWS], source=str(path))
    return config


# ---- deployments/prefect.yaml --------------------------------------------------------------------

_HEADER = """\
# GENERATED by `avr render-deployments` from deployments/configs/*.yaml: do not edit by hand.
# Edit the config files, then run `avr render-deployments` (tests/test_deployments.py fails when
# this file is out of date). Deploy from the project root:
#   prefect deploy --prefect-file deployments/prefect.yaml --all
# Entrypoints are relative to the project root; workers set it with $AVR_PROJECT_DIR (the Docker
# image sets /app). Work pools `cpu` and `gpu`: see docs/operations.md.
"""


def _deployment(
    entry: FlowEntry,
    name: str,
    config_file: Path,
    config: dict[str, Any],
    pool: str,
    adjust: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One deployment: the flow, its sections of a config file as parameters (`adjust`ed), its
    work pool."""
    params = sections_for(config, entry.params_model)
    if adjust is not None:
        params = adjust(params)
    # Built here so a wrong config fails now, not in the UI.
    built = build_params(entry.params_model, params)
    source = config_file.relative_to(PROJECT_DIR).as_posix()
    # A flow run on the gpu pool asks for the GPUs its largest engine takes (the paper's reward
    # model: tensor_parallel_size 2): the Kubernetes template's gpu_count; other pool types
    # ignore the variable.
    job_variables = (
        {GPU_COUNT_VARIABLE: max(1, gpus_for(models_in(built)))} if pool == GPU_POOL else {}
    )
    return {
        "name": name,
        "entrypoint": entry.entrypoint,
        "description": f"{entry.name} with the defaults of {source}",
        "tags": ["avr", name],
        "parameters": {PARAM_NAME: params},
        "work_pool": {"name": pool, "work_queue_name": "default", "job_variables": job_variables},
        "enforce_parameter_schema": True,
    }


def _slice_deployment(pool: str) -> dict[str, Any]:
    """step-slice/{pool}: the slices of scaled-out steps run here; the parent passes every
    parameter (task, its parameters, shards), so there are no defaults."""
    return {
        "name": pool,
        "entrypoint": SLICE_ENTRYPOINT,
        "description": f"one slice of a scaled-out step (execution.workers > 1) on the {pool} pool",
        "tags": ["avr", "step-slice"],
        "parameters": {},
        "work_pool": {"name": pool, "work_queue_name": "default", "job_variables": {}},
        "enforce_parameter_schema": True,
    }


def render_prefect_yaml() -> str:
    """prefect.yaml text: a tiny (cpu) and a paper deployment of every flow, the schedule, and
    the step-slice deployments."""
    tiny, paper = check_config_file(TINY_CONFIG), check_config_file(PAPER_CONFIG)
    deployments = []
    for entry in FLOWS:
        deployments.append(_deployment(entry, "tiny", TINY_CONFIG, tiny, CPU_POOL))
        deployment = _deployment(
            entry, entry.paper_name, PAPER_CONFIG, paper, entry.pool, entry.paper_params
        )
        if entry.cron is not None:
            deployment["schedules"] = [
                {"cron": entry.cron, "timezone": NIGHTLY_TIMEZONE, "active": True}
            ]
        deployments.append(deployment)
    deployments += [_slice_deployment(pool) for pool in SLICE_DEPLOYMENTS]
    document = {
        "name": "avr-factory",
        "prefect-version": "3.8.8",
        "build": None,
        "push": None,
        # Runs at flow-run start on the worker, where the code is: a checkout or the image.
        "pull": [
            {
                "prefect.deployments.steps.set_working_directory": {
                    "directory": "{{ $AVR_PROJECT_DIR }}"
                }
            }
        ],
        "deployments": deployments,
    }
    return _HEADER + yaml.safe_dump(document, sort_keys=False, width=100)


def render_deployments(check: bool) -> int:
    """Write deployments/prefect.yaml, or with `check` fail if it differs from the configs."""
    text = render_prefect_yaml()
    current = PREFECT_YAML.read_text() if PREFECT_YAML.exists() else ""
    if check:
        if current != text:
            raise ConfigError(
                f"{PREFECT_YAML} is out of date with deployments/configs: "
                "run `avr render-deployments`"
            )
        print(f"{PREFECT_YAML} is up to date")
        return 0
    PREFECT_YAML.write_text(text)
    count = len(FLOWS) * 2 + len(SLICE_DEPLOYMENTS)
    print(f"wrote {PREFECT_YAML} ({count} deployments)")
    return 0
