"""Log-probs, entropy and exact KL of softmax(z / T), and their chunked computation from hidden
states (DESIGN.md §5).

For logits z `[..., vocab]` and a temperature T > 0, with p = softmax(z / T) computed by
`rl_jax.sampling.tempered_log_softmax` (the transform the sampler records with) and a reference
q = softmax(z_ref / T):

    logp_y   = log p_y = z_y / T - logsumexp(z / T)
    entropy  = -sum_v p_v log p_v
    full_kl  = KL(p || q) = sum_v p_v (log p_v - log q_v)

`token_logprobs`, `entropy_from_logits` and `full_kl_from_logits` take full logits;
`token_stats` computes the same quantities from final-normed hidden states and the output head,
optionally in blocks of positions so that no `[rows, T, vocab]` array is ever live. The KL
*estimators* on samples (k1, k2, k3) are in `rl_jax.losses`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rl_jax.sampling import check_temperature, gather_logp, tempered_log_softmax


def _entropy_from_log_probs(log_probs: jax.Array) -> jax.Array:
    """``-sum_v p_v log p_v`` over the last axis; vocabulary entries with p = 0 add exactly 0."""
    finite = jnp.isfinite(log_probs)
    safe = jnp.where(finite, log_probs, 0.0)
    return -jnp.sum(jnp.where(finite, jnp.exp(safe) * safe, 0.0), axis=-1)


def _log_softmax(logits: jax.Array, temperature) -> jax.Array:
    check_temperature(temperature)
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
    check_temperature(temperature)
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
