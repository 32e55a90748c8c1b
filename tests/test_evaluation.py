"""Win rates and the length-controlled win rate (avr_core.evaluation) on synthetic preferences."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from avr_core.evaluation import (
    Judgement,
    alpaca_eval_rows,
    length_controlled_win_rate,
    mean_estimate,
    summarize_judgements,
    win_rate,
)
from avr_core.plots import scaling_curve_png, win_rate_png


def _preferences(n: int, p_win: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice([0.0, 0.5, 1.0], size=n, p=[(1 - p_win) * 0.9, 0.1, p_win * 0.9])


def test_win_rate_counts_ties_half_and_its_ci_contains_it():
    estimate = win_rate([1.0, 0.5, 0.0, 1.0])
    assert estimate.value == pytest.approx(62.5)
    assert estimate.ci_low <= estimate.value <= estimate.ci_high
    assert estimate.n == 4
    # seeded: the same input gives the same interval
    assert win_rate([1.0, 0.5, 0.0, 1.0]) == estimate


def test_win_rate_ci_narrows_with_more_prompts():
    small = win_rate(_preferences(20, 0.6))
    large = win_rate(_preferences(500, 0.6))
    assert large.ci_high - large.ci_low < (small.ci_high - small.ci_low) / 2


def test_preferences_outside_zero_one_are_named():
    with pytest.raises(ValueError, match="prompt 1 has 1.5"):
        win_rate([0.5, 1.5])


def test_lc_equals_wr_when_lengths_are_equal():
    prefs = _preferences(200, 0.7)
    lengths = np.full(200, 300.0)
    lc = length_controlled_win_rate(prefs, lengths, lengths)
    assert lc.value == pytest.approx(win_rate(prefs).value, abs=0.5)


def test_lc_equals_wr_within_noise_when_lengths_do_not_predict_wins():
    rng = np.random.default_rng(2)
    prefs = _preferences(400, 0.65, seed=3)
    candidate = rng.normal(500, 100, size=400)
    baseline = rng.normal(500, 100, size=400)
    lc = length_controlled_win_rate(prefs, candidate, baseline)
    assert lc.value == pytest.approx(win_rate(prefs).value, abs=3.0)


def test_lc_falls_well_below_wr_for_a_candidate_that_wins_only_when_longer():
    rng = np.random.default_rng(4)
    baseline = np.full(300, 400.0)
    candidate = baseline + rng.choice([-200.0, 200.0], size=300, p=[0.3, 0.7])
    # mostly wins when longer, mostly loses when shorter: length, not quality, decides
    longer = candidate > baseline
    prefs = np.where(
        longer,
        rng.choice([1.0, 0.5], size=300, p=[0.8, 0.2]),
        rng.choice([0.0, 0.5], size=300, p=[0.8, 0.2]),
    )
    wr, lc = win_rate(prefs), length_controlled_win_rate(prefs, candidate, baseline)
    assert wr.value > 65
    assert lc.value < wr.value - 15
    assert lc.value == pytest.approx(50, abs=10)  # no better than the baseline at equal length
    assert lc.ci_low <= lc.value <= lc.ci_high


@pytest.mark.parametrize("constant", [0.0, 0.3, 0.5, 1.0])
def test_lc_of_a_constant_preference_is_that_constant(constant):
    rng = np.random.default_rng(5)
    candidate, baseline = rng.normal(500, 80, 100), rng.normal(450, 80, 100)
    lc = length_controlled_win_rate(np.full(100, constant), candidate, baseline, resamples=50)
    assert lc.value == pytest.approx(100 * constant, abs=0.1)


def test_lc_needs_one_length_per_preference():
    with pytest.raises(ValueError, match="one entry per prompt"):
        length_controlled_win_rate([1.0, 0.0], [10.0], [5.0, 5.0])


def test_mean_estimate_of_margins():
    estimate = mean_estimate([1.0, 2.0, 3.0])
    assert estimate.value == pytest.approx(2.0)
    assert 1.0 <= estimate.ci_low <= 2.0 <= estimate.ci_high <= 3.0


# ---- per-system summaries, AlpacaEval export, plots ------------------------------------------


def _judgement(i: int, system: str, judge: str, preference, consistent=None) -> Judgement:
    return Judgement(
        prompt_id=f"p{i}",
        system=system,
        baseline="seed",
        judge=judge,
        preference=preference,
        candidate_score=float(i) if judge == "rules" else None,
        baseline_score=0.0 if judge == "rules" else None,
        candidate_chars=100 + i,
        baseline_chars=100,
        candidate_response_chars=300 + i,
        rounds=2,
        consistent=consistent,
    )


def test_summaries_per_system_and_judge_count_unjudged_prompts():
    rows = [_judgement(i, "dpo", "rules", [1.0, 0.5, 0.0, 1.0][i]) for i in range(4)]
    rows += [
        _judgement(i, "dpo", "pairwise", p, consistent=c)
        for i, (p, c) in enumerate([(1.0, True), (None, None), (0.5, False), (1.0, True)])
    ]
    rules, pairwise = summarize_judgements(rows, resamples=200)
    assert (rules.system, rules.judge, rules.prompts, rules.judged) == ("dpo", "rules", 4, 4)
    assert rules.win_rate.value == pytest.approx(62.5)
    assert rules.mean_margin.value == pytest.approx(1.5)
    assert rules.candidate_chars.value == pytest.approx(101.5)
    assert pairwise.unjudged == 1 and pairwise.judged == 3
    assert pairwise.win_rate.value == pytest.approx(250 / 3)
    assert pairwise.position_consistency == pytest.approx(200 / 3)
    assert pairwise.mean_margin is None
    for summary in (rules, pairwise):
        for estimate in (summary.win_rate, summary.lc_win_rate):
            assert estimate.ci_low <= estimate.value <= estimate.ci_high


def test_alpaca_eval_rows_have_the_leaderboard_fields():
    rows = alpaca_eval_rows(["Say hi."], ["Hi!"], "avr-stage2")
    assert rows == [{"instruction": "Say hi.", "output": "Hi!", "generator": "avr-stage2"}]
    json.dumps(rows)  # serialisable as the leaderboard's JSON
    with pytest.raises(ValueError, match="1 prompts but 0 outputs"):
        alpaca_eval_rows(["Say hi."], [], "x")


def test_plots_are_png_images():
    from PIL import Image

    rows = [_judgement(i, s, "rules", p) for s, p in (("dpo", 1.0), ("sft", 0.5)) for i in range(3)]
    summaries = summarize_judgements(rows, resamples=50)
    curve = [mean_estimate([1.0, 2.0, 3.0], resamples=50), mean_estimate([2.0, 3.0], resamples=50)]
    for png in (win_rate_png(summaries), scaling_curve_png({"dpo": curve})):
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        image = Image.open(io.BytesIO(png))
        image.load()
        assert image.format == "PNG" and image.width > 100 and image.height > 100
