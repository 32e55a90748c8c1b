"""Win rates and the length-controlled win rate (avr_core.evaluation) on synthetic preferences."""

from __future__ import annotations

import numpy as np
import pytest

from avr_core.evaluation import length_controlled_win_rate, mean_estimate, win_rate


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
