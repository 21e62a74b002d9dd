"""Policy-loss kernels, KL estimators and entropy (arXiv 2509.24203 §3; DESIGN.md §3).

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
from rl_jax.sampling import gather_logp, tempered_log_softmax

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
    advantages: jax.Array, ratio: jax.Array, seq_ratio: jax.Array, config: LossConfig
) -> tuple[jax.Array, jax.Array]:
    """The per-token coefficient of ``-logp`` (arXiv 2509.24203 §3, DESIGN.md §3).

    none: ``A``; importance_sampling: ``A * r``; gspo_importance_sampling: ``A * s``;
    advantage (RED-Weight): ``A * exp(min(A / weight_temp, weight_exp_bound))``.

    Args:
      advantages: ``[batch]``; ratio: ``[batch, seq]``; seq_ratio: ``[batch]``.

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
    exponent = advantages / config.weight_temp
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

    Returns:
      (scalar loss, metrics): metrics are local float32 scalars keyed as in ``METRIC_REDUCTIONS``.
    """
    chex.assert_rank([logp, behaviour_logp, mask, advantages], [2, 2, 2, 1])
    chex.assert_equal_shape([logp, behaviour_logp, mask])
    chex.assert_shape(advantages, logp.shape[:1])
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
    weighted, weight_hits = weighted_advantages(advantages, ratio, seq_ratio, config)
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


def _check_temperature(temperature) -> None:
    if isinstance(temperature, int | float) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _entropy_from_log_probs(log_probs: jax.Array) -> jax.Array:
    """``-sum_v p_v log p_v`` over the last axis; vocabulary entries with p = 0 add exactly 0."""
    finite = jnp.isfinite(log_probs)
    safe = jnp.where(finite, log_probs, 0.0)
    return -jnp.sum(jnp.where(finite, jnp.exp(safe) * safe, 0.0), axis=-1)


def _log_softmax(logits: jax.Array, temperature) -> jax.Array:
    _check_temperature(temperature)
    return tempered_log_softmax(logits, temperature)


def token_logprobs(
    logits: jax.Array, targets: jax.Array, temperature=1.0
) -> tuple[jax.Array, jax.Array]:
    """Log-probs of ``targets`` and full-vocabulary entropy under ``softmax(logits / temperature)``.

    One ``log_softmax`` pass serves both: ``rl_jax.sampling.tempered_log_softmax``, the transform
    the sampler records with. ``-inf`` logits (masked vocabulary) are allowed.

    Args:
      logits: ``[..., vocab]``; targets: ``[...]`` int.

    Returns:
      (logp ``[...]``, entropy ``[...]``), float32.
    """
    log_probs = _log_softmax(logits, temperature)
    return gather_logp(log_probs, targets), _entropy_from_log_probs(log_probs)


def entropy_from_logits(logits: jax.Array, temperature=1.0) -> jax.Array:
    """Entropy ``H = -sum_v p_v log p_v`` of ``softmax(logits / temperature)``: ``[..., vocab]`` -> ``[...]``."""
    return _entropy_from_log_probs(_log_softmax(logits, temperature))


def full_kl_from_logits(logits: jax.Array, ref_logits: jax.Array, temperature=1.0) -> jax.Array:
    """Exact ``KL(pi || pi_ref) = sum_v p_v (log p_v - log q_v)`` per position (DESIGN.md §5).

    Both distributions at ``temperature``; ``[..., vocab]`` -> ``[...]``, clamped at >= 0 against
    rounding. Entries with p = 0 add 0; q = 0 where p > 0 gives +inf, the true value.
    """
    chex.assert_equal_shape([logits, ref_logits])
    return _full_kl(_log_softmax(logits, temperature), _log_softmax(ref_logits, temperature))


def _full_kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    finite = jnp.isfinite(log_p)
    safe_p = jnp.where(finite, log_p, 0.0)
    safe_q = jnp.where(finite, log_q, 0.0)  # a NaN-free backward pass where p = 0
    terms = jnp.where(finite, jnp.exp(safe_p) * (safe_p - safe_q), 0.0)
    return jnp.maximum(jnp.sum(terms, axis=-1), 0.0)


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


def token_stats(
    hidden, head, head_layout: str, targets, temperature=1.0, *, ref=None, chunk: int = 0
) -> dict[str, jax.Array]:
    """Per-position log-prob, entropy and KL to a reference from hidden states (DESIGN.md §5).

    With logits z = h W (float32) of the final-normed hidden states `hidden` `[rows, T, d]` and
    the output head `head` (`[vocab, d]` for layout "vd", `[d, vocab]` for "dv"):

        logp     = z_y / T - logsumexp(z / T)       (carries the gradient w.r.t. h and W)
        entropy  = -sum_v p_v log p_v               (p = softmax(z / T), stop-gradient)

    and with `ref = (ref_hidden, ref_head)` (same layout, stop-gradient) and q = softmax(z_ref / T):
    `ref_logp` = log q_y (by logp's formula) and `full_kl` = sum_v p_v (log p_v - log q_v), the
    values of `token_logprobs` and `full_kl_from_logits` on the full logits. The target logit
    z_y is the dot product of h with the unembedding of y, so the gradient of logp has no dense
    one-hot.
    With `chunk` > 0 (and < T) the positions go in blocks of `chunk` through a `lax.map` of
    `jax.checkpoint`-ed blocks: no `[rows, T, vocab]` array is ever live, and the backward
    pass recomputes one block's logits at a time. `chunk = 0`: one block, no recomputation.

    Returns:
      {"logp", "entropy"} (+ {"ref_logp", "full_kl"} with `ref`), each `[rows, T]` float32.
    """
    _check_temperature(temperature)
    if head_layout not in ("vd", "dv"):
        raise ValueError(f"head_layout must be 'vd' or 'dv', got {head_layout!r}")
    if not (isinstance(chunk, int) and chunk >= 0):
        raise ValueError(f"chunk must be an int >= 0 (0 = one block), got {chunk!r}")
    chex.assert_rank([hidden, targets], [3, 2])
    spec = "rcd,vd->rcv" if head_layout == "vd" else "rcd,dv->rcv"
    gather_axis = 0 if head_layout == "vd" else 1
    dot_spec = "rcd,rcd->rc" if head_layout == "vd" else "rcd,drc->rc"
    head = head.astype(hidden.dtype)
    ref_head = None if ref is None else ref[1].astype(ref[0].dtype)

    def logits(h, w):
        return jnp.einsum(spec, h, w, preferred_element_type=jnp.float32)

    def target_logp(h, w, z, y):
        target = jnp.einsum(
            dot_spec, h, jnp.take(w, y, axis=gather_axis), preferred_element_type=jnp.float32
        )
        return target / temperature - jax.nn.logsumexp(z / temperature, axis=-1)

    def block(h, y, h_ref):
        z = logits(h, head)
        log_p = _log_softmax(jax.lax.stop_gradient(z), temperature)
        out = {"logp": target_logp(h, head, z, y), "entropy": _entropy_from_log_probs(log_p)}
        if h_ref is not None:
            # The same formula as logp, so the initial policy's kl/ref is exactly 0.
            z_ref = logits(h_ref, ref_head)
            out["ref_logp"] = target_logp(h_ref, ref_head, z_ref, y)
            out["full_kl"] = _full_kl(log_p, _log_softmax(z_ref, temperature))
        return out

    targets = targets.astype(jnp.int32)
    ref_hidden = None if ref is None else ref[0]
    length = targets.shape[1]
    if chunk == 0 or chunk >= length:
        return block(hidden, targets, ref_hidden)
    pad = -length % chunk
    pad_time = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    to_blocks = lambda x: jnp.moveaxis(
        pad_time(x).reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0
    )
    xs = jax.tree.map(to_blocks, (hidden, targets, ref_hidden))
    out = jax.lax.map(jax.checkpoint(lambda x: block(*x), prevent_cse=False), xs)
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1)[:, :length], out)
