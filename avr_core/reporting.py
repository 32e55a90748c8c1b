"""Step statistics and their tables (markdown for Prefect artifacts, plain text for the console).

Pure functions over small dicts: each shard of a step writes its `ShardStats`; a step's report is
their sum. Gains are kept as per-tree values so the median of the whole step is exact.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, Field

from avr_core.results import RunSummary, StepResult

__all__ = [
    "COUNT_LABELS",
    "ShardStats",
    "SliceProgress",
    "format_run_summary",
    "gain_summary",
    "markdown_table",
    "merge_stats",
    "render_run_markdown",
    "render_slices_markdown",
    "render_step_markdown",
    "report_rows",
    "text_table",
]

# Display order and labels of the counters a step may report; absent counters are not shown.
COUNT_LABELS: dict[str, str] = {
    "prompts_in": "prompts in",
    "rejected_rows": "rejected rows",
    "duplicates": "duplicate prompts",
    "trees": "trees",
    "critiques": "critiques",
    "refinements": "refinements",
    "format_retries": "format retries",
    "dropped_critiques": "dropped critiques",
    "scored": "scored trees",
    "scored_candidates": "scored answers + refinements",
    "rsft_examples": "kept RSFT examples",
    "original_examples": "original examples",
    "pairs": "pairs",
    "pairs_generation": "pairs: generation",
    "pairs_critique": "pairs: critique",
    "pairs_refinement": "pairs: refinement",
    "pairs_trajectory": "pairs: trajectory",
    "searches": "searches",
    "unscored_starts": "starting answers without a score",
    "improved_searches": "searches that improved at least once",
    "improved_rounds": "rounds that improved",
    "stopped_no_gain": "searches stopped by a round without gain",
    "reached_max_rounds": "searches still improving at max_rounds",
    "trajectories": "trajectories kept",
    "dropped_no_rounds": "dropped: search had no rounds (unscored start)",
    "dropped_last_round_improved": "dropped: last round improved (no closing critique)",
    "dropped_closing_round_unscored": "dropped: closing round has no scored refinement",
    "dropped_no_improving_round": "dropped: no round improved",
    "dropped_degenerate_initial_answer": "dropped: degenerate initial answer",
    "dropped_unreadable_final_answer": "dropped: final answer blank or holds the marker",
    "long_prompts": "prompts sampled",
    "responses": "long responses",
    "unparsed": "responses without a final answer",
    "scored_final_answers": "final answers scored",
    "lc_pairs": "length-controlled pairs kept",
    "dropped_chosen_longer": "dropped by the length rule (best's final answer longer)",
    "dropped_not_above_reference": "dropped: best does not beat the starting answer",
    "dropped_no_score_spread": "dropped: best does not beat worst",
    "dropped_no_scored_final_answer": "dropped: no scored final answer",
    "dropped_reference_unscored": "dropped: starting answer unscored",
    "dropped_same_response": "dropped: best and worst are the same response",
    "prompts": "prompts",
    "kept_previous": "rounds that kept the previous answer (keep_best)",
    "format_failures": "format failures (final answer never parsed)",
    "generated_chars": "generated characters",
    "generated_texts": "generated texts (retries too)",
    "prompt_tokens": "prompt tokens (per conversation and call)",
    "completion_tokens": "generated tokens",
    "engine_calls": "engine calls",
    "reward_calls": "reward calls",
}


class ShardStats(BaseModel):
    """What one shard of one step produced: integer counters and per-record values.

    `values` keeps every value (e.g. "gain": best refinement score - answer score, per tree) so
    that medians and confidence intervals over a whole step are exact.
    """

    counts: dict[str, int] = Field(default_factory=dict)
    values: dict[str, list[float]] = Field(default_factory=dict)
    seconds: dict[str, float] = Field(
        default_factory=dict, description="wall time by phase (compute, storage)"
    )
    worker: str | None = Field(
        None, description="the worker that computed the shard (its AVR_WORKER_ID)"
    )


def merge_stats(shards: Iterable[ShardStats]) -> ShardStats:
    """Sum counters and seconds, concatenate values."""
    merged = ShardStats()
    for shard in shards:
        for key, value in shard.counts.items():
            merged.counts[key] = merged.counts.get(key, 0) + value
        for key, seconds in shard.seconds.items():
            merged.seconds[key] = merged.seconds.get(key, 0.0) + seconds
        for key, values in shard.values.items():
            merged.values.setdefault(key, []).extend(values)
    return merged


def gain_summary(gains: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and median of the finite gains; (None, None) when there are none."""
    finite = [g for g in gains if math.isfinite(g)]
    if not finite:
        return None, None
    return statistics.fmean(finite), statistics.median(finite)


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def report_rows(
    counts: dict[str, int], gain_mean: float | None = None, gain_median: float | None = None
) -> list[tuple[str, str]]:
    """(label, value) rows: known counters in display order, then unknown ones, then gains."""
    rows = [(label, str(counts[key])) for key, label in COUNT_LABELS.items() if key in counts]
    rows += [(key, str(value)) for key, value in sorted(counts.items()) if key not in COUNT_LABELS]
    if gain_mean is not None:
        rows += [
            ("mean score gain", _signed(gain_mean)),
            ("median score gain", _signed(gain_median)),
        ]
    return rows


