"""The dashboard's statistics against values computed by hand and printed t tables."""

from __future__ import annotations

import math

import pytest

from moa.dashboard.stats import (
    BETTER,
    NOT_DISTINGUISHABLE,
    WORSE,
    Summary,
    compare,
    regularized_beta,
    summarize,
    t_cdf,
    t_quantile,
    welch_df,
)

# t_{0.975, df} as every statistics textbook's table prints it (3 decimals)
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 20: 2.086,
           30: 2.042, 120: 1.980}


@pytest.mark.parametrize("df, expected", sorted(T_TABLE.items()))
def test_t_quantile_matches_the_printed_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_in_closed_form_and_at_the_normal_limit():
    # df = 1 is the Cauchy distribution: t_p = tan(pi (p - 1/2)); df = 2: 2(p-1/2)/sqrt(...)
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        alpha = 4 * p * (1 - p)
        assert t_quantile(p, 2) == pytest.approx(2 * (p - 0.5) * math.sqrt(2 / alpha), rel=1e-9)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)  # the normal's


def test_t_cdf_and_quantile_invert_each_other_at_fractional_df():
    for df in (0.6, 1.5, 3.2347, 7.5, 55.1):
        for p in (0.55, 0.8, 0.975, 0.999):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)
        assert t_cdf(-1.3, df) == pytest.approx(1 - t_cdf(1.3, df), abs=1e-14)


def test_regularized_beta_known_values():
    assert regularized_beta(1, 1, 0.3) == pytest.approx(0.3)  # uniform
    assert regularized_beta(2, 3, 0.4) == pytest.approx(0.5248)  # 1 - sum of binomials
    assert regularized_beta(0.5, 0.5, 0.5) == pytest.approx(0.5)  # symmetric


def test_against_scipy_where_it_is_installed():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 1.7, 2, 3.2347, 9, 29.5, 400):
        for p in (0.75, 0.95, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)


def test_summary_of_one_to_four():
    summary = summarize([1.0, 2.0, 3.0, 4.0])
    # mean 2.5; s^2 = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; half width t_{.975,3} s / 2
    assert summary.n == 4 and summary.mean == 2.5
    assert summary.std == pytest.approx(math.sqrt(5 / 3))
    assert summary.ci95 == pytest.approx((2.5 - 2.05426, 2.5 + 2.05426), abs=1e-5)


def test_one_run_has_a_mean_and_no_spread():
    assert summarize([1.7]) == Summary(1, 1.7, None, None)
    assert summarize([]) is None


def test_welch_degrees_of_freedom_by_hand():
    # a = 1, 2, 3, 4 (s^2 = 5/3, n 4); b = 2, 4, 6 (s^2 = 4, n 3):
    # (5/12 + 4/3)^2 / ((5/12)^2 / 3 + (4/3)^2 / 2) = 3.0625 / 0.946759... = 3.23472
    assert welch_df(math.sqrt(5 / 3), 4, 2.0, 3) == pytest.approx(3.234719, abs=1e-6)
    # equal variances and sizes: n_a + n_b - 2
    assert welch_df(1.0, 5, 1.0, 5) == pytest.approx(8.0)


def test_the_difference_and_its_welch_interval_by_hand():
    group, baseline = summarize([1.0, 2.0, 3.0, 4.0]), summarize([2.0, 4.0, 6.0])
    difference = compare(group, baseline, "val_loss")
    # -1.5 +- t_{.975, 3.2347} (3.0557) x sqrt(5/12 + 4/3) (1.32288) = 4.04233
    assert difference.delta == -1.5
    assert difference.delta_ci95 == pytest.approx((-5.54233, 2.54233), abs=1e-5)
    assert difference.verdict == NOT_DISTINGUISHABLE


@pytest.mark.parametrize("metric, shift, verdict", [
    ("val_loss", -0.5, BETTER), ("val_loss", 0.5, WORSE), ("test_ppl", -0.5, BETTER),
    ("val_acc", 0.5, BETTER), ("test_acc", -0.5, WORSE), ("val_loss", 0.001, NOT_DISTINGUISHABLE),
])
def test_verdict_follows_the_direction_of_the_metric(metric, shift, verdict):
    baseline = summarize([2.0, 2.01, 1.99])
    group = summarize([2.0 + shift, 2.01 + shift, 1.99 + shift])
    assert compare(group, baseline, metric).verdict == verdict


def test_below_two_runs_a_side_nothing_is_distinguishable():
    difference = compare(summarize([1.0]), summarize([5.0, 5.1, 5.2]), "val_loss")
    assert difference.delta == pytest.approx(-4.1)
    assert difference.delta_ci95 is None and difference.verdict == NOT_DISTINGUISHABLE
