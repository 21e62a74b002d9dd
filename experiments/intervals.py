"""Confidence intervals over seeds: the t-interval of a mean and of a paired difference.

The interval of a mean lives in `rl_jax.intervals` (`rl_jax.evaluate` reports it too). Runs of
different algorithms with the same seed share their warm start, prompts and sampler keys, so
comparisons use the paired differences d_i = x_i - y_i and the same interval over d.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from rl_jax.intervals import T_975, describe, mean_interval

__all__ = ["T_975", "describe", "mean_interval", "per_seed"]


def per_seed(seed_metrics: Sequence[Sequence[Mapping]], key: str, *, step=None, tail=None):
    """`[seeds]` values of `key`: at learner `step`, or the mean of the last `tail` records."""
    out = []
    for records in seed_metrics:
        values = [(m["step"], m[key]) for m in records if key in m]
        if step is not None:
            out.append(next((v for s, v in values if s == step), np.nan))
        else:
            out.append(np.mean([v for _, v in values[-tail:]]) if values else np.nan)
    return np.asarray(out, np.float64)
