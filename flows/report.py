"""`avr report RUN`: one self-contained HTML page of what a run holds, and its Prefect artifact.

Reads storage only: manifests and plans, the statistics in committed shards' footers, run.json,
and each evaluation's summary and plots (reports/{name}/). Shaping and rendering are
`avr_core.run_report`; this module finds the pieces and writes the page. The `run-report` flow
writes the page and publishes the artifact (Prefect attaches artifacts to flow runs; creating one
outside a run is deprecated).
"""

from __future__ import annotations

import argparse
import posixpath
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.settings import PREFECT_API_URL
from pydantic import Field, ValidationError

from avr_core.evaluation import SystemSummary
from avr_core.layout import RUN_REPORT_NAME, RunLayout, StepRef
from avr_core.reporting import ShardStats, merge_stats
from avr_core.rootfs import RootFS, StorageError
from avr_core.run_report import (
    EvaluationSection,
    ReportPlot,
    RunReport,
    StepReport,
    render_html,
    render_markdown,
    score_curve_plot,
    scores_by_round,
    summarize_step,
)
from avr_core.settings import AvrSettings
from avr_core.storage import CommittedShard, DatasetStore, StepStatus
from flows.config_files import ConfigError
from flows.inspect_runs import open_store, require_run
from flows.params import RunParams
from tasks.engines import open_store as open_worker_store
from tasks.runlog import artifact_key

__all__ = [
    "ReportParams",
    "add_report_arguments",
    "build_run_report",
    "publish_report_artifact",
    "report_run",
    "run_report",
    "write_report_page",
    "write_run_report",
]


def _planned_fingerprint(store: DatasetStore, layout: RunLayout, ref: StepRef) -> str | None:
    """The fingerprint the step's running attempt writes shards under (its `_plan.json`)."""
    try:
        plan = store.read_json(layout.step_plan(ref))
    except StorageError:
        return None  # a damaged plan only costs the partial step its statistics
    fingerprint = plan.get("fingerprint") if isinstance(plan, dict) else None
    return fingerprint if isinstance(fingerprint, str) else None


def _committed(store: DatasetStore, run: str, status: StepStatus) -> dict[int, CommittedShard]:
    """The step's committed shards with their footer stats: a sealed step's listed shards, or
    the shards a running step committed under its plan's fingerprint (none without a plan)."""
    layout, ref = RunLayout(run), StepRef(status.stage, status.step)
    # Read again: a step being recomputed drops its manifest when it writes its first shard.
    manifest = store.read_manifest(run, *ref) if status.status == "complete" else None
    if manifest is not None:
        listed = {info.index for info in manifest.shards}
        found = store.committed_shards(run, *ref, manifest.fingerprint)
        return {index: shard for index, shard in found.items() if index in listed}
    fingerprint = _planned_fingerprint(store, layout, ref)
    if fingerprint is None:
        return {}
    return store.committed_shards(run, *ref, fingerprint)


def _step_report(
    status: StepStatus, committed: dict[int, CommittedShard], stats: ShardStats
) -> StepReport:
    """A sealed step as its manifest lists it; a running one as far as its committed shards go
    (rows unknown when none is known: no plan, or nothing committed yet)."""
    sealed = status.status == "complete"
    committed_rows = sum(shard.info.rows for shard in committed.values()) if committed else None
    return summarize_step(
        status.stage,
        status.step,
        status.status,
        stats,
        shards_done=status.shards if sealed or not committed else len(committed),
        shards_total=status.shards_total,
        rows=status.rows if sealed else committed_rows,
        record_type=status.record_type,
    )


def _plot_title(file_name: str) -> str:
    return posixpath.splitext(file_name)[0].replace("_", " ")


def _read_evaluation(store: DatasetStore, layout: RunLayout, name: str) -> EvaluationSection | None:
    """reports/{name}/summary.json and its PNG plots, as tasks/evaluate.py `report_task` writes
    them; None for a report directory without a summary (an evaluation not finished)."""
    summary = store.read_json(layout.report(name, "summary.json"))
    if not isinstance(summary, list):
        return None
    plots = []
    for file_name in store.files.list_names(layout.report(name), "file"):
        png = (
            store.files.read_bytes(layout.report(name, file_name))
            if file_name.endswith(".png")
            else None
        )
        if png is not None:
            plots.append(ReportPlot(title=_plot_title(file_name), png=png))
    return EvaluationSection(
        name=name,
        summaries=[SystemSummary.model_validate(item) for item in summary],
        plots=plots,
    )


def _evaluations(store: DatasetStore, layout: RunLayout) -> list[EvaluationSection]:
    names = store.files.list_names(layout.reports, "directory")
    sections = [_read_evaluation(store, layout, name) for name in names]
    return [section for section in sections if section is not None]


