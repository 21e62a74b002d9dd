"""Drawing tokens and scoring them: the transforms the sampler records with (DESIGN.md §1).

With logits z ([vocab]), temperature T and the truncation set S kept by top-k / top-p:

    full_logp      = log softmax(z / T)[y]                      (untruncated)
    behaviour_logp = log softmax(z / T restricted to S)[y]      (what y was drawn from)

`draw` is the traced form the compiled generation loop uses (everything but the top-k width may
be traced); `sample_tokens`, `truncated_logits` and `sampling_logprobs` take a `SamplingConfig`
so tests and learners can redraw or rescore outside the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from rl_jax.sampler import SamplingConfig


def _truncate(scaled: jax.Array, top_k_width: int, top_k, top_p) -> jax.Array:
    """`scaled` [..., vocab] with tokens outside the top-k / top-p set at -inf.

    top_k_width (static, 0 = no top-k) >= top_k (may be traced); top_p None = off.
    """
    vocab = scaled.shape[-1]
    if top_k_width == 0 and top_p is None:
        return scaled
    values, ids = jax.lax.top_k(scaled, min(top_k_width or vocab, vocab))
    if top_k_width:
        rank = jax.lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
        values = jnp.where(rank < top_k, values, -jnp.inf)
    if top_p is not None:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(mass_before < top_p, values, -jnp.inf)
    return jnp.put_along_axis(jnp.full_like(scaled, -jnp.inf), ids, values, axis=-1, inplace=False)


def truncated_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """z / T with every token outside the top-k / top-p set at -inf: [..., vocab] float32.

    Top-k keeps exactly min(k, vocab) tokens (ties broken towards the lower id); top-p then keeps
    the sorted prefix j with mass_before_j < top_p under the renormalised top-k distribution, so
    the most likely token is always kept.
    """
    scaled = logits.astype(jnp.float32) / config.temperature
    top_p = config.top_p if config.top_p < 1.0 else None
    return _truncate(scaled, config.top_k, config.top_k, top_p)


def _gather(logp: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def sampling_logprobs(logits: jax.Array, tokens: jax.Array, config: SamplingConfig):
    """(behaviour_logp, full_logp) of `tokens` [...] under `logits` [..., vocab] (module doc).

    The same transform the sampler records with, exposed so tests and learners can recompute.
    """
    scaled = logits.astype(jnp.float32) / config.temperature
    full_logp = _gather(jax.nn.log_softmax(scaled, axis=-1), tokens)
    if config.greedy:
        behaviour_logp = jnp.where(tokens == jnp.argmax(scaled, axis=-1), 0.0, -jnp.inf)
    elif config.truncates:
        behaviour_logp = _gather(jax.nn.log_softmax(truncated_logits(logits, config), -1), tokens)
    else:
        behaviour_logp = full_logp
    return behaviour_logp, full_logp


def draw(logits, keys, top_k_width: int, top_k, temperature, top_p, greedy):
    """`sample_tokens` with everything but `top_k_width` (static, >= top_k) possibly traced
    (top_p None = off): the form the compiled generation loop calls."""
    scaled = logits.astype(jnp.float32) / temperature
    log_probs = jax.nn.log_softmax(scaled, axis=-1)
    truncated = _truncate(scaled, top_k_width, top_k, top_p)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[-1:], jnp.float32))(keys)
    sampled = jnp.argmax(truncated + noise, axis=-1)
    tokens = jnp.where(greedy, jnp.argmax(scaled, axis=-1), sampled).astype(jnp.int32)
    full_logp = _gather(log_probs, tokens)
    if truncated is scaled:
        behaviour_logp = full_logp
    else:
        behaviour_logp = _gather(jax.nn.log_softmax(truncated, axis=-1), tokens)
    return tokens, jnp.where(greedy, 0.0, behaviour_logp), full_logp


def sample_tokens(logits: jax.Array, keys: jax.Array, config: SamplingConfig):
    """Draws one token per row: (tokens [B] int32, behaviour_logp [B], full_logp [B]).

    logits [B, vocab]; keys [B] (one PRNG key per row, so a row's draw does not depend on the
    batch it is in or how the batch is sharded). Gumbel-max: argmax(z' + g), g ~ Gumbel(0, 1)
    iid, is a draw from softmax(z') for the truncated logits z'.
    """
    top_p = config.top_p if config.top_p < 1.0 else None
    k = config.top_k
    return draw(logits, keys, k, k, config.temperature, top_p, config.greedy)
