"""Confidence intervals over seeds: the 95% t-interval of a mean.

With n seeds and per-seed values x_1..x_n, the 95% interval of their mean is
mean(x) +- t_{0.975, n-1} * std(x, ddof=1) / sqrt(n).
"""

from __future__ import annotations

import numpy as np

# Student t quantiles t_{0.975, df} for df = 1..30 (two-sided 95% intervals).
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mean_interval(values, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean, half-width of the 95% t-interval) over `axis`; a width of NaN for one value."""
    values = np.asarray(values, np.float64)
    n = values.shape[axis]
    mean = values.mean(axis=axis)
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    t = T_975[min(n - 1, len(T_975)) - 1]
    return mean, t * values.std(axis=axis, ddof=1) / np.sqrt(n)


def describe(mean: float, half: float) -> str:
    """'0.912 +- 0.031' (the mean alone when the width is undefined; '-' without a value)."""
    if np.isnan(mean):
        return "-"
    return f"{mean:.3f}" if np.isnan(half) else f"{mean:.3f} +- {half:.3f}"
