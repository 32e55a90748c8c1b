"""Evaluation plots as PNG bytes (matplotlib, headless): win rates with CI bars per system, and the
test-time scaling curve (score vs refinement round). Callers store the bytes beside the table."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on workers; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from matplotlib.figure import Figure  # noqa: E402

from avr_core.evaluation import Estimate, SystemSummary  # noqa: E402

__all__ = ["scaling_curve_png", "win_rate_png"]


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def win_rate_png(summaries: Sequence[SystemSummary]) -> bytes:
    """Bars of win rate and LC win rate per system x judge, with their 95% CIs; 50% marked."""
    rows = [s for s in summaries if s.win_rate is not None]
    labels = [f"{s.system}\n({s.judge})" for s in rows]
    figure, axes = plt.subplots(figsize=(max(4.0, 1.6 * len(rows) + 2), 3.6))
    width = 0.38
    for offset, name in ((-width / 2, "win rate"), (width / 2, "LC win rate")):
        estimates: list[Estimate | None] = [
            s.win_rate if name == "win rate" else s.lc_win_rate for s in rows
        ]
        values = [e.value if e else 0.0 for e in estimates]
        errors = [
            [e.value - e.ci_low if e else 0.0 for e in estimates],
            [e.ci_high - e.value if e else 0.0 for e in estimates],
        ]
        positions = [i + offset for i in range(len(rows))]
        axes.bar(positions, values, width, yerr=errors, capsize=4, label=name)
    axes.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    axes.set_xticks(range(len(rows)), labels)
    axes.set_ylim(0, 100)
    axes.set_ylabel(f"% preferred over {rows[0].baseline}" if rows else "%")
    axes.set_title("Win rate vs baseline (95% bootstrap CI)")
    axes.legend(loc="upper right", fontsize="small")
    return _png(figure)


def scaling_curve_png(
    curves: Mapping[str, Sequence[Estimate]], ylabel: str = "mean score"
) -> bytes:
    """One line per system: the estimate after each refinement round (round 0 = the starting
    answer), with its CI as a band."""
    figure, axes = plt.subplots(figsize=(5.0, 3.6))
    for system, estimates in curves.items():
        rounds = list(range(len(estimates)))
        axes.plot(rounds, [e.value for e in estimates], marker="o", label=system)
        axes.fill_between(
            rounds, [e.ci_low for e in estimates], [e.ci_high for e in estimates], alpha=0.2
        )
    axes.set_xlabel("refinement round")
    axes.set_ylabel(ylabel)
    axes.set_title("Test-time refinement (95% bootstrap CI)")
    if curves:
        axes.legend(fontsize="small")
        axes.set_xticks(range(max(len(e) for e in curves.values())))
    return _png(figure)
