"""Policy-loss kernels and KL estimators (arXiv 2509.24203 §3; DESIGN.md §3).

Per response token: ``logp`` (current policy, carries the gradient), ``behaviour_logp`` (the
sampler's log-prob, recorded at sampling time), the sequence's advantage ``A`` and ``mask`` (1 on
response tokens). The ratio ``r = exp(logp - behaviour_logp)`` is under stop-gradient. The
per-token loss of every group-relative REINFORCE variant is

    loss_t = -weight(A, r) * logp_t * in_range(r, A) + regulariser_t

aggregated over response tokens, so its gradient w.r.t. ``logp_t`` is
``(-weight * in_range + d regulariser_t / d logp_t) / denominator``. One small function per
variant axis: ``in_range_mask`` (clip), ``weighted_advantages`` (weight), ``regularizer_loss`` and
``aggregate_loss``; ``policy_loss`` composes them.

Numerical bounds (why the loss and its gradient stay finite for any finite inputs):
  * log-ratios are clamped to ``[-log_ratio_bound, log_ratio_bound]`` (default 20, so
    ``r <= exp(20) ~ 4.9e8``) before ``exp``. The bound is validated to lie outside every clip
    threshold, so clamping never changes a clip decision, only the IS weight of extreme tokens.
    Hits are counted in ``ratio/log_clamped_frac`` (tokens) and ``ratio/seq_log_clamped_frac``
    (sequences, GSPO sequence ratio).
  * RED-Weight's exponent ``A / weight_temp`` is clamped from above at ``weight_exp_bound``
    (default 20); hits are counted in ``weight/exp_clamped_frac``. ``exp`` of a very negative
    exponent underflows to 0, which is harmless.
  * positions with ``mask == 0`` are replaced by 0 before any arithmetic, so padding garbage
    (even NaN) never reaches the loss or the gradient; an all-zero mask gives loss 0.

Exact aggregation across micro-batches and devices: pass the global ``denominator`` (from
``loss_denominator`` summed over all shards) to every shard's ``policy_loss`` and sum the losses.
Metrics come back as local means together with their weights ``num_tokens`` and
``num_sequences``; ``aggregate_metrics`` combines stacked per-shard metrics exactly (weighted
means, min of mins, max of maxes, sums of counts).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from rl_jax.algorithms import LossConfig

# How each policy_loss metric combines across shards (see aggregate_metrics).
METRIC_REDUCTIONS = {
    "pg_clipfrac": "token_mean",
    "ratio/mean": "token_mean",
    "ratio/min": "min",
    "ratio/max": "max",
    "ratio/log_clamped_frac": "token_mean",
    "ratio/seq_log_clamped_frac": "seq_mean",
    "weight/exp_clamped_frac": "token_mean",
    "num_tokens": "sum",
    "num_sequences": "sum",
}


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """``sum(x * mask)``; positions with mask 0 contribute exactly 0, even if x is NaN/inf."""
    return jnp.sum(jnp.where(mask != 0, x * mask, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """``sum(x * mask) / sum(mask)`` over ``axis`` (all axes by default); 0 where the mask is empty."""
    count = jnp.sum(mask, axis=axis)
    return masked_sum(x, mask, axis) / jnp.where(count > 0, count, 1.0)


def in_range_mask(
    ratio: jax.Array, seq_ratio: jax.Array, advantages: jax.Array, config: LossConfig
) -> jax.Array:
    """Clip mask: which tokens keep their policy-gradient term (arXiv 2509.24203 §3, DESIGN.md §3).

    With ``lo = 1 - eps_low``, ``hi = 1 + eps_high``:
      none:          all tokens.
      one-side:      (A >= 0 and r <= hi) or (A <= 0 and r >= lo).
      two-side:      lo <= r <= hi.
      ring:          lo <= r <= hi, or (A >= 0 and r <= 1 - ring_eps_low),
                     or (A <= 0 and r >= 1 + ring_eps_high).
      gspo-one-side: one-side with the sequence ratio ``s`` in place of ``r``.

    Args:
      ratio: ``[batch, seq]`` token ratios r.
      seq_ratio: ``[batch]`` sequence ratios s (only read by ``gspo-one-side``).
      advantages: ``[batch]``.

    Returns:
      ``[batch, seq]`` bool.
    """
    adv = advantages[:, None]
    lo, hi = 1.0 - config.eps_low, 1.0 + config.eps_high

    def one_side(r):
        return ((adv >= 0) & (r <= hi)) | ((adv <= 0) & (r >= lo))

    if config.clip == "none":
        return jnp.ones(ratio.shape, dtype=bool)
    if config.clip == "one-side":
        return one_side(ratio)
    if config.clip == "gspo-one-side":
        return jnp.broadcast_to(one_side(seq_ratio[:, None]), ratio.shape)
    two_side = (ratio >= lo) & (ratio <= hi)
    if config.clip == "two-side":
        return two_side
    outer_low = (adv >= 0) & (ratio <= 1.0 - config.ring_eps_low)
    outer_high = (adv <= 0) & (ratio >= 1.0 + config.ring_eps_high)
    return two_side | outer_low | outer_high


def weighted_advantages(
    advantages: jax.Array,
    ratio: jax.Array,
    seq_ratio: jax.Array,
    config: LossConfig,
    temperature: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The per-token coefficient of ``-logp`` (arXiv 2509.24203 §3, DESIGN.md §3).

    none: ``A``; importance_sampling: ``A * r``; gspo_importance_sampling: ``A * s``;
    advantage (RED-Weight): ``A * exp(min(A / T, weight_exp_bound))`` with ``T = weight_temp``,
    or the given per-sequence ``temperature`` (adaptive RED-Weight; T = inf gives ``A``).

    Args:
      advantages: ``[batch]``; ratio: ``[batch, seq]``; seq_ratio: ``[batch]``.
      temperature: ``[batch]`` RED-Weight temperatures; None uses ``config.weight_temp``.

    Returns:
      (``[batch, seq]`` weighted advantages, ``[batch]`` bool: RED-Weight exponent clamped).
    """
    adv = advantages[:, None]
    no_hits = jnp.zeros(advantages.shape, dtype=bool)
    if config.weight == "none":
        return jnp.broadcast_to(adv, ratio.shape), no_hits
    if config.weight == "importance_sampling":
        return adv * ratio, no_hits
    if config.weight == "gspo_importance_sampling":
        return jnp.broadcast_to(adv * seq_ratio[:, None], ratio.shape), no_hits
    exponent = advantages / (config.weight_temp if temperature is None else temperature)
    hits = exponent > config.weight_exp_bound
    weight = jnp.exp(jnp.minimum(exponent, config.weight_exp_bound))
    return jnp.broadcast_to((advantages * weight)[:, None], ratio.shape), hits


