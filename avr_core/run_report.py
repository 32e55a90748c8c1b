"""A run's report: what every step holds and cost, per-round means, evaluations and their plots.

`RunReport` is built from storage alone (flows/report.py reads it); this module only shapes and
renders it: `render_html` gives one self-contained page (inline CSS, plots as data: URIs, nothing
fetched), `render_markdown` the same tables for a Prefect artifact. Key numbers carry a stable
`data-key` attribute (`rows:stage1/pairs`) so tests and scripts find them in the page.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from avr_core.evaluation import (
    SUMMARY_COLUMNS,
    SUMMARY_HEADER,
    Estimate,
    SystemSummary,
    mean_estimate,
    summary_rows,
)
from avr_core.plots import scaling_curve_png
from avr_core.reporting import ShardStats, gain_summary, markdown_table, report_rows
from avr_core.storage import TOKEN_COUNTERS

__all__ = [
    "EvaluationSection",
    "ReportPlot",
    "RunReport",
    "StepReport",
    "render_html",
    "render_markdown",
    "round_means",
    "score_curve_plot",
    "scores_by_round",
    "summarize_step",
]

# Shown in their own columns ("-" when a step's shards do not count them), not among the details.

# Per-record values of test-time steps: `score_round_2`, `gain_round_1`, `answer_chars_round_0`.
_ROUND_VALUE = re.compile(r"^(.+)_round_(\d+)$")


class ReportPlot(BaseModel):
    """A PNG shown in the page (an evaluation's stored plot, or one drawn for the report)."""

    # Base64 in JSON: PNG bytes are not UTF-8 (Prefect serialises the report between tasks).
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    title: str
    png: bytes


class StepReport(BaseModel):
    """One step of the run: its progress, size, compute time, counters and gains."""

    stage: str
    step: str
    status: Literal["complete", "partial", "empty"]
    shards_done: int = Field(description="committed shards (a sealed step: its manifest's)")
    shards_total: int | None = Field(None, description="a partial step: the shards it will have")
    rows: int | None = Field(None, description="rows in the committed shards; None: unknown")
    record_type: str | None = None
    compute_seconds: float | None = Field(None, description="sum of the shards' compute time")
    counts: dict[str, int] = Field(default_factory=dict)
    gain_mean: float | None = None
    gain_median: float | None = None
    round_means: dict[str, dict[int, float]] = Field(
        default_factory=dict,
        description="metric (score, gain, answer_chars) -> refinement round -> mean",
    )

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.step}"

    @property
    def progress(self) -> str:
        """`sealed`, `k of n shards` while the step runs, or `k shards` without a plan."""
        if self.status == "complete":
            return "sealed"
        if self.shards_total is not None:
            return f"{self.shards_done} of {self.shards_total} shards"
        return f"{self.shards_done} shards, not sealed"


class EvaluationSection(BaseModel):
    """An evaluation stored in the run: one summary per system x judge, and its plots."""

    name: str
    summaries: list[SystemSummary] = Field(default_factory=list)
    plots: list[ReportPlot] = Field(default_factory=list)


class RunReport(BaseModel):
    """Everything the run report shows, read from storage."""

    run: str
    root: str = Field(description="the storage root the run is under")
    flow: str | None = None
    started_at: str | None = None
    code_version: dict[str, str | None] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict, description="the run record's config")
    steps: list[StepReport] = Field(default_factory=list)
    evaluations: list[EvaluationSection] = Field(default_factory=list)
    plots: list[ReportPlot] = Field(default_factory=list, description="plots drawn for the run")

    def total(self, counter: str) -> int | None:
        """A counter summed over the steps that count it; None if none does."""
        values = [s.counts[counter] for s in self.steps if counter in s.counts]
        return sum(values) if values else None

    @property
    def compute_seconds(self) -> float | None:
        values = [s.compute_seconds for s in self.steps if s.compute_seconds is not None]
        return sum(values) if values else None


# ---- building from shard statistics ------------------------------------------------------------


def round_means(values: Mapping[str, Sequence[float]]) -> dict[str, dict[int, float]]:
    """Means of the `{metric}_round_{k}` values, by metric then round (non-finite left out)."""
    means: dict[str, dict[int, float]] = {}
    for key, series in sorted(values.items()):
        match = _ROUND_VALUE.match(key)
        mean = gain_summary(series)[0] if match else None
        if match and mean is not None:
            means.setdefault(match.group(1), {})[int(match.group(2))] = mean
    return {metric: dict(sorted(by_round.items())) for metric, by_round in means.items()}


def summarize_step(
    stage: str,
    step: str,
    status: Literal["complete", "partial", "empty"],
    stats: ShardStats,
    *,
    shards_done: int,
    shards_total: int | None = None,
    rows: int | None = None,
    record_type: str | None = None,
) -> StepReport:
    """A step's report from the merged statistics of its committed shards (`merge_stats`)."""
    gain_mean, gain_median = gain_summary(stats.values.get("gain", []))
    return StepReport(
        stage=stage,
        step=step,
        status=status,
        shards_done=shards_done,
        shards_total=shards_total,
        rows=rows,
        record_type=record_type,
        compute_seconds=stats.seconds.get("compute"),
        counts=stats.counts,
        gain_mean=gain_mean,
        gain_median=gain_median,
        round_means=round_means(stats.values),
    )


