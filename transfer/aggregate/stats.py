"""Student-t statistics for the comparison tables: confidence intervals over seeds and paired t-tests.

scipy is not a dependency, so the t distribution is computed here: its CDF through the
regularized incomplete beta function (a continued fraction, Numerical Recipes' `betacf`),
its quantile by bisection on that CDF.
"""

import math
from dataclasses import dataclass
from functools import lru_cache

_TINY = 1e-300  # keeps the continued fraction's denominators off zero (Lentz's method)
# values whose spread is below this share of their size are one value: a mean of equal values summed in another order
# differs from them in the last bits (7.58 three times has a pandas std of 1.1e-15), which is no spread over seeds
ROUNDING = 1e-9


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # the fraction converges fast only below the mode; above it, use the symmetry I_x(a, b) = 1 - I_{1-x}(b, a)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float, max_terms: int = 500, eps: float = 1e-15) -> float:
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, max_terms + 1):
        even = m * (b - m) * x / ((a - 1.0 + 2 * m) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1.0 + 2 * m))
        for coefficient in (even, odd):
            d = 1.0 + coefficient * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + coefficient / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta I_{x}({a}, {b}) did not converge in {max_terms} terms")


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = t_two_sided_p(t, df) / 2.0
    return 1.0 - tail if t >= 0 else tail


@lru_cache(maxsize=1024)  # a table asks the same few (q, df) for every row and metric
def t_quantile(q: float, df: float) -> float:
    """The t such that P(T <= t) = q, by bisection on t_cdf (to about 1e-12)."""
    if not 0.0 < q < 1.0 or df <= 0:
        raise ValueError(f"t quantile needs 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < q:
        low, high = high, high * 2.0
    while high - low > 1e-12 * max(1.0, high):
        mid = (low + high) / 2.0
        low, high = (mid, high) if t_cdf(mid, df) < q else (low, mid)
    return (low + high) / 2.0


def sample_std(values) -> float:
    """The sample standard deviation (n - 1) of the values; NaN for fewer than two, 0 where they are equal up to
    float rounding (ROUNDING): a table shows no interval for them, as for values that are equal."""
    values = [float(v) for v in values]
    n = len(values)
    if n < 2:
        return math.nan
    if max(values) - min(values) <= ROUNDING * max(abs(v) for v in values):
        return 0.0
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def ci95_half_width(std: float, n: int) -> float:
    """Half-width of the 95 % t confidence interval of a mean of n values with sample std `std`; NaN for n < 2."""
    if n < 2 or std is None or math.isnan(std):
        return math.nan
    return t_quantile(0.975, n - 1) * std / math.sqrt(n)


@dataclass(frozen=True)
class PairedTest:
    """A paired t-test of differences: their count, mean, 95 % interval half-width and two-sided p-value."""

    n: int
    mean: float
    half_width: float
    p: float

    @property
    def significant(self) -> bool:
        """Whether the 95 % interval excludes 0 (p < 0.05); never for fewer than two pairs."""
        return self.n >= 2 and self.p < 0.05


def paired_t_test(differences: list[float]) -> PairedTest:
    """Mean difference, its 95 % t interval and the two-sided p-value of H0: mean difference = 0.

    With fewer than two pairs there is no spread to test against: half-width and p are NaN.
    Differences that are all equal (up to float rounding, sample_std) have no spread either: p is 0 when they are
    not 0, 1 when they are.
    """
    n = len(differences)
    mean = math.fsum(differences) / n if n else math.nan
    if n < 2:
        return PairedTest(n, mean, math.nan, math.nan)
    std = sample_std(differences)
    if std == 0.0:
        return PairedTest(n, mean, 0.0, 1.0 if mean == 0.0 else 0.0)
    t = mean / (std / math.sqrt(n))
    return PairedTest(n, mean, ci95_half_width(std, n), t_two_sided_p(t, n - 1))
