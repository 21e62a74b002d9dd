"""Group-relative advantages (arXiv 2509.24203 §3 and its RED family).

For one prompt the sampler draws a group of G responses with rewards R_1..R_G. Group-relative
REINFORCE uses the group's mean reward as the baseline:

    A_i = R_i - mean(R)                                   (std_normalize=False)
    A_i = (R_i - mean(R)) / (std(R) + std_eps)            (std_normalize=True, GRPO)

with the population std. RED-Drop (``drop="balance"``) first balances the group: responses with
R_i >= mean(R) are positives; when negatives outnumber positives, a uniformly random surplus of
negatives is dropped (A = 0) and mean/std are recomputed over the kept responses. Dropped responses
keep their tokens in the loss denominator (the caller does nothing special for them).

All functions take ``rewards`` of shape ``[num_groups, group_size]`` and work under ``jit`` and
``vmap``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rl_jax import groups
from rl_jax.algorithms import AdvantageConfig


def _group_mean(rewards: jax.Array, keep: jax.Array) -> jax.Array:
    """Mean of the kept rewards per group, ``[num_groups, 1]``.

    Computed as ``min + mean(R - min)`` so that a group of identical rewards gets a mean equal to
    them bit for bit, hence advantages of exactly zero (a plain mean can be off by an ulp).
    """
    shift = jnp.min(jnp.where(keep, rewards, jnp.inf), axis=-1, keepdims=True)
    centred = jnp.where(keep, rewards - shift, 0.0)
    count = jnp.sum(keep, axis=-1, keepdims=True)
    return shift + jnp.sum(centred, axis=-1, keepdims=True) / count


def balance_drop_mask(rewards: jax.Array, key: jax.Array) -> jax.Array:
    """RED-Drop: which responses to drop so that negatives do not outnumber positives.

    Positives are R_i >= mean(R) (the group maximum always counts as positive). If a group has
    n_neg > n_pos, ``n_neg - n_pos`` of its negatives, chosen uniformly at random with ``key``,
    are dropped. Deterministic given ``key``.

    Args:
      rewards: ``[num_groups, group_size]``.
      key: a JAX PRNG key.

    Returns:
      ``[num_groups, group_size]`` bool, True where the response is dropped.
    """
    chex.assert_rank(rewards, 2)
    rewards = rewards.astype(jnp.float32)
    mean = _group_mean(rewards, jnp.ones_like(rewards, dtype=bool))
    is_pos = (rewards >= mean) | (rewards == jnp.max(rewards, axis=-1, keepdims=True))
    num_pos = jnp.sum(is_pos, axis=-1, keepdims=True)
    surplus = jnp.maximum(rewards.shape[-1] - 2 * num_pos, 0)
    # Rank negatives by a uniform score; the `surplus` lowest-ranked ones are dropped.
    score = jnp.where(is_pos, jnp.inf, jax.random.uniform(key, rewards.shape))
    rank = jnp.argsort(jnp.argsort(score, axis=-1), axis=-1)
    return ~is_pos & (rank < surplus)


def group_advantages(
    rewards: jax.Array, config: AdvantageConfig, key: jax.Array | None = None
) -> jax.Array:
    """Group-relative advantages, see the module docstring for the equations.

    Args:
      rewards: ``[num_groups, group_size]`` float rewards; ``group_size`` must be >= 2.
      config: an ``AdvantageConfig``.
      key: PRNG key, required when ``config.drop == "balance"``.

    Returns:
      ``[num_groups, group_size]`` float32 advantages (0 for dropped responses).
    """
    chex.assert_rank(rewards, 2)
    groups.check_group_size(rewards.shape[-1])  # rewards are [num_groups, group_size]
    rewards = rewards.astype(jnp.float32)
    if config.drop == "balance":
        if key is None:
            raise ValueError('drop="balance" needs a PRNG key: group_advantages(..., key=key)')
        keep = ~balance_drop_mask(rewards, key)
    else:
        keep = jnp.ones_like(rewards, dtype=bool)
    # At least two responses are kept (all of them, or 2 * n_pos >= 2), so count > 0 below.
    count = jnp.sum(keep, axis=-1, keepdims=True)
    mean = _group_mean(rewards, keep)
    centred = jnp.where(keep, rewards - mean, 0.0)
    if config.std_normalize:
        std = jnp.sqrt(jnp.sum(centred**2, axis=-1, keepdims=True) / count)
        centred = centred / (std + config.std_eps)
    return centred
