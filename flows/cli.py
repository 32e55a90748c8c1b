"""The `avr` command: run flows from config files, inspect stored runs, render deployments, local UI.

    avr demo                                   Stage I end to end with the tiny config (CPU)
    avr run FLOW --config FILE [--set k=v]...  any flow, config file + dotted overrides
    avr runs [--root URI]                      runs in a storage root, per-step status and rows
    avr show RUN [STEP] [--root URI]           run.json, or a step's manifest, schema, sample rows
    avr ui [--port N]                          a local Prefect server + a worker on the cpu pool
    avr render-deployments [--check]           write deployments/prefect.yaml from the configs

Config files (deployments/configs/*.yaml) hold the fields of `flows.params.Stage1Params`; a step
flow takes the keys its own parameter model has. `--set sampling.max_tokens=64` overrides one
field (values are YAML: `--set policy='{backend: vllm, path: x}'`); a key that does not exist or a
value of the wrong type fails before anything runs, naming the key.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

__all__ = [
    "CPU_POOL",
    "ConfigError",
    "FlowEntry",
    "GPU_CONCURRENCY_LIMIT",
    "GPU_POOL",
    "LocalPrefect",
    "apply_overrides",
    "build_params",
    "discover_flows",
    "list_steps",
    "load_config",
    "main",
    "params_for_model",
    "render_prefect_yaml",
    "start_local_prefect",
    "summarize_run",
]

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEPLOYMENTS_DIR = PROJECT_DIR / "deployments"
CONFIGS_DIR = DEPLOYMENTS_DIR / "configs"
PREFECT_YAML = DEPLOYMENTS_DIR / "prefect.yaml"
TINY_CONFIG = CONFIGS_DIR / "tiny.yaml"
PAPER_CONFIG = CONFIGS_DIR / "paper.yaml"

# Modules whose @flow objects get a deployment and an `avr run` name, in display order.
FLOW_MODULES = ("flows.stage1", "flows.steps", "flows.regenerate")

CPU_POOL = "cpu"
GPU_POOL = "gpu"
# Global concurrency limit that engine-holding task sections take a slot of:
#   with prefect.concurrency.sync.concurrency(GPU_CONCURRENCY_LIMIT, occupy=1): ...
# Created with `prefect gcl create gpu --limit <GPUs>`; where it does not exist it is a no-op.
GPU_CONCURRENCY_LIMIT = "gpu"

# Config sections that belong to flows not written yet: kept in the file, dropped before a flow
# whose parameter model lacks them validates it.
FOREIGN_SECTIONS = ("stage2",)

NIGHTLY_CRON = "0 2 * * *"
NIGHTLY_TIMEZONE = "UTC"


class ConfigError(ValueError):
    """A config file, `--set` override or parameter value is wrong; the message names the key."""


# ---- flows and their parameter models ------------------------------------------------------


@dataclass(frozen=True)
class FlowEntry:
    """A flow the factory deploys: its Prefect name, entrypoint and parameter model."""

    name: str
    entrypoint: str  # path/to/file.py:function, relative to the project directory
    flow: Any  # prefect.Flow
    params_model: type[BaseModel]
    param_name: str


def _params_model(flow: Any) -> tuple[str, type[BaseModel]]:
    """The single pydantic parameter every factory flow takes (it renders as the UI form)."""
    names = list(inspect.signature(flow.fn).parameters)
    hints = typing.get_type_hints(flow.fn)
    model = _nested_model(hints.get(names[0])) if len(names) == 1 else None
    if model is None:
        raise TypeError(
            f"flow {flow.name!r} must take exactly one pydantic-model parameter, has {names}"
        )
    return names[0], model


def discover_flows(modules: Sequence[str] = FLOW_MODULES) -> dict[str, FlowEntry]:
    """Every @flow defined in `modules`, keyed by flow name (modules not written yet are skipped)."""
    from prefect import Flow

    entries: dict[str, FlowEntry] = {}
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue
            raise
        relative_file = Path(module.__file__).resolve().relative_to(PROJECT_DIR).as_posix()
        for attr, value in vars(module).items():
            if isinstance(value, Flow) and value.fn.__module__ == module_name:
                param_name, model = _params_model(value)
                entries[value.name] = FlowEntry(
                    value.name, f"{relative_file}:{attr}", value, model, param_name
                )
    return entries


def get_flow(name: str) -> FlowEntry:
    """The flow called `name`, or an error listing the known ones."""
    flows = discover_flows()
    if name not in flows:
        raise ConfigError(f"unknown flow {name!r}; known flows: {', '.join(sorted(flows))}")
    return flows[name]


# ---- config files and overrides -------------------------------------------------------------


def load_config(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: must be a mapping of parameter names, got {type(data).__name__}"
        )
    return data


def params_for_model(config: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """The part of a Stage I config that `model` takes.

    A model with every key of the config (Stage I, regenerate) takes all of it, so a misspelt
    key fails its validation; a step model takes the keys it has (the config file itself is
    checked against Stage I's model by `check_config`).
    """
    fields = model.model_fields
    data = {k: v for k, v in config.items() if not (k in FOREIGN_SECTIONS and k not in fields)}
    if all(k in fields for k in data):
        return copy.deepcopy(data)
    return {k: copy.deepcopy(v) for k, v in data.items() if k in fields}


def _field_names(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds, also through Optional[...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], YAML-parsed value)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. x=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {err}") from err
    return key.split("."), value


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], model: type[BaseModel]
) -> dict[str, Any]:
    """`data` with each `--set` override applied; unknown keys fail naming the key and the options."""
    result = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        current_model: type[BaseModel] | None = model
        target = result
        for depth, part in enumerate(path):
            dotted = ".".join(path[: depth + 1])
            if current_model is not None:
                if part not in current_model.model_fields:
                    where = ".".join(path[:depth]) or current_model.__name__
                    raise ConfigError(
                        f"--set {'.'.join(path)}: {where} has no field {part!r} "
                        f"(fields: {_field_names(current_model)})"
                    )
                annotation = current_model.model_fields[part].annotation
                next_model = _nested_model(annotation)
            else:
                next_model = None  # inside a free-form dict (e.g. training.extra): any key
            if depth == len(path) - 1:
                target[part] = value
                break
            if next_model is None and current_model is not None:
                origin = typing.get_origin(current_model.model_fields[part].annotation)
                if origin is not dict:
                    raise ConfigError(f"--set {'.'.join(path)}: {dotted} is not a section")
            child = target.get(part)
            if not isinstance(child, dict):
                child = {}
                target[part] = child
            target = child
            current_model = next_model
    return result


def _format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem: dotted field path, message, offending value."""
    lines = []
    for problem in err.errors():
        location = ".".join(str(part) for part in problem["loc"]) or "(parameters)"
        value = problem.get("input")
        shown = "" if problem["type"] == "missing" else f" (got {value!r})"
        if problem["type"] == "extra_forbidden":
            lines.append(f"{prefix}{location}: unknown key")
        else:
            lines.append(f"{prefix}{location}: {problem['msg']}{shown}")
    return "\n".join(lines)


def unknown_keys(data: Any, model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of `data` that `model` (recursively) has no field for.

    Some nested models (e.g. Sampling) ignore extra keys; a misspelt key in a config file must
    still fail rather than silently fall back to a default.
    """
    if not isinstance(data, dict):
        return []
    found = []
    for key, value in data.items():
        if key not in model.model_fields:
            found.append(f"{prefix}{key}")
            continue
        nested = _nested_model(model.model_fields[key].annotation)
        if nested is not None:
            found += unknown_keys(value, nested, f"{prefix}{key}.")
    return found


def build_params(
    model: type[BaseModel], config: dict[str, Any], overrides: Sequence[str] = ()
) -> BaseModel:
    """Validate config + overrides into the flow's parameter model, or fail naming each key."""
    data = apply_overrides(params_for_model(config, model), overrides, model)
    unknown = unknown_keys(data, model)
    if unknown:
        lines = "\n".join(f"  {key}: unknown key" for key in unknown)
        raise ConfigError(f"invalid parameters for {model.__name__}:\n{lines}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            f"invalid parameters for {model.__name__}:\n{_format_validation_error(err, '  ')}"
        ) from err


def check_config(path: str | Path) -> dict[str, Any]:
    """Load a config file and validate it against Stage I's model (all its keys must be known)."""
    from flows.params import Stage1Params

    config = load_config(path)
    try:
        build_params(Stage1Params, config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return config


# ---- pre-flight checks -----------------------------------------------------------------------


def check_models(params: BaseModel) -> None:
    """Fail before the run starts if a local model a spec names does not exist."""
    from avr_core.config import ModelSpec
    from avr_core.models import TINY_MODEL, TINY_REWARD_MODEL, ModelNotFoundError, find_tiny_gguf

    for field_name in type(params).model_fields:
        spec = getattr(params, field_name)
        if not isinstance(spec, ModelSpec) or spec.backend not in ("transformers", "vllm"):
            continue
        path = spec.path
        if path in (TINY_MODEL, TINY_REWARD_MODEL):
            try:
                find_tiny_gguf()
            except ModelNotFoundError as err:
                raise ConfigError(f"{field_name}.path: {err}") from err
        elif "://" in path or Path(path).expanduser().is_dir():
            continue  # storage URIs are fetched by the task, with the workers' credentials
        elif path.startswith(("/", ".", "~")) or path.count("/") != 1:
            raise ConfigError(
                f"{field_name}.path: model {path!r} not found: not a local directory, storage "
                f"URI, hub id (org/name) or bundled name ({TINY_MODEL}, {TINY_REWARD_MODEL})"
            )
        elif os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(path):
            raise ConfigError(
                f"{field_name}.path: hub model {path!r} is not in the local cache and "
                "HF_HUB_OFFLINE=1 forbids downloading it"
            )


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a hub model's config.json is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def open_store_or_fail(root: str) -> Any:
    """The DatasetStore at `root` (storage options from $AVR_STORAGE_OPTIONS), readable."""
    from flows.params import resolve_storage_root
    from tasks.common import open_store

    store = open_store(resolve_storage_root(root))
    try:
        store.list_runs()
    except Exception as err:  # any fsspec backend error: no bucket, no endpoint, no credentials
        raise ConfigError(
            f"storage root {store.root!r} is not readable: {type(err).__name__}: {err} "
            "(endpoint and credentials come from AVR_STORAGE_OPTIONS / AWS_* variables)"
        ) from err
    return store


# ---- reading stored runs ------------------------------------------------------------------


@dataclass
class StepStatus:
    """What storage says about one step of a run."""

    stage: str
    step: str
    status: str  # complete | partial | empty
    rows: int | None
    shards: int
    record_type: str | None
    fingerprint: str | None


def list_steps(store: Any, run: str) -> list[StepStatus]:
    """Every {stage}/{step} directory of a run with its manifest status (checkpoints excluded)."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(f"{store.root}/runs/{run}", **store.storage_options)
    fs.invalidate_cache(base)
    statuses = []
    for stage_dir in sorted(fs.ls(base, detail=True), key=lambda e: e["name"]):
        stage = stage_dir["name"].rstrip("/").rsplit("/", 1)[-1]
        if (
            stage_dir["type"] != "directory"
            or stage.startswith(("_", "."))
            or stage == "checkpoints"
        ):
            continue
        for step_dir in sorted(fs.ls(stage_dir["name"], detail=True), key=lambda e: e["name"]):
            step = step_dir["name"].rstrip("/").rsplit("/", 1)[-1]
            if step_dir["type"] != "directory" or step.startswith(("_", ".")):
                continue
            manifest = store.read_manifest(run, stage, step)
            if manifest is not None:
                statuses.append(
                    StepStatus(
                        stage,
                        step,
                        "complete",
                        manifest.total_rows,
                        len(manifest.shards),
                        manifest.record_type,
                        manifest.fingerprint,
                    )
                )
                continue
            shards = [
                name
                for name in fs.ls(step_dir["name"], detail=False)
                if name.rsplit("/", 1)[-1].startswith("part-") and name.endswith(".parquet")
            ]
            status = "partial" if shards else "empty"
            statuses.append(StepStatus(stage, step, status, None, len(shards), None, None))
    return statuses


def summarize_run(store: Any, run: str) -> dict[str, Any]:
    """run.json's flow/start/code version plus the step statuses, for `avr runs`/`avr show`."""
    info = store.read_json(f"runs/{run}/run.json") or {}
    steps = list_steps(store, run)
    if not steps:
        status = "empty"
    elif all(s.status == "complete" for s in steps):
        status = "complete"
    else:
        status = "incomplete"
    return {
        "run": run,
        "flow": info.get("flow"),
        "started_at": info.get("started_at"),
        "code_version": info.get("code_version"),
        "status": status,
        "steps": steps,
    }


def _console() -> Any:
    from rich.console import Console

    return Console()


def print_runs(store: Any) -> int:
    """Table of the runs under a root: one row per step with status and row count."""
    from rich.table import Table

    console = _console()
    runs = store.list_runs()
    if not runs:
        console.print(f"no runs under {store.root}")
        return 0
    table = Table(title=f"runs in {store.root}")
    for column in ("run", "flow", "started", "step", "status", "rows", "shards"):
        table.add_column(column, justify="right" if column in ("rows", "shards") else "left")
    for run in runs:
        summary = summarize_run(store, run)
        steps = summary["steps"] or [None]
        for position, step in enumerate(steps):
            first = position == 0
            table.add_row(
                run if first else "",
                (summary["flow"] or "-") if first else "",
                (summary["started_at"] or "-") if first else "",
                f"{step.stage}/{step.step}" if step else "-",
                step.status if step else "empty",
                "-" if step is None or step.rows is None else str(step.rows),
                str(step.shards) if step else "0",
            )
        table.add_section()
    console.print(table)
    return 0


def _find_step(steps: list[StepStatus], wanted: str, run: str) -> StepStatus:
    """A step by `stage/step` or by a unique `step` name."""
    matches = [s for s in steps if f"{s.stage}/{s.step}" == wanted] or [
        s for s in steps if s.step == wanted
    ]
    if len(matches) != 1:
        known = ", ".join(f"{s.stage}/{s.step}" for s in steps) or "none"
        problem = "is ambiguous" if matches else "does not exist"
        raise ConfigError(f"step {wanted!r} of run {run!r} {problem}; steps: {known}")
    return matches[0]


def _shorten(value: Any, limit: int) -> Any:
    """Long strings cut to `limit` characters, recursively (sample rows stay readable)."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"... [{len(value)} chars]"
    if isinstance(value, list):
        return [_shorten(v, limit) for v in value]
    if isinstance(value, dict):
        return {k: _shorten(v, limit) for k, v in value.items()}
    return value


def show_step(store: Any, run: str, wanted: str, rows: int, width: int) -> dict[str, Any]:
    """A step's manifest, Arrow schema and first `rows` rows (strings cut to `width`)."""
    from avr_core.schemas import RECORD_TYPES

    step = _find_step(list_steps(store, run), wanted, run)
    manifest = store.read_manifest(run, step.stage, step.step)
    if manifest is None:
        raise ConfigError(
            f"{store.step_uri(run, step.stage, step.step)} has no manifest ({step.status}, "
            f"{step.shards} shards): the step has not finished"
        )
    record_type = RECORD_TYPES[manifest.record_type]
    sample: list[dict[str, Any]] = []
    if manifest.shards:
        records = store.read_shard_records(
            run, step.stage, step.step, manifest.shards[0].index, record_type
        )
        sample = [_shorten(r.model_dump(mode="json"), width) for r in records[:rows]]
    return {
        "uri": store.step_uri(run, step.stage, step.step),
        "manifest": manifest.model_dump(mode="json"),
        "schema": str(record_type.arrow_schema),
        "sample": sample,
    }


def print_show(store: Any, run: str, step: str | None, rows: int, width: int) -> int:
    """`avr show`: run summary and steps, or one step's manifest, schema and sample rows."""
    console = _console()
    if run not in store.list_runs():
        raise ConfigError(
            f"no run {run!r} under {store.root}; runs: {', '.join(store.list_runs()) or 'none'}"
        )
    if step is None:
        summary = summarize_run(store, run)
        info = store.read_json(f"runs/{run}/run.json") or {}
        console.print(
            f"[bold]{run}[/] ({summary['status']}) flow={summary['flow']} "
            f"started={summary['started_at']} code={summary['code_version']}"
        )
        console.print_json(json.dumps(info.get("config", {}), default=str))
        for s in summary["steps"]:
            rows_text = "-" if s.rows is None else s.rows
            console.print(
                f"  {s.stage}/{s.step}: {s.status}, rows={rows_text}, shards={s.shards}, "
                f"type={s.record_type or '-'}, fingerprint={s.fingerprint or '-'}"
            )
        return 0
    shown = show_step(store, run, step, rows, width)
    manifest = shown["manifest"]
    console.print(f"[bold]{shown['uri']}[/]")
    console.print(
        f"record type {manifest['record_type']}, schema version {manifest['schema_version']}, "
        f"fingerprint {manifest['fingerprint']}, {manifest['total_rows']} rows in "
        f"{len(manifest['shards'])} shards, sealed {manifest['created_at']}"
    )
    for shard in manifest["shards"]:
        console.print(f"  shard {shard['index']}: {shard['rows']} rows  {shard['path']}")
    console.print("[bold]schema[/]")
    console.print(shown["schema"], markup=False, highlight=False)
    console.print(f"[bold]first {len(shown['sample'])} rows[/]")
    for row in shown["sample"]:
        console.print_json(json.dumps(row, default=str))
    return 0


# ---- running flows ---------------------------------------------------------------------------


def run_flow(name: str, config_path: str | Path | None, overrides: Sequence[str]) -> int:
    """Validate parameters, check models, run the flow in this process, print where outputs are."""
    entry = get_flow(name)
    config = load_config(config_path) if config_path else {}
    params = build_params(entry.params_model, config, overrides)
    check_models(params)
    console = _console()
    console.print(f"running flow [bold]{entry.name}[/] ({entry.entrypoint})")
    result = entry.flow(**{entry.param_name: params})
    _print_outputs(params, result)
    return 0


def _print_outputs(params: BaseModel, result: Any) -> None:
    """Where the run's outputs are and what each step holds."""
    if isinstance(result, dict) and {"steps", "datasets", "checkpoints"} <= set(result):
        from flows.stage1 import print_stage1_summary  # Stage I's own report

        print_stage1_summary(result)
        return
    run = result.get("run") if isinstance(result, dict) else None
    run = run or getattr(params, "run_name", None)
    root = getattr(params, "storage_root", None)
    if run and root:
        store = open_store_or_fail(root)
        print(f"outputs: {store.root}/runs/{run}")
        print_runs_for(store, run)


def print_runs_for(store: Any, run: str) -> None:
    """Print the step table of one run."""
    for s in list_steps(store, run):
        rows_text = "-" if s.rows is None else s.rows
        print(f"  {s.stage}/{s.step}: {s.status}, rows={rows_text}, shards={s.shards}")


def run_demo(root: str | None, overrides: Sequence[str]) -> int:
    """`avr demo`: Stage I on the tiny config, in-process with an ephemeral Prefect API."""
    extra = [f"storage_root={root}"] if root else []
    return run_flow("stage1", TINY_CONFIG, [*extra, *overrides])


# ---- deployments (prefect.yaml) ----------------------------------------------------------------

# Steps light enough for the cpu pool in the paper setup; every other flow needs a GPU.
CPU_STEPS = frozenset({"ingest-prompts", "select-rsft", "build-pairs"})

_HEADER = """\
# GENERATED by `avr render-deployments` from deployments/configs/*.yaml: do not edit by hand.
# Edit the config files, then run `avr render-deployments` (tests/test_deployments.py fails when
# this file is out of date). Deploy from the project root:
#   prefect deploy --prefect-file deployments/prefect.yaml --all
# Entrypoints are relative to the project root; workers set it with $AVR_PROJECT_DIR (the Docker
# image sets /app). Work pools `cpu` and `gpu`: see docs/operations.md.
"""


def _pool_for(flow_name: str) -> str:
    return CPU_POOL if flow_name in CPU_STEPS else GPU_POOL


def _derived_params(flow_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Training-step defaults that follow from a Stage I config (what `stage1` passes them)."""
    from avr_core.training import FINAL_DIR_NAME
    from flows.params import Stage1Steps

    if flow_name == "train-sft":
        return {"base_model": config["policy"]["path"], "training": config["sft"]}
    if flow_name == "train-dpo":
        root, run = config["storage_root"].rstrip("/"), config["run_name"]
        sft_model = f"{root}/runs/{run}/checkpoints/{Stage1Steps.TRAIN_SFT}/{FINAL_DIR_NAME}"
        return {
            "base_model": sft_model,
            "dataset": list(Stage1Steps.PAIRS),
            "train_step": Stage1Steps.TRAIN_DPO,
            "training": config["dpo"],
        }
    return {}


def _deployment(
    entry: FlowEntry, name: str, config_file: Path, config: dict[str, Any], pool: str
) -> dict[str, Any]:
    """One deployment: the flow, its default parameters from a config file, its work pool."""
    params = {**params_for_model(config, entry.params_model), **_derived_params(entry.name, config)}
    build_params(entry.params_model, params)  # fail here, not in the UI, if a config is wrong
    source = config_file.relative_to(PROJECT_DIR).as_posix()
    return {
        "name": name,
        "entrypoint": entry.entrypoint,
        "description": f"{entry.name} with the defaults of {source}",
        "tags": ["avr", name],
        "parameters": {entry.param_name: params},
        "work_pool": {"name": pool, "work_queue_name": "default", "job_variables": {}},
        "enforce_parameter_schema": True,
    }


def render_prefect_yaml() -> str:
    """prefect.yaml text: a tiny (cpu) and a paper deployment of every flow, the nightly schedule."""
    flows = discover_flows()
    tiny, paper = check_config(TINY_CONFIG), check_config(PAPER_CONFIG)
    deployments = []
    for entry in flows.values():
        deployments.append(_deployment(entry, "tiny", TINY_CONFIG, tiny, CPU_POOL))
        paper_deployment = _deployment(entry, "paper", PAPER_CONFIG, paper, _pool_for(entry.name))
        if entry.name == "regenerate":
            paper_deployment["name"] = "nightly"
            paper_deployment["tags"] = ["avr", "nightly"]
            paper_deployment["schedules"] = [
                {"cron": NIGHTLY_CRON, "timezone": NIGHTLY_TIMEZONE, "active": True}
            ]
        deployments.append(paper_deployment)
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
                f"{PREFECT_YAML} is out of date with deployments/configs: run `avr render-deployments`"
            )
        print(f"{PREFECT_YAML} is up to date")
        return 0
    PREFECT_YAML.write_text(text)
    print(f"wrote {PREFECT_YAML} ({text.count('- name:')} deployments)")
    return 0


# ---- a local Prefect server + worker (avr ui, and the server tests) ----------------------------


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalPrefect:
    """A Prefect server (and optionally a worker) started by `start_local_prefect`."""

    api_url: str
    ui_url: str
    env: dict[str, str]
    processes: list[subprocess.Popen]
    log_dir: Path

    def prefect(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """Run a `prefect` CLI command against this server, from the project directory."""
        result = subprocess.run(
            [_prefect_bin(), "--no-prompt", *args],
            cwd=PROJECT_DIR,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def start_worker(self, pool: str, name: str = "avr-local") -> subprocess.Popen:
        """Start a process worker on `pool` in the background (logs in log_dir)."""
        log = open(self.log_dir / f"worker-{pool}.log", "ab")  # noqa: SIM115 - lives with the process
        process = subprocess.Popen(
            [
                _prefect_bin(),
                "worker",
                "start",
                "--pool",
                pool,
                "--type",
                "process",
                "--name",
                name,
            ],
            cwd=PROJECT_DIR,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """Stop every process started here, and the flow runs workers started (own sessions)."""
        pids = [p.pid for p in self.processes if p.poll() is None]
        groups = {os.getpgid(pid) for pid in _with_descendants(pids) if _alive(pid)}
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        for process in self.processes:
            process.wait(timeout=10)
        self.processes.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _with_descendants(pids: Sequence[int]) -> list[int]:
    """`pids` and all their descendants (from /proc; a process worker runs each flow run in a
    new session, so killing the worker's process group alone would leave the flow run behind)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # Fields after the ")" that closes the command name: state, ppid, ...
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _prefect_bin() -> str:
    """The `prefect` executable of this environment."""
    candidate = Path(sys.executable).with_name("prefect")
    return str(candidate) if candidate.exists() else (shutil.which("prefect") or "prefect")


def _wait_healthy(api_url: str, process: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"prefect server at {api_url} not healthy after {timeout:.0f}s")


@contextlib.contextmanager
def start_local_prefect(
    home: Path,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
    startup_timeout: float = 120,
) -> Iterator[LocalPrefect]:
    """A Prefect server on 127.0.0.1 with its state in `home`; everything stopped on exit."""
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "AVR_PROJECT_DIR": str(PROJECT_DIR),
        **(extra_env or {}),
    }
    env.pop("PREFECT_PROFILE", None)
    log_dir = home / "logs"
    log_dir.mkdir(exist_ok=True)
    server_log = open(log_dir / "server.log", "ab")  # noqa: SIM115 - lives with the process
    server = subprocess.Popen(
        [_prefect_bin(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=PROJECT_DIR,
        env=env,
        stdout=server_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    local = LocalPrefect(api_url, f"http://127.0.0.1:{port}", env, [server], log_dir)
    try:
        _wait_healthy(api_url, server, startup_timeout)
        yield local
    finally:
        local.stop()
        server_log.close()


def ensure_pool(local: LocalPrefect, pool: str) -> None:
    """Create a process work pool unless it exists."""
    if local.prefect("work-pool", "inspect", pool, check=False).returncode != 0:
        local.prefect("work-pool", "create", pool, "--type", "process")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_ui(port: int | None, home: str | None, deploy: bool) -> int:
    """`avr ui`: server + cpu/gpu process pools + deployments + one worker per pool, until Ctrl-C."""
    state = Path(home) if home else Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    # Ctrl-C and `kill` both stop the server and workers cleanly (a shell may start this
    # command with SIGINT ignored, e.g. in the background).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    with start_local_prefect(state, port) as local:
        for pool in (CPU_POOL, GPU_POOL):
            ensure_pool(local, pool)
        if deploy:
            local.prefect("deploy", "--prefect-file", str(PREFECT_YAML), "--all")
        for pool in (CPU_POOL, GPU_POOL):
            local.start_worker(pool, name=f"avr-{pool}")
        print(f"Prefect UI: {local.ui_url}   (API {local.api_url}; logs in {local.log_dir})")
        print("Open a deployment and press Run. Ctrl-C stops the server and the workers.")
        with contextlib.suppress(KeyboardInterrupt):
            while all(p.poll() is None for p in local.processes):
                time.sleep(1)
    return 0


# ---- entry point -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avr", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="Stage I end to end with the tiny config, on this machine")
    demo.add_argument("--root", help="storage root (default: ./avr-output)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    run = sub.add_parser("run", help="run a flow in this process with a config file")
    run.add_argument("flow", help="flow name, e.g. stage1, regenerate, generate-trees")
    run.add_argument("--config", help="YAML config (e.g. deployments/configs/tiny.yaml)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, dotted: --set sampling.max_tokens=64",
    )

    runs = sub.add_parser("runs", help="list runs in a storage root")
    runs.add_argument("--root", default="avr-output", help="storage root (default: ./avr-output)")

    show = sub.add_parser("show", help="show a run, or one step's manifest, schema and rows")
    show.add_argument("run")
    show.add_argument("step", nargs="?", help="stage/step or a unique step name")
    show.add_argument("--root", default="avr-output")
    show.add_argument("--rows", type=int, default=3, help="sample rows to print")
    show.add_argument("--width", type=int, default=300, help="cut strings longer than this")

    ui = sub.add_parser("ui", help="start a local Prefect server and workers, print the URL")
    ui.add_argument("--port", type=int, default=4200)
    ui.add_argument("--home", help="PREFECT_HOME for the server state (default: ~/.prefect)")
    ui.add_argument("--no-deploy", action="store_true", help="do not deploy prefect.yaml")

    render = sub.add_parser(
        "render-deployments", help="write deployments/prefect.yaml from configs"
    )
    render.add_argument("--check", action="store_true", help="fail if prefect.yaml is out of date")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`avr`); returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo(args.root, args.overrides)
        if args.command == "run":
            return run_flow(args.flow, args.config, args.overrides)
        if args.command == "runs":
            return print_runs(open_store_or_fail(args.root))
        if args.command == "show":
            return print_show(
                open_store_or_fail(args.root), args.run, args.step, args.rows, args.width
            )
        if args.command == "ui":
            return run_ui(args.port, args.home, not args.no_deploy)
        if args.command == "render-deployments":
            return render_deployments(args.check)
    except ConfigError as err:
        print(f"avr: error: {err}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
