"""Non-finite guards: a NaN or inf must stop a run where it enters, not spread into the state.

Two entry points, checked on every step:
- rewards, at the task boundary (`check_rewards`): one NaN reward turns its whole group's
  advantages NaN, and for a clipped loss the logged loss can still read 0.0 while the gradient
  is NaN. Rejected with the offending completion and prompt rather than masked and counted: a
  non-finite reward is a bug in the reward function, and masking it would train on a biased
  batch while hiding the bug behind a counter.
- the update (`keep_if_finite` inside the jitted update, `check_update` on the host): when the
  loss or the gradient norm is not finite, the jitted update returns the state it was given, so
  the bad update is never applied, and the loop raises `NonFiniteError` before anything (metrics
  line or checkpoint) of that step is written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The learner metrics whose non-finite value means the update must not be applied.
GUARDED_METRICS = ("loss", "grad_norm")


class NonFiniteError(RuntimeError):
    """A learner step produced a non-finite loss or gradient; the run stops without applying it."""


def check_rewards(rewards: np.ndarray, completions: Sequence[str], prompts: Sequence[str]) -> None:
    """Raises ValueError naming the first completion (and its prompt) whose reward is NaN or inf.

    rewards: `[batch]`; completions, prompts: the `batch` response and prompt texts, row-aligned.
    """
    bad = np.flatnonzero(~np.isfinite(np.asarray(rewards, np.float64)))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"the task's reward is {float(rewards[row])} (rewards must be finite) for the "
            f"completion {completions[row]!r} of the prompt {prompts[row]!r} "
            f"(row {row}; {bad.size} of {len(rewards)} rewards in the batch are not finite)"
        )


def update_is_finite(metrics: Mapping[str, jax.Array]) -> jax.Array:
    """Scalar bool: every metric of `GUARDED_METRICS` is finite (traceable, for the update)."""
    return jnp.all(jnp.stack([jnp.isfinite(metrics[name]) for name in GUARDED_METRICS]))


def keep_if_finite(finite: jax.Array, new_tree, old_tree):
    """`new_tree` where `finite`, else `old_tree`, leaf by leaf (inside jit: no host round trip)."""
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_tree, old_tree)


def check_update(step: int, metrics: Mapping[str, float], seed: int | None = None) -> None:
    """Raises NonFiniteError naming the step (and `seed`, if given) and each non-finite metric."""
    bad = {name: metrics[name] for name in GUARDED_METRICS if not math.isfinite(metrics[name])}
    if bad:
        values = ", ".join(f"{name}={value}" for name, value in bad.items())
        shown = ", ".join(f"{name}={metrics[name]:.4g}" for name in GUARDED_METRICS)
        where = f"step {step}" if seed is None else f"step {step} of seed {seed}"
        raise NonFiniteError(
            f"{where}: non-finite {values} ({shown}); the update was not applied and "
            "nothing of this step was saved: resume from the last checkpoint after fixing the "
            "cause (e.g. a lower learning_rate)"
        )
