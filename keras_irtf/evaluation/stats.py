"""Paired comparisons of runs (numpy only; scipy is not a dependency).

The ablation pairs every cell's run with L_CE's run of the SAME seed (the same data order and,
for the shared parts, the same initialisation) and tests the mean of the per-seed differences
with a two-sided paired t-test (Student's t with n - 1 degrees of freedom), giving the p-value
and the 95% confidence interval of the mean difference.

Student's t distribution function is computed from the regularised incomplete beta function
(continued fraction, modified Lentz), its quantile by bisection.

`holm_adjust` corrects a family of such tests for multiplicity (Holm's step-down method, which
controls the family-wise error rate under any dependence between the tests).
"""

from __future__ import annotations

import math

import numpy as np


def _betacf(a, b, x, iters=300, eps=3e-16):
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection; |t| < 1e6)."""
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def paired_t_test(values, baseline, level: float = 0.95) -> dict:
    """Two-sided paired t-test of mean(values - baseline) = 0 (the two aligned by seed).

    Returns {"n", "mean", "sd", "t", "p", "ci": (low, high)}; with n < 2, or differences that are
    all equal but not zero (no spread: t is undefined, and recall's steps make equal differences
    happen by chance with few seeds), p, t and the interval are nan (no test possible); p = 1 for
    identical pairs. Differences whose spread is below 1e-9 of the values' magnitude count as
    equal: two equal recall steps differ by float rounding only."""
    values, baseline = np.asarray(values, np.float64), np.asarray(baseline, np.float64)
    d = values - baseline
    n = int(d.size)
    mean = float(d.mean()) if n else float("nan")
    if n < 2:
        return {"n": n, "mean": mean, "sd": float("nan"), "t": float("nan"), "p": float("nan"),
                "ci": (float("nan"), float("nan"))}
    sd = float(d.std(ddof=1))
    rounding = 1e-9 * max(float(np.abs(values).max()), float(np.abs(baseline).max()))
    if sd <= rounding:
        sd = 0.0
        mean = 0.0 if abs(mean) <= rounding else mean
    if sd == 0.0:
        if mean == 0.0:
            return {"n": n, "mean": 0.0, "sd": 0.0, "t": 0.0, "p": 1.0, "ci": (0.0, 0.0)}
        return {"n": n, "mean": mean, "sd": 0.0, "t": float("nan"), "p": float("nan"),
                "ci": (float("nan"), float("nan"))}
    se = sd / math.sqrt(n)
    t = mean / se
    p = 2.0 * (1.0 - t_cdf(abs(t), n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    return {"n": n, "mean": mean, "sd": sd, "t": t, "p": p, "ci": (mean - half, mean + half)}


def holm_adjust(p_values) -> np.ndarray:
    """Holm-adjusted p-values of a family of tests, in the given order: with the m finite p-values
    sorted, p_(1) <= ... <= p_(m), the adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)).
    A test is rejected at family-wise level alpha when its adjusted p < alpha. NaN entries (no
    test) stay NaN and do not count in m."""
    p = np.asarray(p_values, np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    m = finite.size
    running = 0.0
    for rank, i in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


__all__ = ["betainc", "holm_adjust", "paired_t_test", "t_cdf", "t_quantile"]
