"""Drawing tokens and scoring them: the one home of the sampling transform (DESIGN.md §1, §3).

With logits z ([vocab]), temperature T and the truncation set S kept by top-k / top-p:

    untruncated_logp = log softmax(z / T)[y]                      (what the learner recomputes)
    sampled_logp     = log softmax(z / T restricted to S)[y]      (what y was drawn from)

`tempered_log_softmax` is log softmax(z / T) in float32: the sampler records with it and the
learner (`rl_jax.logprobs.token_logprobs`) and the warm start score with it, so an on-policy ratio
is exactly 1. `draw` is the traced form the compiled generation loop uses (everything but the
top-k width may be traced); `sample_tokens`, `truncated_logits` and `sampling_logprobs` take a
`SamplingConfig` so tests can redraw or rescore outside the loop.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

_DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


# The smallest temperature that samples stably. The sampler and the learner compute
# log softmax(z / T) in two different programs, and float32 rounds a logit z of magnitude 100 to
# within 100 * 2**-24 = 6e-6; dividing by T scales that disagreement to 6e-6 / T nats per token in
# the importance ratio. At T = 1e-3 it is 0.006 nats, well inside the ratio's trust region (PPO
# clip 0.2); at T = 1e-9 the first ratios overflow and the loss is not finite. Greedy decoding is
# `top_k=1`, not a tiny temperature.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = float(np.finfo(np.float32).max)


def check_temperature(temperature) -> None:
    """The temperature rule, for every caller that takes one: MIN_TEMPERATURE <= T, finite in
    float32 (a traced temperature is not a number here and is checked where it was made)."""
    if not isinstance(temperature, numbers.Real):
        return
    if not (math.isfinite(temperature) and 0 < temperature <= MAX_TEMPERATURE):
        raise ValueError(f"temperature must be finite in float32 and > 0, got {temperature!r}")
    if temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE} to sample stably in float32, got "
            f"{temperature!r} (float32 rounding of the logits, divided by the temperature, "
            "becomes the importance ratio's error); for greedy decoding use top_k=1"
        )


def check_decode_slots(decode_slots) -> None:
    """The decode-slot rule: an int >= 0 (0 = lock-step); `rl_jax.sampler.check_slots` adds
    that they divide over the devices."""
    if isinstance(decode_slots, bool) or not (isinstance(decode_slots, int) and decode_slots >= 0):
        raise ValueError(f"decode_slots must be an int >= 0 (0 = lock-step), got {decode_slots!r}")


def check_draw_settings(temperature, top_k, top_p) -> None:
    """The rules of the draw settings: T > 0, top_k an int >= 0 (0 = off), top_p in (0, 1]."""
    check_temperature(temperature)
    if not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {top_p}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How tokens are drawn and when a response ends.

    temperature: z / T before everything else (> 0). top_k: keep the k largest logits (0 = off).
    top_p: then keep the smallest prefix of the (renormalised) sorted distribution with mass >=
    top_p (1.0 = off). greedy: argmax of z (temperature and truncation do not change the token).
    max_new_tokens: response cap. eos_id: ends a response (kept, masked 1). pad_id: fills the
    rest. stop_sequences: token-id tuples that also end a response (kept, masked 1).
    prompt_buckets / generation_buckets: the static widths prompts and responses are padded to;
    a size above the largest bucket rounds up to a multiple of it.
    decode_slots: rows decoded at a time, a finished row's slot taking the next waiting row
    (`rl_jax.slots`); 0 = every row at once (lock-step). Split over the devices of a mesh.
    Changes the time a call takes, never its result (up to rounding).
    """

    eos_id: int
    pad_id: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    max_new_tokens: int = 64
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    prompt_buckets: tuple[int, ...] = _DEFAULT_BUCKETS
    generation_buckets: tuple[int, ...] = _DEFAULT_BUCKETS
    decode_slots: int = 0

    def __post_init__(self):
        fix = lambda name, value: object.__setattr__(self, name, value)
        fix("stop_sequences", tuple(tuple(int(t) for t in s) for s in self.stop_sequences))
        fix("prompt_buckets", tuple(int(b) for b in self.prompt_buckets))
        fix("generation_buckets", tuple(int(b) for b in self.generation_buckets))
        check_draw_settings(self.temperature, self.top_k, self.top_p)
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        for name in ("eos_id", "pad_id"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(
                    f"{name} must be a token id (int >= 0), got {getattr(self, name)!r}"
                )
        check_decode_slots(self.decode_slots)
        if any(len(s) == 0 or min(s) < 0 for s in self.stop_sequences):
            raise ValueError(
                f"stop_sequences must be non-empty tuples of token ids, got {self.stop_sequences}"
            )
        for name in ("prompt_buckets", "generation_buckets"):
            b = getattr(self, name)
            if not b or b[0] < 1 or any(x >= y for x, y in zip(b, b[1:], strict=False)):
                raise ValueError(f"{name} must be strictly increasing positive ints, got {b}")

    @property
    def truncates(self) -> bool:
        """Whether top-k or top-p changes the distribution (sampled_logp != untruncated_logp)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


def tempered_log_softmax(logits: jax.Array, temperature) -> jax.Array:
    """log softmax(z / T) over the last axis, in float32: `[..., vocab]` -> `[..., vocab]`."""
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def gather_logp(log_probs: jax.Array, tokens: jax.Array) -> jax.Array:
    """`log_probs[..., tokens]`: `[..., vocab]`, `[...]` int -> `[...]`."""
    return jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


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


def sampling_logprobs(logits: jax.Array, tokens: jax.Array, config: SamplingConfig):
    """(sampled_logp, untruncated_logp) of `tokens` [...] under `logits` [..., vocab] (module doc).

    The same transform the sampler records with, exposed so tests can recompute it.
    """
    untruncated_logp = gather_logp(tempered_log_softmax(logits, config.temperature), tokens)
    if config.greedy:
        scaled = logits.astype(jnp.float32) / config.temperature
        sampled_logp = jnp.where(tokens == jnp.argmax(scaled, axis=-1), 0.0, -jnp.inf)
    elif config.truncates:
        sampled_logp = gather_logp(jax.nn.log_softmax(truncated_logits(logits, config), -1), tokens)
    else:
        sampled_logp = untruncated_logp
    return sampled_logp, untruncated_logp


def draw(logits, keys, top_k_width: int, top_k, temperature, top_p, greedy):
    """`sample_tokens` with everything but `top_k_width` (static, >= top_k) possibly traced
    (top_p None = off): the form the compiled generation loop calls."""
    scaled = logits.astype(jnp.float32) / temperature
    log_probs = tempered_log_softmax(logits, temperature)
    truncated = _truncate(scaled, top_k_width, top_k, top_p)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[-1:], jnp.float32))(keys)
    sampled = jnp.argmax(truncated + noise, axis=-1)
    tokens = jnp.where(greedy, jnp.argmax(scaled, axis=-1), sampled).astype(jnp.int32)
    untruncated_logp = gather_logp(log_probs, tokens)
    if truncated is scaled:
        sampled_logp = untruncated_logp
    else:
        sampled_logp = gather_logp(jax.nn.log_softmax(truncated, axis=-1), tokens)
    return tokens, jnp.where(greedy, 0.0, sampled_logp), untruncated_logp


def sample_tokens(logits: jax.Array, keys: jax.Array, config: SamplingConfig):
    """Draws one token per row: (tokens [B] int32, sampled_logp [B], untruncated_logp [B]).

    logits [B, vocab]; keys [B] (one PRNG key per row, so a row's draw does not depend on the
    batch it is in or how the batch is sharded). Gumbel-max: argmax(z' + g), g ~ Gumbel(0, 1)
    iid, is a draw from softmax(z') for the truncated logits z'.
    """
    top_p = config.top_p if config.top_p < 1.0 else None
    k = config.top_k
    return draw(logits, keys, k, k, config.temperature, top_p, config.greedy)
