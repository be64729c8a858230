"""Statistics for comparing training methods: spread over seeds and paired intervals.

A method's accuracy on the benchmark varies for two reasons: the training seed (initial step
sizes, batch order) and which people happen to be in the test set. A difference between two
methods trained from the same seeds and tested on the same people is *paired*: both sources of
noise partly cancel. :func:`paired_interval` treats the per-(seed, subject) differences
``d[s, i]`` as a two-way random-effects layout, ``d = mu + a_s + b_i + e_si``, so its interval
covers both the seed-to-seed spread of the methods' difference and the subject-to-subject one:

``Var(mean d) = (MS_seed + MS_subject - MS_residual) / (S * N)``

with Satterthwaite's degrees of freedom for the t quantile. With one seed it reduces to the
interval over subjects; the seed term is what keeps three seeds from looking like certainty.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with (possibly fractional) ``df`` degrees of freedom, by bisection on its CDF.

    Satterthwaite's degrees of freedom are not integers, so a table will not do; this avoids a
    SciPy dependency. Accurate to ~1e-9.
    """
    if not 0 < p < 1:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if df <= 0 or not math.isfinite(df) or df > 1e7:
        return _normal_quantile(p)
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t: ``1 - I_x(df/2, 1/2) / 2`` for ``t >= 0`` with ``x = df / (df + t^2)``."""
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2, 0.5, x)
    return 1 - tail if t >= 0 else tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` by Lentz's continued fraction (Numerical Recipes)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        num = m * (b - m) * x / ((a + m2 - 1) * (a + m2))
        d = 1 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + num / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        num = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + num / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-14:
            break
    return front * h / a


def _normal_quantile(p: float) -> float:
    """Acklam's rational approximation of the standard normal quantile (|error| < 1.2e-9)."""
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
         -3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
         -1.328068155288572e01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
         4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    if not 0 < p < 1:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    lo = 0.02425
    if p < lo:
        q = math.sqrt(-2 * math.log(p))
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    if p > 1 - lo:
        return -_normal_quantile(1 - p)
    q = p - 0.5
    r = q * q
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)


@dataclass(frozen=True)
class PairedInterval:
    """Mean paired difference with its confidence interval and the parts of its variance."""

    mean: float
    low: float
    high: float
    df: float
    seeds: int
    subjects: int
    #: standard deviation over seeds of the per-seed mean difference
    seed_sd: float

    def as_dict(self) -> Dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "df": self.df, "seeds": self.seeds,
                "subjects": self.subjects, "seed_sd": self.seed_sd}

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired_interval(diff: np.ndarray, level: float = 0.95) -> PairedInterval:
    """Interval for the mean of ``diff[seed, subject]`` (method A minus method B, same seeds and subjects).

    Two-way random effects without replication; the variance of the grand mean is estimated from
    the ANOVA mean squares and the t quantile uses Satterthwaite's degrees of freedom. Rows with
    NaN (a subject without probes) are not allowed: pass complete ``[S, N]`` arrays.
    """
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 2:
        raise ValueError(f"paired_interval: expected [seeds, subjects] with >= 2 subjects, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("paired_interval: differences must be finite")
    s, n = d.shape
    grand = float(d.mean())
    seed_means = d.mean(axis=1)
    subj_means = d.mean(axis=0)
    q = (1 + level) / 2
    if s == 1:
        var = float(d.var(ddof=1)) / n
        df = float(n - 1)
    else:
        ms_seed = n * float(((seed_means - grand) ** 2).sum()) / (s - 1)
        ms_subj = s * float(((subj_means - grand) ** 2).sum()) / (n - 1)
        resid = d - seed_means[:, None] - subj_means[None, :] + grand
        ms_res = float((resid**2).sum()) / ((s - 1) * (n - 1))
        num = max(ms_seed + ms_subj - ms_res, ms_res, 1e-18)
        var = num / (s * n)
        den = ms_seed**2 / (s - 1) + ms_subj**2 / (n - 1) + ms_res**2 / ((s - 1) * (n - 1))
        df = num**2 / den if den > 0 else float(s * n - 1)
    half = t_quantile(q, df) * math.sqrt(var)
    return PairedInterval(mean=grand, low=grand - half, high=grand + half, df=df, seeds=s, subjects=n,
                          seed_sd=float(seed_means.std(ddof=1)) if s > 1 else 0.0)


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}