def regularizer_loss(logp: jax.Array, behaviour_logp: jax.Array, config: LossConfig) -> jax.Array:
    """Per-token regulariser, not subject to the clip mask (the REP family, arXiv 2509.24203 §3).

    forward-kl (AsymRE): ``-reg_coef * logp``; k2 (OPMD): ``reg_coef * (logp - behaviour_logp)^2``
    (the 1/2 of the k2 estimator is absorbed into ``reg_coef``); none: 0. Shapes ``[batch, seq]``.
    """
    if config.regularizer == "forward-kl":
        return -config.reg_coef * logp
    if config.regularizer == "k2":
        return config.reg_coef * (logp - behaviour_logp) ** 2
    return jnp.zeros_like(logp)


def loss_denominator(mask: jax.Array, config: LossConfig) -> jax.Array:
    """The local normaliser of ``aggregate_loss``: float32 scalar.

    token-mean: number of response tokens (``sum(mask)``); seq-mean-token-mean: number of
    sequences with at least one response token. Sum it over micro-batches/devices to get the
    global ``denominator`` for ``policy_loss``.
    """
    mask = mask.astype(jnp.float32)
    if config.aggregation == "token-mean":
        return jnp.sum(mask)
    return jnp.sum(jnp.any(mask != 0, axis=-1).astype(jnp.float32))


def aggregate_loss(
    per_token: jax.Array, mask: jax.Array, aggregation: str, denominator: jax.Array
) -> jax.Array:
    """Reduce a ``[batch, seq]`` per-token loss to a scalar.

    token-mean: ``sum_{b,t} loss * mask / denominator``.
    seq-mean-token-mean: ``sum_b (sum_t loss * mask / len_b) / denominator`` (empty rows add 0).
    A denominator of 0 (nothing to average) is treated as 1, so the loss is 0, not NaN.
    """
    denominator = jnp.where(denominator > 0, denominator, 1.0)
    if aggregation == "token-mean":
        return masked_sum(per_token, mask) / denominator
    return jnp.sum(masked_mean(per_token, mask, axis=-1)) / denominator


