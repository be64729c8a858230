"""Paired intervals and the t quantile behind the accuracy benchmark's claims."""
import math

import numpy as np
import pytest

from qgait_plugin.bench.stats import mean_std, paired_interval, t_cdf, t_quantile


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (5, 2.5706), (10, 2.2281),
                                         (30, 2.0423), (1e9, 1.9600)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


def test_t_quantile_inverts_cdf_for_fractional_df():
    for df in (1.3, 2.7, 7.5):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)
    assert t_quantile(0.025, 4.2) == pytest.approx(-t_quantile(0.975, 4.2))


def test_one_seed_is_the_t_interval_over_subjects():
    rng = np.random.default_rng(0)
    d = rng.normal(1.0, 2.0, (1, 40))
    ci = paired_interval(d)
    half = t_quantile(0.975, 39) * d.std(ddof=1) / math.sqrt(40)
    assert ci.mean == pytest.approx(d.mean())
    assert (ci.low, ci.high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert ci.df == 39


def test_seed_noise_widens_the_interval():
    """The same subject-level differences, once with and once without a seed-to-seed shift."""
    rng = np.random.default_rng(1)
    base = rng.normal(0.5, 1.0, (1, 50)) + rng.normal(0, 0.3, (4, 50))
    shifted = base + np.array([[-2.0], [1.5], [2.5], [-2.0]])
    assert (paired_interval(shifted).high - paired_interval(shifted).low) > \
        2 * (paired_interval(base).high - paired_interval(base).low)


def test_identical_methods_give_a_zero_width_interval_at_zero():
    ci = paired_interval(np.zeros((3, 10)))
    assert ci.mean == 0 and abs(ci.low) < 1e-6 and abs(ci.high) < 1e-6


def test_coverage_is_near_95_percent_under_the_two_way_model():
    """Simulated two-way random effects with a true difference of 0.7: the interval covers it ~95 % of the time."""
    rng = np.random.default_rng(2)
    hits = 0
    trials = 400
    for _ in range(trials):
        d = 0.7 + rng.normal(0, 0.5, (3, 1)) + rng.normal(0, 1.0, (1, 50)) + rng.normal(0, 1.5, (3, 50))
        ci = paired_interval(d)
        hits += ci.low <= 0.7 <= ci.high
    assert 0.90 <= hits / trials <= 0.995


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="seeds, subjects"):
        paired_interval(np.zeros(5))
    with pytest.raises(ValueError, match="finite"):
        paired_interval(np.array([[0.0, np.nan]]))


def test_mean_std():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert mean_std([5.0])["std"] == 0.0
