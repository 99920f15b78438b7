"""The arithmetic of a paired comparison: means, the 95 % t-interval over seeds, the verdict."""

from __future__ import annotations

import math
from typing import Optional, Sequence

__all__ = ["T975", "t_quantile", "mean_std", "paired_difference", "verdict", "direction",
           "METHOD"]

#: Student's t, 0.975 quantile (two-sided 95 %), for 1..30 degrees of freedom.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
#: The normal 0.975 quantile, used beyond 30 degrees of freedom.
Z975 = 1.960

METHOD = "paired t-interval over seeds"


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom: scipy's where scipy is
    installed, else :data:`T975` (and the normal quantile beyond 30)."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom; got {df}")
    try:
        from scipy.stats import t
    except ImportError:
        return T975[df - 1] if df <= len(T975) else Z975
    return float(t.ppf(0.975, df))


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1); the std is None for a single value."""
    n = len(values)
    if n == 0:
        return float("nan"), None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_difference(arm: Sequence[float], base: Sequence[float],
                      quantile=t_quantile) -> tuple[float, list[float]]:
    """Mean of ``arm[i] - base[i]`` (the same seed in both) and its 95 % t-interval."""
    if len(arm) != len(base):
        raise ValueError(f"paired values differ in count: {len(arm)} and {len(base)}")
    diffs = [a - b for a, b in zip(arm, base)]
    mean, std = mean_std(diffs)
    if std is None:
        raise ValueError("a confidence interval needs at least 2 paired values")
    half = quantile(len(diffs) - 1) * std / math.sqrt(len(diffs))
    return mean, [mean - half, mean + half]


def verdict(ci95: Sequence[float], seeds: int, words: tuple[str, str] = ("better", "worse")
            ) -> str:
    """``better`` (``words[0]``) when the whole interval is above 0, ``worse`` (``words[1]``)
    when below, else that no difference can be resolved with this many seeds."""
    lo, hi = ci95
    if lo > 0:
        return words[0]
    if hi < 0:
        return words[1]
    return f"no difference resolvable with {seeds} seeds"


def direction(ci95: Sequence[float], seeds: int) -> str:
    """:func:`verdict` for a measure that is neither better nor worse by its sign (max |x|,
    entropy): ``higher`` or ``lower``."""
    return verdict(ci95, seeds, ("higher", "lower"))
