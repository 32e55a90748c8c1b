"""Win rates with bootstrap confidence intervals, and AlpacaEval 2's length-controlled win rate.

Pure functions over per-prompt preferences (DESIGN section 9): `preferences[i]` in [0, 1] is the
probability that the candidate system beats the baseline on prompt i (1 = win, 0.5 = tie,
0 = loss; a judge that played both orders gives the mean of its two games).

- `win_rate`: the mean preference, in percent, with a seeded percentile bootstrap 95% CI over
  prompts (1,000 resamples by default).
- `length_controlled_win_rate`: the minimal variant of the length-controlled GLM of Dubois et al.
  2024 (arXiv 2404.04475), for custom prompt sets that have no per-instruction difficulty term:
  a logistic model of the preference on `tanh(length difference / its standard deviation)` plus a
  system term; the LC win rate is the model's predicted preference at zero length difference,
  i.e. sigmoid(system term). The fit uses fractional outcomes (each prompt is a "win" with weight
  p and a "loss" with weight 1 - p) and a negligible L2 penalty, so a prompt set the length term
  separates perfectly still gives finite coefficients. Its CI bootstraps prompts and refits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel, Field
from sklearn.linear_model import LogisticRegression

from avr_core.schemas import Judgement

__all__ = [
    "DEFAULT_RESAMPLES",
    "SUMMARY_COLUMNS",
    "SUMMARY_HEADER",
    "Estimate",
    "format_estimate_ci",
    "Judgement",
    "SystemSummary",
    "alpaca_eval_rows",
    "bootstrap",
    "length_controlled_win_rate",
    "mean_estimate",
    "summarize_judgements",
    "summary_rows",
    "win_rate",
]

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
# Inverse L2 strength of the LC fit: weak enough that an unseparated fit is the plain maximum
# likelihood one (a constant preference p gives exactly p), strong enough to stay finite.
_LC_C = 1e6


class Estimate(BaseModel):
    """A point estimate with a bootstrap confidence interval (same unit as `value`)."""

    value: float
    ci_low: float
    ci_high: float
    n: int = Field(description="prompts it was computed over")
    confidence: float = 0.95


def format_estimate_ci(estimate: Estimate | None) -> str:
    """`value [ci_low, ci_high]` to one decimal, or `-` when there is no estimate (a table cell)."""
    if estimate is None:
        return "-"
    return f"{estimate.value:.1f} [{estimate.ci_low:.1f}, {estimate.ci_high:.1f}]"


Statistic = Callable[[np.ndarray], float]


def bootstrap(
    columns: Sequence[Sequence[float] | np.ndarray],
    statistic: Callable[..., float],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
) -> Estimate:
    """`statistic(*columns)` with a percentile bootstrap CI: prompts (rows) resampled with
    replacement, every column alike, from a seeded generator (same inputs, same interval)."""
    arrays = [np.asarray(column, dtype=float) for column in columns]
    n = len(arrays[0])
    if n == 0:
        raise ValueError("no prompts to estimate from")
    if any(len(a) != n for a in arrays):
        raise ValueError(f"columns differ in length: {[len(a) for a in arrays]}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    value = float(statistic(*arrays))
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for r in range(resamples):
        index = rng.integers(0, n, size=n)
        draws[r] = statistic(*(a[index] for a in arrays))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    # A percentile interval can miss a skewed point estimate by rounding; never report one
    # that does not contain the value it belongs to.
    return Estimate(
        value=value,
        ci_low=float(min(low, value)),
        ci_high=float(max(high, value)),
        n=n,
        confidence=confidence,
    )


def _check_preferences(preferences: Sequence[float]) -> np.ndarray:
    values = np.asarray(preferences, dtype=float)
    bad = [i for i, p in enumerate(values) if not (0.0 <= p <= 1.0)]
    if bad:
        raise ValueError(
            f"preferences must lie in [0, 1]; prompt {bad[0]} has {float(values[bad[0]])}"
            f" ({len(bad)} out of range)"
        )
    return values


def win_rate(
    preferences: Sequence[float], resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> Estimate:
    """P(candidate beats baseline) in percent, ties counting half, with a bootstrap 95% CI."""
    values = _check_preferences(preferences)
    return bootstrap([values], lambda p: 100.0 * float(p.mean()), resamples, seed)


def mean_estimate(
    values: Sequence[float], resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> Estimate:
    """The mean of `values` (e.g. reward margins, lengths) with a bootstrap 95% CI."""
    return bootstrap([values], lambda v: float(v.mean()), resamples, seed)


def _lc_value(preferences: np.ndarray, differences: np.ndarray) -> float:
    """Predicted preference (percent) at zero length difference of the minimal LC GLM."""
    spread = float(differences.std())
    feature = np.tanh(differences / spread) if spread > 0 else np.zeros_like(differences)
    if np.all(preferences == preferences[0]) and not 0.0 < preferences[0] < 1.0:
        # Every prompt won (or lost): the likelihood has no finite maximum, and the limit of the
        # fit is that constant.
        return 100.0 * float(preferences[0])
    n = len(preferences)
    x = np.concatenate([feature, feature]).reshape(-1, 1)
    y = np.concatenate([np.ones(n), np.zeros(n)])
    weights = np.concatenate([preferences, 1.0 - preferences])
    model = LogisticRegression(C=_LC_C, max_iter=1000)
    model.fit(x, y, sample_weight=weights)
    system_term = float(model.intercept_[0])
    return 100.0 / (1.0 + math.exp(-system_term))


def length_controlled_win_rate(
    preferences: Sequence[float],
    candidate_lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Estimate:
    """AlpacaEval 2's length-controlled win rate (minimal GLM, no instruction term), in percent.

    Lengths are characters of the answers compared (for a thinking model: its final answer).
    Equal lengths everywhere give the plain win rate; a candidate that wins only where it is
    longer gets an LC win rate well below its win rate.
    """
    values = _check_preferences(preferences)
    candidate = np.asarray(candidate_lengths, dtype=float)
    baseline = np.asarray(baseline_lengths, dtype=float)
    if not len(values) == len(candidate) == len(baseline):
        raise ValueError(
            f"preferences ({len(values)}), candidate_lengths ({len(candidate)}) and "
            f"baseline_lengths ({len(baseline)}) must have one entry per prompt"
        )
    return bootstrap([values, candidate - baseline], _lc_value, resamples, seed)


# ---- per-prompt judgements -> per-system summaries ---------------------------------------------


class SystemSummary(BaseModel):
    """One system against the baseline under one judge, every figure with its bootstrap CI."""

    system: str
    baseline: str
    judge: str
    prompts: int
    judged: int = Field(description="prompts with a usable preference")
    unjudged: int = Field(description="prompts the judge gave no verdict on (counted)")
    win_rate: Estimate | None
    lc_win_rate: Estimate | None
    mean_margin: Estimate | None = Field(None, description="reward judges: candidate - baseline")
    candidate_chars: Estimate
    baseline_chars: Estimate
    candidate_response_chars: Estimate
    position_consistency: float | None = Field(None, description="pairwise judges, in percent")


# The evaluation table (terminal, artifact, run report): one row per system x judge. Each
# column's key names its cell in the run report's page.
SUMMARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("system", "system"),
    ("judge", "judge"),
    ("judged", "judged"),
    ("win_rate", "win rate % [95% CI]"),
    ("lc_win_rate", "LC win rate % [95% CI]"),
    ("mean_margin", "mean margin [95% CI]"),
    ("chars", "chars (cand. vs base)"),
    ("position_consistency", "position consistency"),
)
SUMMARY_HEADER = tuple(title for _, title in SUMMARY_COLUMNS)


def summary_rows(summaries: Sequence[SystemSummary]) -> list[tuple[str, ...]]:
    """The cells of the evaluation table, in SUMMARY_COLUMNS order."""
    return [
        (
            s.system,
            s.judge,
            f"{s.judged}/{s.prompts}",
            format_estimate_ci(s.win_rate),
            format_estimate_ci(s.lc_win_rate),
            format_estimate_ci(s.mean_margin),
            f"{s.candidate_chars.value:.0f} vs {s.baseline_chars.value:.0f}",
            "-" if s.position_consistency is None else f"{s.position_consistency:.0f}%",
        )
        for s in summaries
    ]


def summarize_judgements(
    judgements: Sequence[Judgement], resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> list[SystemSummary]:
    """One summary per (system, judge), in first-seen order."""
    groups: dict[tuple[str, str], list[Judgement]] = {}
    for row in judgements:
        groups.setdefault((row.system, row.judge), []).append(row)
    summaries = []
    for (system, judge), rows in groups.items():
        judged = [r for r in rows if r.preference is not None]
        preferences = [r.preference for r in judged if r.preference is not None]
        margins = [
            r.candidate_score - r.baseline_score
            for r in judged
            if r.candidate_score is not None and r.baseline_score is not None
        ]
        consistency = [r.consistent for r in rows if r.consistent is not None]
        summaries.append(
            SystemSummary(
                system=system,
                baseline=rows[0].baseline,
                judge=judge,
                prompts=len(rows),
                judged=len(judged),
                unjudged=len(rows) - len(judged),
                win_rate=win_rate(preferences, resamples, seed) if preferences else None,
                lc_win_rate=(
                    length_controlled_win_rate(
                        preferences,
                        [r.candidate_chars for r in judged],
                        [r.baseline_chars for r in judged],
                        resamples,
                        seed,
                    )
                    if preferences
                    else None
                ),
                mean_margin=mean_estimate(margins, resamples, seed) if margins else None,
                candidate_chars=mean_estimate([r.candidate_chars for r in rows], resamples, seed),
                baseline_chars=mean_estimate([r.baseline_chars for r in rows], resamples, seed),
                candidate_response_chars=mean_estimate(
                    [r.candidate_response_chars for r in rows], resamples, seed
                ),
                position_consistency=(
                    100.0 * sum(consistency) / len(consistency) if consistency else None
                ),
            )
        )
    return summaries


def alpaca_eval_rows(
    prompts: Sequence[str], outputs: Sequence[str], generator: str
) -> list[dict[str, str]]:
    """One system's outputs in AlpacaEval's format (`instruction`, `output`, `generator`), for
    the official GPT-4 judged leaderboard run elsewhere."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    return [
        {"instruction": prompt, "output": output, "generator": generator}
        for prompt, output in zip(prompts, outputs, strict=True)
    ]