def scores_by_round(values: Mapping[str, Sequence[float]]) -> dict[int, list[float]]:
    """The finite `score_round_{k}` values by round k (what `score_curve_plot` draws)."""
    by_round: dict[int, list[float]] = {}
    for key, series in values.items():
        match = _ROUND_VALUE.match(key)
        if match and match.group(1) == "score":
            by_round[int(match.group(2))] = [v for v in series if math.isfinite(v)]
    return dict(sorted(by_round.items()))


def score_curve_plot(
    scores: Mapping[str, Mapping[int, Sequence[float]]], resamples: int = 1000
) -> ReportPlot | None:
    """Mean score per refinement round, one line per step (with a bootstrap CI band); None when
    no step scored more than one round. `scores`: step -> round -> the scores of that round."""
    curves: dict[str, list[Estimate]] = {}
    for step, by_round in scores.items():
        rounds = [k for k in sorted(by_round) if by_round[k]]
        if len(rounds) > 1:
            curves[step] = [mean_estimate(by_round[k], resamples) for k in rounds]
    if not curves:
        return None
    return ReportPlot(title="Score per refinement round", png=scaling_curve_png(curves))


# ---- formatting shared by both renderings ------------------------------------------------------


def _integer(value: int | None) -> str:
    return "-" if value is None else str(value)


