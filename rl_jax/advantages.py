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

Adaptive RED-Weight (``red_weight_temperature``) chooses the temperature of the weight
A exp(A / T) per step from the advantages and response lengths, so that the token-weighted sum
of the weighted advantages is not negative (Chen et al., 2026, "Connect the Dots"; Trinity-RFT
``trinity/algorithm/advantage_fn/cod_advantage.py``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rl_jax import groups
from rl_jax.algorithms import ADAPTIVE_TEMP_LEVELS, AdvantageConfig

# Adaptive RED-Weight's bisection (Trinity-RFT cod_advantage.py, version "bisection").
TEMP_LOW, TEMP_HIGH = 0.8, 100.0
TEMP_TOLERANCE = 0.05
TEMP_MAX_HALVINGS = 20


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


def red_weight_sum(advantages: jax.Array, lengths: jax.Array, temperature) -> jax.Array:
    """S(T) = sum_i A_i exp(A_i / T) L_i, the token-weighted sum of RED-Weight's advantages.

    T = inf gives sum_i A_i L_i (no reweighting). S is strictly decreasing in T when some A_i
    is not 0: dS/dT = -sum_i A_i^2 exp(A_i / T) L_i / T^2.
    """
    return jnp.sum(advantages * jnp.exp(advantages / temperature) * lengths)


def red_weight_temperature(advantages: jax.Array, lengths: jax.Array) -> jax.Array:
    """Adaptive RED-Weight's temperature T of one set of responses: float32 scalar, inf when
    there is nothing to reweight.

    The rule of Trinity-RFT ``trinity/algorithm/advantage_fn/cod_advantage.py``
    (``red_weight_adaptive_temp``, version ``"bisection"``; Chen et al., 2026), with
    S(T) = sum_i A_i exp(A_i / T) L_i (``red_weight_sum``):

      if S(inf) = sum_i A_i L_i >= 0: T = inf (the weight is A_i itself);
      else: lo, hi = 0.8, 100; repeat at most 20 times:
                mid = (lo + hi) / 2
                if S(mid) < 0: hi = mid  else: lo = mid
                if hi - lo < 0.05: stop
            T = mid, the last midpoint (not the final lo or hi).

    S decreases in T, so the bisection brackets the root T* of S (S >= 0 below it, < 0 above)
    and the answer lies within 0.05 of it, on either side: S(T) may be slightly negative. The
    width after k halvings is 99.2 / 2^k, so the loop always stops after 11 halvings (width
    0.0484375) and the cap of 20 never binds; hence T is one of the points 0.8 + j * 0.0484375:
    0.8484375 when S < 0 even at the lower end (T* < 0.8), 99.9515625 when S >= 0 at every
    midpoint. The sums are float32 here (float64 in the source): a sign decided by rounding
    can move T by one grid step. A sum A_i L_i that rounds to a tiny negative number (equal
    lengths, advantages summing to 0) gives T = 99.95, whose weights are within 1% of A_i.

    Args:
      advantages: ``[n]`` group-relative scores A_i (group-mean baseline, no std
        normalisation in the source).
      lengths: ``[n]`` response lengths L_i in tokens.

    Returns:
      float32 scalar T in [0.8, 100] or inf. Traceable (``lax.while_loop``), works under vmap.
    """
    chex.assert_rank([advantages, lengths], 1)
    advantages = advantages.astype(jnp.float32)
    lengths = lengths.astype(jnp.float32)
    sign_at = lambda temp: red_weight_sum(advantages, lengths, temp) < 0

    def halve(state):
        halvings, lo, hi, _ = state
        mid = (lo + hi) / 2
        negative = sign_at(mid)
        return halvings + 1, jnp.where(negative, lo, mid), jnp.where(negative, mid, hi), mid

    def go_on(state):
        halvings, lo, hi, _ = state
        return (halvings < TEMP_MAX_HALVINGS) & ~(hi - lo < TEMP_TOLERANCE)

    start = (jnp.int32(0), jnp.float32(TEMP_LOW), jnp.float32(TEMP_HIGH), jnp.float32(jnp.nan))
    *_, mid = jax.lax.while_loop(go_on, halve, start)
    return jnp.where(sign_at(jnp.inf), mid, jnp.inf)


def red_weight_temperatures(advantages: jax.Array, lengths: jax.Array, level: str) -> jax.Array:
    """``red_weight_temperature`` of the whole batch or of each group.

    Args:
      advantages, lengths: ``[num_groups, group_size]``.
      level: ``"batch"`` (one T for all rows, the source's default) or ``"group"`` (one T per
        prompt's group, the source's level ``"task"``).

    Returns:
      ``[1]`` (batch) or ``[num_groups]`` (group) float32 temperatures.
    """
    chex.assert_rank([advantages, lengths], 2)
    chex.assert_equal_shape([advantages, lengths])
    if level not in ADAPTIVE_TEMP_LEVELS[1:]:
        raise ValueError(f"level must be one of {ADAPTIVE_TEMP_LEVELS[1:]}, got {level!r}")
    if level == "batch":
        return red_weight_temperature(advantages.reshape(-1), lengths.reshape(-1))[None]
    return jax.vmap(red_weight_temperature)(advantages, lengths)