def build_run_report(store: DatasetStore, run: str) -> RunReport:
    """What the run holds now, from storage alone; `ConfigError` if there is no such run."""
    require_run(store, run)
    layout = RunLayout(run)
    record: dict[str, Any] = store.read_json(layout.run_record) or {}
    reports_stage = posixpath.basename(layout.reports)
    steps: list[StepReport] = []
    scores: dict[str, dict[int, list[float]]] = {}
    # list_steps takes every directory of the run for a stage, reports/ included: skip it.
    for status in (s for s in store.list_steps(run) if s.stage != reports_stage):
        committed = _committed(store, run, status)
        stats = merge_stats(ShardStats.model_validate(c.stats) for c in committed.values())
        steps.append(_step_report(status, committed, stats))
        scores[f"{status.stage}/{status.step}"] = scores_by_round(stats.values)
    curve = score_curve_plot(scores)
    return RunReport(
        run=run,
        root=store.root,
        flow=record.get("flow"),
        started_at=record.get("started_at"),
        code_version=record.get("code_version") or {},
        config=record.get("config") or {},
        steps=steps,
        evaluations=_evaluations(store, layout),
        plots=[] if curve is None else [curve],
    )


def _protocol(location: str) -> str:
    return location.split("://", 1)[0] if "://" in location else "file"


def write_report_page(store: DatasetStore, report: RunReport, out: str | None = None) -> str:
    """Write the page to runs/{run}/report.html under the store's root, or to `out` (a local
    path or a URI); returns where it is."""
    page = render_html(report).encode("utf-8")
    if out is None:
        path = RunLayout(report.run).run_report
        store.files.write_bytes(path, page)
        return store.uri(path)
    target = out if "://" in out else str(Path(out).expanduser().resolve())
    parent, name = target.rsplit("/", 1)
    # The store's credentials are for its own protocol; another one gets its defaults.
    same_protocol = _protocol(target) == _protocol(store.root)
    files = RootFS(parent or "/", store.storage_options if same_protocol else None)
    files.write_bytes(name, page)
    return files.uri(name)


def write_run_report(store: DatasetStore, run: str, out: str | None = None) -> str:
    """Build the run's report and write its page (see `write_report_page`); returns where."""
    return write_report_page(store, build_run_report(store, run), out)


def publish_report_artifact(report: RunReport, html_uri: str | None = None) -> None:
    """The report's tables as a markdown artifact (key `{run}-run-report`) on the current
    Prefect API; plots stay in the page at `html_uri`."""
    create_markdown_artifact(
        markdown=render_markdown(report, html_uri),
        key=artifact_key(report.run, "run-report"),
        description=f"run report of {report.run}",
    )


class ReportParams(RunParams):
    """Which run to report on, and where the page goes."""

    out: str | None = Field(
        None,
        description=f"where to write the page, a local path or URI (default runs/RUN/{RUN_REPORT_NAME})",
    )


@flow(name="run-report")
def report_run(params: ReportParams | None = None) -> str:
    """Write the run's HTML report and publish its tables as an artifact; returns where the page
    is."""
    p = params or ReportParams()
    store = open_worker_store(p.storage_root)
    report = build_run_report(store, p.run_name)
    where = write_report_page(store, report, p.out)
    publish_report_artifact(report, where)
    get_run_logger().info("run report of %s: %s", p.run_name, where)
    return where


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `avr report`."""
    parser.add_argument("run", help="run name (see `avr runs`)")
    parser.add_argument("--root", default="avr-output", help="storage root (default: ./avr-output)")
    parser.add_argument(
        "--out",
        help="where to write the page: a local path or a URI "
        f"(default: runs/RUN/{RUN_REPORT_NAME} under the root)",
    )


def run_report(args: argparse.Namespace, settings: AvrSettings) -> int:
    """`avr report`: write the page; with a Prefect API configured, as the `run-report` flow,
    which also publishes the artifact.

    No API is started for it (unlike `avr run`): the page is the product, the artifact a copy
    for the UI of a server that is already there.
    """
    store = open_store(args.root, settings)
    if not PREFECT_API_URL.value():
        where = write_run_report(store, args.run, args.out)
        print(f"run report: {where}")
        print("no Prefect API configured (PREFECT_API_URL): no artifact published")
        return 0
    require_run(store, args.run)  # a wrong name is a usage error, not a failed flow run
    try:
        params = ReportParams(run_name=args.run, storage_root=store.root, out=args.out)
    except ValidationError as err:
        raise ConfigError(f"avr report: {err}") from err
    print(f"run report: {report_run(params)}")
    print(f"artifact: {artifact_key(args.run, 'run-report')}")
    return 0