def _signed(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:+.4f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _details(step: StepReport) -> str:
    """The other counters, labelled as in the step artifacts (tokens have their own columns)."""
    counts = {k: v for k, v in step.counts.items() if k not in TOKEN_COUNTERS}
    return ", ".join(f"{label} {value}" for label, value in report_rows(counts))


_STEP_COLUMNS: tuple[tuple[str, str], ...] = (
    ("step", "step"),
    ("status", "status"),
    ("rows", "rows"),
    ("shards", "shards"),
    ("seconds", "compute s"),
    ("prompt_tokens", "prompt tokens"),
    ("completion_tokens", "completion tokens"),
    ("gain_mean", "gain mean"),
    ("gain_median", "gain median"),
    ("details", "details"),
)


def _step_cells(step: StepReport) -> dict[str, str]:
    """The steps table's cells of one step, by column key."""
    return {
        "step": step.name,
        "status": step.progress,
        "rows": _integer(step.rows),
        "shards": str(step.shards_done),
        "seconds": _seconds(step.compute_seconds),
        "prompt_tokens": _integer(step.counts.get("prompt_tokens")),
        "completion_tokens": _integer(step.counts.get("completion_tokens")),
        "gain_mean": _signed(step.gain_mean),
        "gain_median": _signed(step.gain_median),
        "details": _details(step),
    }


def _round_rows(step: StepReport) -> list[tuple[str, ...]]:
    """One row per round: the round, then each metric's mean ("-" where it has none)."""
    metrics = sorted(step.round_means)
    rounds = sorted({k for by_round in step.round_means.values() for k in by_round})
    return [(str(k), *[_mean(step.round_means[m].get(k)) for m in metrics]) for k in rounds]


def _mean(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _header_facts(report: RunReport) -> list[tuple[str, str, str]]:
    """(data-key, label, value) of the page's header: provenance, then run totals."""
    code = report.code_version
    return [
        ("run", "run", report.run),
        ("root", "storage root", report.root),
        ("flow", "flow", report.flow or "-"),
        ("started_at", "started", report.started_at or "-"),
        ("git_commit", "git commit", code.get("git_commit") or "-"),
        ("package_version", "package version", code.get("package_version") or "-"),
        ("total:seconds", "compute seconds", _seconds(report.compute_seconds)),
        *[
            (f"total:{counter}", counter.replace("_", " "), _integer(report.total(counter)))
            for counter in TOKEN_COUNTERS
        ],
    ]


# ---- HTML --------------------------------------------------------------------------------------

# Nothing may be fetched: the page must open the same from a bucket, a mail or a laptop offline.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #1d1d1f; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.details { max-width: 40rem; color: #555; }
.partial { color: #a15c00; } .empty { color: #888; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
pre { background: #f7f7f9; padding: 0.75rem; overflow-x: auto; font-size: 0.8rem; }
"""

_NUMERIC = {
    "rows",
    "shards",
    "seconds",
    "prompt_tokens",
    "completion_tokens",
    "gain_mean",
    "gain_median",
}


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _td(text: str, key: str | None = None, css: str | None = None) -> str:
    """A cell; `key` becomes its data-key, the handle tests and scripts look numbers up by."""
    attributes = ""
    if css:
        attributes += f' class="{_e(css)}"'
    if key:
        attributes += f' data-key="{_e(key)}"'
    return f"<td{attributes}>{_e(text)}</td>"


def _table(header: Sequence[str], rows: Iterable[str], css: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "\n".join(f"<tr>{row}</tr>" for row in rows)
    return f'<table class="{_e(css)}"><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>'


def _header_html(report: RunReport) -> str:
    rows = "\n".join(
        f"<tr><th>{_e(label)}</th>{_td(value, key)}</tr>"
        for key, label, value in _header_facts(report)
    )
    return f'<table class="facts"><tbody>\n{rows}\n</tbody></table>'


def _steps_html(report: RunReport) -> str:
    if not report.steps:
        return "<p>No steps stored yet.</p>"
    rows = []
    for step in report.steps:
        cells = _step_cells(step)
        css = {key: ("num" if key in _NUMERIC else key) for key in cells}
        css["status"] = step.status
        rows.append(
            "".join(
                _td(cells[key], f"{key}:{step.name}" if key != "details" else None, css[key])
                for key, _ in _STEP_COLUMNS
            )
        )
    return _table([label for _, label in _STEP_COLUMNS], rows, "steps")


def _rounds_html(step: StepReport) -> str:
    metrics = sorted(step.round_means)
    rows = [
        "".join(
            [
                _td(round_row[0], css="num"),
                *[
                    _td(value, f"round:{step.name}:{metric}:{round_row[0]}", "num")
                    for metric, value in zip(metrics, round_row[1:], strict=True)
                ],
            ]
        )
        for round_row in _round_rows(step)
    ]
    table = _table(("round", *[f"{m} mean" for m in metrics]), rows, "rounds")
    return f"<h3>{_e(step.name)}</h3>\n{table}"


def _plot_html(plot: ReportPlot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure><img alt="{_e(plot.title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(plot.title)}</figcaption></figure>"
    )


def _evaluation_html(section: EvaluationSection) -> str:
    keys = [key for key, _ in SUMMARY_COLUMNS]
    rows = [
        "".join(
            _td(
                value, None if key in ("system", "judge") else f"{key}:{section.name}:{r[0]}:{r[1]}"
            )
            for key, value in zip(keys, r, strict=True)
        )
        for r in summary_rows(section.summaries)
    ]
    parts = [f"<h3>{_e(section.name)}</h3>", _table(SUMMARY_HEADER, rows, "evaluation")]
    parts += [_plot_html(plot) for plot in section.plots]
    return "\n".join(parts)


def render_html(report: RunReport) -> str:
    """One self-contained HTML page: inline CSS, plots embedded, every text escaped."""
    with_rounds = [s for s in report.steps if s.round_means]
    sections = [
        f"<h1>Run report: {_e(report.run)}</h1>",
        _header_html(report),
        "<h2>Steps</h2>",
        _steps_html(report),
    ]
    if with_rounds:
        sections += ["<h2>Per refinement round</h2>", *map(_rounds_html, with_rounds)]
    if report.evaluations:
        sections += ["<h2>Evaluations</h2>", *map(_evaluation_html, report.evaluations)]
    if report.plots:
        sections += ["<h2>Plots</h2>", *map(_plot_html, report.plots)]
    config = json.dumps(report.config, indent=2, sort_keys=True, default=str)
    sections.append(f"<details><summary>config</summary><pre>{_e(config)}</pre></details>")
    body = "\n".join(sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">\n'
        f"<title>Run report: {_e(report.run)}</title>\n"
        f"<style>{_CSS}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


# ---- markdown ----------------------------------------------------------------------------------


def _md(text: str) -> str:
    """Markdown renderers pass HTML through: a name must not become markup in the UI."""
    return html.escape(text, quote=False)


def _md_table(rows: Iterable[Sequence[str]], header: Sequence[str]) -> str:
    return markdown_table([tuple(_md(v) for v in row) for row in rows], header)


def render_markdown(report: RunReport, html_uri: str | None = None) -> str:
    """The Prefect artifact: the page's tables (plots stay in the HTML page at `html_uri`)."""
    facts = [
        f"{label}: {_md(value)}" for key, label, value in _header_facts(report) if key != "run"
    ]
    lines = [f"### Run report: {_md(report.run)}", "", "  \n".join(facts), ""]
    if html_uri:
        lines += [f"Full page with plots: `{html_uri}`", ""]
    step_rows = [tuple(_step_cells(step)[key] for key, _ in _STEP_COLUMNS) for step in report.steps]
    lines += [_md_table(step_rows, [label for _, label in _STEP_COLUMNS]), ""]
    for step in (s for s in report.steps if s.round_means):
        header = ("round", *[f"{m} mean" for m in sorted(step.round_means)])
        lines += [f"#### {_md(step.name)}: per round", "", _md_table(_round_rows(step), header), ""]
    for section in report.evaluations:
        lines += [
            f"#### Evaluation {_md(section.name)}",
            "",
            _md_table(summary_rows(section.summaries), SUMMARY_HEADER),
            "",
        ]
    plots = [p.title for p in report.plots] + [
        f"{s.name}: {p.title}" for s in report.evaluations for p in s.plots
    ]
    if plots:
        lines += [f"Plots in the page: {_md(', '.join(plots))}", ""]
    return "\n".join(lines)