def policy_loss(
    logp: jax.Array,
    behaviour_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    config: LossConfig,
    *,
    denominator: jax.Array | float | None = None,
    temperature: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Group-relative REINFORCE loss of every variant in arXiv 2509.24203 (§3; DESIGN.md §3).

    ``loss = aggregate(-weighted_A * logp * in_range + regulariser)``, see the module docstring.

    Args:
      logp: ``[batch, seq]`` log-probs of the sampled tokens under the current policy.
      behaviour_logp: ``[batch, seq]`` log-probs recorded by the sampler.
      advantages: ``[batch]`` one advantage per sequence.
      mask: ``[batch, seq]`` 1 on response tokens, 0 elsewhere.
      config: a ``LossConfig``.
      denominator: global normaliser (``loss_denominator`` summed over all shards) so that
        summing the losses of shards is exact; defaults to this batch's own.
      temperature: ``[batch]`` RED-Weight temperature of each sequence, required when
        ``config.adaptive_temp`` is set (``rl_jax.advantages.red_weight_temperatures``).

    Returns:
      (scalar loss, metrics): metrics are local float32 scalars keyed as in ``METRIC_REDUCTIONS``.
    """
    chex.assert_rank([logp, behaviour_logp, mask, advantages], [2, 2, 2, 1])
    chex.assert_equal_shape([logp, behaviour_logp, mask])
    chex.assert_shape(advantages, logp.shape[:1])
    if (temperature is None) != (config.adaptive_temp == "none"):
        raise ValueError(
            f"policy_loss takes per-sequence temperatures exactly when adaptive_temp is set, "
            f"got adaptive_temp={config.adaptive_temp!r} and temperature "
            f"{'None' if temperature is None else 'given'}"
        )
    if temperature is not None:
        chex.assert_shape(temperature, advantages.shape)
    mask = mask.astype(jnp.float32)
    tokens = mask != 0
    logp = jnp.where(tokens, logp.astype(jnp.float32), 0.0)
    behaviour_logp = jnp.where(tokens, behaviour_logp.astype(jnp.float32), 0.0)
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    bound = config.log_ratio_bound

    log_ratio = jax.lax.stop_gradient(logp - behaviour_logp)
    ratio = jnp.exp(jnp.clip(log_ratio, -bound, bound))
    seq_log_ratio = masked_mean(log_ratio, mask, axis=-1)
    seq_ratio = jnp.exp(jnp.clip(seq_log_ratio, -bound, bound))

    in_range = in_range_mask(ratio, seq_ratio, advantages, config)
    weighted, weight_hits = weighted_advantages(advantages, ratio, seq_ratio, config, temperature)
    pg = -jax.lax.stop_gradient(weighted) * logp * in_range
    per_token = pg + regularizer_loss(logp, behaviour_logp, config)
    if denominator is None:
        denominator = loss_denominator(mask, config)
    loss = aggregate_loss(
        per_token, mask, config.aggregation, jnp.asarray(denominator, jnp.float32)
    )

    has_tokens = jnp.any(tokens, axis=-1).astype(jnp.float32)
    uses_seq_ratio = config.clip == "gspo-one-side" or config.weight == "gspo_importance_sampling"
    seq_hits = (jnp.abs(seq_log_ratio) > bound) & uses_seq_ratio
    metrics = {
        "pg_clipfrac": masked_mean(~in_range, mask),
        "ratio/mean": masked_mean(ratio, mask),
        # exp(+-bound) are the identities of min/max over clamped ratios: finite and exact.
        "ratio/min": jnp.min(jnp.where(tokens, ratio, math.exp(bound))),
        "ratio/max": jnp.max(jnp.where(tokens, ratio, math.exp(-bound))),
        "ratio/log_clamped_frac": masked_mean(jnp.abs(log_ratio) > bound, mask),
        "ratio/seq_log_clamped_frac": masked_mean(seq_hits, has_tokens),
        "weight/exp_clamped_frac": masked_mean(
            jnp.broadcast_to(weight_hits[:, None], mask.shape), mask
        ),
        "num_tokens": jnp.sum(mask),
        "num_sequences": jnp.sum(has_tokens),
    }
    return loss, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def aggregate_metrics(stacked: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Combine ``policy_loss`` metrics of several shards exactly.

    Args:
      stacked: metrics with a leading shard axis ``[num_shards]`` (e.g. the output of
        ``lax.scan`` over micro-batches, or an all-gather over devices).

    Returns:
      scalars: token means weighted by ``num_tokens``, sequence means by ``num_sequences``,
      min/max of the extremes, sums of the counts.
    """
    unknown = set(stacked) - set(METRIC_REDUCTIONS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {sorted(METRIC_REDUCTIONS)}")
    weights = {"token_mean": stacked["num_tokens"], "seq_mean": stacked["num_sequences"]}
    out = {}
    for key, values in stacked.items():
        reduction = METRIC_REDUCTIONS[key]
        if reduction in weights:
            out[key] = masked_mean(values, weights[reduction])
        else:
            out[key] = {"min": jnp.min, "max": jnp.max, "sum": jnp.sum}[reduction](values)
    return out


def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k1 estimator of KL(pi || pi_ref) on samples from pi: ``logp - ref_logp`` (unbiased, signed)."""
    return logp - ref_logp


def kl_k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k2 estimator: ``0.5 * (logp - ref_logp)^2`` (biased, low variance, >= 0)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: jax.Array, ref_logp: jax.Array, log_ratio_bound: float = 20.0) -> jax.Array:
    """k3 estimator: ``exp(d) - 1 - d`` with ``d = ref_logp - logp`` (unbiased, >= 0).

    ``d`` is clamped at ``log_ratio_bound`` from above before ``exp`` so the estimate stays
    finite; ``expm1`` keeps precision for small ``d``.
    """
    d = jnp.minimum(ref_logp - logp, log_ratio_bound)
    return jnp.expm1(d) - d