def markdown_table(rows: Sequence[tuple[str, ...]], header: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table; pipes in cells are escaped."""

    def cell(value: str) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(rows: Sequence[tuple[str, ...]], header: Sequence[str]) -> str:
    """A fixed-width plain-text table for terminals."""
    table = [tuple(str(h) for h in header), *[tuple(str(v) for v in row) for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True))
        for row in table
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def render_step_markdown(result: StepResult) -> str:
    """The markdown of a step's Prefect artifact: where the data is and what it holds."""
    rows = report_rows(result.counts, result.gain_mean, result.gain_median)
    rows += [(f"mean {key}", f"{value:.4g}") for key, value in sorted(result.means.items())]
    rows += [
        ("shards computed", str(result.shards_computed)),
        ("shards reused (already done)", str(result.shards_skipped)),
    ]
    rows += [
        (f"seconds: {phase}", f"{value:.1f}") for phase, value in sorted(result.seconds.items())
    ]
    table = markdown_table(rows, ("metric", "value"))
    return f"### {result.name}\n\n`{result.uri}`\n\n{table}\n"


class SliceProgress(BaseModel):
    """One slice of a scaled-out step, as its parent reports it: what storage holds of the
    slice's shards, and the child flow run that computed them."""

    slice: int
    shards: int = Field(description="shards in the slice")
    done: int = Field(description="of them, committed now")
    rows: int | None = Field(description="rows in the committed shards (None while running)")
    generated_chars: int | None = Field(None, description="characters the shards generated")
    completion_tokens: int | None = Field(None, description="tokens the shards generated")
    workers: list[str] = Field(default_factory=list, description="workers that computed them")
    flow_run: str | None = Field(None, description="the child flow run (None: nothing to do)")
    state: str | None = None
    seconds: float | None = Field(None, description="the child's wall time (so far, if running)")


def render_slices_markdown(name: str, slices: Sequence[SliceProgress]) -> str:
    """The markdown of a scaled-out step's slice artifact: one row per slice."""
    rows = [
        (
            str(s.slice),
            f"{s.done}/{s.shards}",
            "-" if s.rows is None else str(s.rows),
            "-" if s.generated_chars is None else str(s.generated_chars),
            "-" if s.completion_tokens is None else str(s.completion_tokens),
            "-" if s.seconds is None else f"{s.seconds:.1f}",
            s.flow_run or "-",
            s.state or "-",
            ", ".join(s.workers) or "-",
        )
        for s in slices
    ]
    done = sum(s.done for s in slices)
    total = sum(s.shards for s in slices)
    header = (
        "slice",
        "shards done",
        "rows",
        "generated chars",
        "generated tokens",
        "seconds",
        "child flow run",
        "state",
        "worker",
    )
    table = markdown_table(rows, header)
    return f"### {name}: {len(slices)} slices, {done}/{total} shards\n\n{table}\n"


def _details(step: StepResult, separator: str) -> str:
    return ", ".join(
        f"{label}{separator}{value}"
        for label, value in report_rows(step.counts, step.gain_mean, step.gain_median)
    )


def render_run_markdown(summary: RunSummary) -> str:
    """One table over all steps of a run (URI, rows, counters) and the trained models."""
    rows = [(step.name, str(step.rows), _details(step, "="), step.uri) for step in summary.steps]
    lines = [
        f"### {summary.flow} run {summary.run}",
        "",
        markdown_table(rows, ("step", "rows", "details", "uri")),
        "",
        *[f"- {model.train_step}: `{model.final_uri}`" for model in summary.models],
    ]
    return "\n".join(lines) + "\n"


def format_run_summary(summary: RunSummary) -> str:
    """Where the datasets and checkpoints are, and one table of what each step holds."""
    rows = [(step.name, str(step.rows), _details(step, " ")) for step in summary.steps]
    lines = [
        f"{summary.flow} run {summary.run!r} in {summary.storage_root}",
        "",
        text_table(rows, ("step", "rows", "details")),
        "",
        "Datasets (Parquet shards + _manifest.json):",
        *[f"  {name:<22} {uri}" for name, uri in summary.datasets.items()],
    ]
    if summary.models:
        lines += [
            "",
            "Trained models:",
            *[f"  {name:<22} {uri}" for name, uri in summary.checkpoints.items()],
        ]
    lines.append(f"  {'run record':<22} {summary.run_record_uri}")
    return "\n".join(lines)
