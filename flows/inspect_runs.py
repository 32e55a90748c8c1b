"""`avr runs` and `avr show`: what a storage root holds, printed for a person.

Printing only: the listing itself is `DatasetStore.list_steps`, locations come from `RunLayout`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

from avr_core.layout import RunLayout, StepRef
from avr_core.reporting import format_run_summary
from avr_core.results import RunSummary, StepResult, TrainResult
from avr_core.rootfs import StorageRetry
from avr_core.schemas import RECORD_TYPES
from avr_core.settings import AvrSettings
from avr_core.storage import DatasetStore, StepStatus
from avr_core.versions import PublishedVersion
from flows.config_files import ConfigError
from flows.params import RunParams, resolve_storage_root
from tasks.evaluate import EvaluationReport, format_report

__all__ = [
    "RunOverview",
    "ShownStep",
    "find_step",
    "open_store",
    "print_outputs",
    "print_runs",
    "print_show",
    "require_run",
    "run_tokens",
    "show_step",
    "summarize_run",
]


class RunOverview(BaseModel):
    """A run as `avr runs` shows it: its run record's header and the status of every step."""

    run: str
    flow: str | None = None
    started_at: str | None = None
    code_version: dict[str, str | None] | None = Field(
        None, description="git commit and package version of the run's last attempt"
    )
    status: Literal["complete", "incomplete", "empty"]
    steps: list[StepStatus]
    config: dict[str, Any] = Field(default_factory=dict, description="the run record's config")


def open_store(root: str, settings: AvrSettings) -> DatasetStore:
    """The store at `root` (local paths made absolute), checked to be readable.

    A person is waiting: a dead endpoint is reported at once, not after the workers' retry budget.
    """
    store = DatasetStore(
        resolve_storage_root(root), settings.storage_options, StorageRetry(max_elapsed_s=0)
    )
    try:
        store.list_runs()
    except Exception as err:  # any fsspec backend error: no bucket, no endpoint, no credentials
        raise ConfigError(
            f"storage root {store.root!r} is not readable: {type(err).__name__}: {err} "
            "(endpoint and credentials come from AVR_STORAGE_OPTIONS / AWS_* variables)"
        ) from err
    return store


def summarize_run(store: DatasetStore, run: str) -> RunOverview:
    """The run record's flow, start and code version, plus the status of every step."""
    record = store.read_json(RunLayout(run).run_record) or {}
    steps = store.list_steps(run)
    if not steps:
        status = "empty"
    elif all(step.status == "complete" for step in steps):
        status = "complete"
    else:
        status = "incomplete"
    return RunOverview(
        run=run,
        flow=record.get("flow"),
        started_at=record.get("started_at"),
        code_version=record.get("code_version"),
        status=status,
        steps=steps,
        config=record.get("config") or {},
    )


def _shards(step: StepStatus) -> str:
    """`k/n` for a partial step whose run recorded how many shards it will have, else `k`."""
    if step.status == "partial" and step.shards_total is not None:
        return f"{step.shards}/{step.shards_total}"
    return str(step.shards)


def _tokens(tokens: dict[str, int]) -> str:
    """`prompt / generated` engine tokens, or `-` for a step that counted none."""
    if not tokens:
        return "-"
    return f"{tokens.get('prompt_tokens', 0):,} / {tokens.get('completion_tokens', 0):,}"


def run_tokens(steps: list[StepStatus]) -> dict[str, int]:
    """A run's token totals: the sum over its complete steps (partial ones have no manifest)."""
    totals: dict[str, int] = {}
    for step in steps:
        for name, value in step.tokens.items():
            totals[name] = totals.get(name, 0) + value
    return totals


def _step_line(step: StepStatus) -> str:
    rows = "-" if step.rows is None else step.rows
    return f"  {step.stage}/{step.step}: {step.status}, rows={rows}, shards={_shards(step)}"


def print_runs(store: DatasetStore) -> int:
    """Table of the runs under a root: one row per step with status and row count."""
    console = Console()
    if not console.is_terminal:
        # Piped or logged: no width to fit, and rich's default 80 columns would wrap every cell.
        console = Console(width=160)
    runs = store.list_runs()
    if not runs:
        console.print(f"no runs under {store.root}")
        return 0
    table = Table(title=f"runs in {store.root}")
    numeric = ("rows", "shards", "tokens in / out")
    for column in ("run", "flow", "started", "step", "status", *numeric):
        # Step names and numbers stay whole; a narrow terminal wraps the other columns.
        whole = column in ("step", *numeric)
        table.add_column(column, justify="right" if column in numeric else "left", no_wrap=whole)
    for run in runs:
        overview = summarize_run(store, run)
        for position, step in enumerate(overview.steps or [None]):
            first = position == 0
            table.add_row(
                run if first else "",
                (overview.flow or "-") if first else "",
                (overview.started_at or "-") if first else "",
                f"{step.stage}/{step.step}" if step else "-",
                step.status if step else "empty",
                "-" if step is None or step.rows is None else str(step.rows),
                _shards(step) if step else "0",
                _tokens(step.tokens) if step else "-",
            )
        totals = run_tokens(overview.steps)
        if totals:
            table.add_row("", "", "", "all steps", "", "", "", _tokens(totals))
        table.add_section()
    console.print(table)
    return 0


