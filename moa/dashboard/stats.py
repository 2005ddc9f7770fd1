"""The statistics of a group of seeds: mean, standard deviation, a 95% confidence interval
(Student t), and a difference to a baseline group (Welch's t interval) with its verdict.

The t quantiles come from the regularized incomplete beta function (a continued fraction,
Numerical Recipes' `betacf`), inverted by bisection: no scipy needed to read runs. Welch's
degrees of freedom are not whole numbers, so the quantile takes any df > 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95
BETTER = "better"
WORSE = "worse"
NOT_DISTINGUISHABLE = "not distinguishable"


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converged to 1e-15."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return fraction


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # where the fraction converges fast
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(probability: float, df: float) -> float:
    """The t with P(T <= t) = probability (0.5 < probability < 1), by bisection to 1e-12."""
    if not 0.5 < probability < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0.5 < probability < 1 and df > 0, "
                         f"got {probability}, {df}")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < probability:
        low, high = high, 2.0 * high
    while high - low > 1e-12 * max(1.0, high):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if t_cdf(middle, df) < probability else (low, middle)
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Summary:
    """A metric over a group's runs: n, mean, sample standard deviation (None for n < 2)
    and the 95% confidence interval of the mean (Student t; None for n < 2)."""

    n: int
    mean: float
    std: float | None
    ci95: tuple[float, float] | None


def summarize(values: list[float]) -> Summary | None:
    """None for no values."""
    n = len(values)
    if n == 0:
        return None
    mean = math.fsum(values) / n
    if n < 2:
        return Summary(n, mean, None, None)
    std = math.sqrt(math.fsum((value - mean) ** 2 for value in values) / (n - 1))
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, (mean - half, mean + half))


def welch_df(std_a: float, n_a: int, std_b: float, n_b: int) -> float:
    """The Welch-Satterthwaite degrees of freedom of mean(a) - mean(b)."""
    var_a, var_b = std_a ** 2 / n_a, std_b ** 2 / n_b
    return (var_a + var_b) ** 2 / (var_a ** 2 / (n_a - 1) + var_b ** 2 / (n_b - 1))


def lower_is_better(metric: str) -> bool:
    """Losses and perplexities fall as a model improves; accuracies rise."""
    return not metric.endswith("acc")


@dataclass(frozen=True)
class Difference:
    """mean(group) - mean(baseline), its 95% Welch interval (None below 2 runs a side) and
    the verdict: better or worse where the interval excludes 0, else not distinguishable."""

    delta: float
    delta_ci95: tuple[float, float] | None
    verdict: str


def compare(group: Summary, baseline: Summary, metric: str) -> Difference:
    delta = group.mean - baseline.mean
    if group.std is None or baseline.std is None:
        return Difference(delta, None, NOT_DISTINGUISHABLE)
    standard_error = math.sqrt(group.std ** 2 / group.n + baseline.std ** 2 / baseline.n)
    if standard_error == 0.0:  # every run of both groups alike: the difference is exact
        interval = (delta, delta)
    else:
        df = welch_df(group.std, group.n, baseline.std, baseline.n)
        half = t_quantile(0.5 + CONFIDENCE / 2, df) * standard_error
        interval = (delta - half, delta + half)
    if interval[0] > 0 or interval[1] < 0:
        lower = interval[1] < 0
        verdict = BETTER if lower == lower_is_better(metric) else WORSE
    else:
        verdict = NOT_DISTINGUISHABLE
    return Difference(delta, interval, verdict)