def find_step(steps: list[StepStatus], wanted: str, run: str) -> StepStatus:
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


class ShownStep(BaseModel):
    """A sealed step as `avr show RUN STEP` prints it."""

    uri: str
    manifest: dict[str, Any]
    schema_text: str
    sample: list[dict[str, Any]]


def show_step(store: DatasetStore, run: str, wanted: str, rows: int, width: int) -> ShownStep:
    """A step's manifest, Arrow schema and first `rows` rows (strings cut to `width`)."""
    status = find_step(store.list_steps(run), wanted, run)
    ref = StepRef(status.stage, status.step)
    uri = store.uri(RunLayout(run).step(ref))
    manifest = store.read_manifest(run, ref.stage, ref.step)
    if manifest is None:
        raise ConfigError(
            f"{uri} has no manifest ({status.status}, {status.shards} shards): "
            "the step has not finished"
        )
    sample: list[dict[str, Any]] = []
    if manifest.shards:
        first = manifest.shards[0].index
        records = store.read_shard_records(run, ref.stage, ref.step, first, manifest.record_type)
        sample = [_shorten(r.model_dump(mode="json"), width) for r in records[:rows]]
    return ShownStep(
        uri=uri,
        manifest=manifest.model_dump(mode="json"),
        schema_text=str(RECORD_TYPES[manifest.record_type].arrow_schema),
        sample=sample,
    )


def require_run(store: DatasetStore, run: str) -> None:
    """A `ConfigError` naming the root and the runs it has, unless it has `run`."""
    runs = store.list_runs()
    if run not in runs:
        raise ConfigError(f"no run {run!r} under {store.root}; runs: {', '.join(runs) or 'none'}")


def print_show(store: DatasetStore, run: str, step: str | None, rows: int, width: int) -> int:
    """`avr show`: the run record and its steps, or one step's manifest, schema and rows."""
    console = Console()
    require_run(store, run)
    if step is None:
        overview = summarize_run(store, run)
        console.print(
            f"[bold]{run}[/] ({overview.status}) flow={overview.flow} "
            f"started={overview.started_at} code={overview.code_version}"
        )
        console.print_json(json.dumps(overview.config, default=str))
        for s in overview.steps:
            console.print(
                f"{_step_line(s)}, type={s.record_type or '-'}, fingerprint={s.fingerprint or '-'}",
                markup=False,
                highlight=False,
            )
        return 0
    shown = show_step(store, run, step, rows, width)
    manifest = shown.manifest
    console.print(f"[bold]{shown.uri}[/]")
    console.print(
        f"record type {manifest['record_type']}, schema version {manifest['schema_version']}, "
        f"fingerprint {manifest['fingerprint']}, {manifest['total_rows']} rows in "
        f"{len(manifest['shards'])} shards, sealed {manifest['created_at']}"
    )
    for shard in manifest["shards"]:
        console.print(f"  shard {shard['index']}: {shard['rows']} rows  {shard['path']}")
    console.print("[bold]schema[/]")
    console.print(shown.schema_text, markup=False, highlight=False)
    console.print(f"[bold]first {len(shown.sample)} rows[/]")
    for row in shown.sample:
        console.print_json(json.dumps(row, default=str))
    return 0


def print_outputs(params: BaseModel, result: Any, settings: AvrSettings) -> None:
    """What a flow run produced, by the type of its result: a pipeline's summary, or the result
    and the step table of the run it wrote to."""
    if isinstance(result, RunSummary):
        print(format_run_summary(result))
        return
    run = params.run_name if isinstance(params, RunParams) else None
    if isinstance(result, PublishedVersion):
        plan = result.plan
        print(
            f"published {result.dataset} version {result.version} as run {result.run}: "
            f"{plan.new} new prompts, {plan.reused} reused from {plan.previous or 'none'}"
        )
        run = result.run
    elif isinstance(result, StepResult):
        print(f"{result.name}: {result.rows} rows in {result.shards} shards  {result.uri}")
    elif isinstance(result, TrainResult):
        print(f"{result.train_step}: final model {result.final_uri}")
    elif isinstance(result, EvaluationReport):
        print(format_report(result))
    elif isinstance(result, BaseModel):
        print(result.model_dump_json(indent=2))
    if run is not None and isinstance(params, RunParams):
        store = open_store(params.storage_root, settings)
        print(f"outputs: {store.uri(RunLayout(run).directory)}")
        for step in store.list_steps(run):
            print(_step_line(step))
