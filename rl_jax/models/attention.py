"""Rotary position embedding and grouped-query attention of the decoder, in the four forms it runs.

RoPE rotates the pairs (i, i + d/2) of every query and key by position * theta^(-2i/d)
(`rope_inv_freq`, with Llama-3's frequency scaling when the config has it; `apply_rope`).

With q `[batch, q_len, heads, d]`, k, v `[batch, kv_len, kv_heads, d]` (query head h reads KV
head h // (heads / kv_heads)) and a boolean `allowed` `[batch, q_len, kv_len]`:

    Attn(q, k, v) = softmax(q k^T / sqrt(d) + mask) v,   mask = 0 where allowed, else -1e30

  * `attend`: the formula as written; scores and softmax in float32.
  * `attend_chunked`: the same over blocks of query rows, each block under `jax.checkpoint`
    (every row's softmax is independent, so only one block's scores live in the backward pass).
  * `attend_dot_product`: `jax.nn.dot_product_attention` (cuDNN's flash attention on a GPU in
    bfloat16/float16, XLA elsewhere).
  * `attend_cache`: the formula against one layer of a `decoder.KVCache`, whose keys are stored transposed
    (k^T `[batch, kv_heads, d, kv_len]`), so q k^T is a plain matrix product.

The mask value is large and finite, so a row with nothing to attend to (left padding) softmaxes
to uniform instead of NaN. `decoder.MemoryOptions` picks among the first three for a
differentiated forward; a cached decode uses `attend_cache`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rl_jax.models.config import ModelConfig

_MASK_VALUE = -1e30  # finite: a fully masked row softmaxes to uniform instead of NaN


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies `theta^(-2i/head_dim)`, `[head_dim // 2]`, with Llama-3 scaling."""
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
    inv_freq = 1.0 / config.rope_theta**exponents
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    wavelen = 2 * math.pi / inv_freq
    original = scaling.original_max_position_embeddings
    low_freq_wavelen = original / scaling.low_freq_factor
    high_freq_wavelen = original / scaling.high_freq_factor
    smooth = (original / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return np.where(medium, interpolated, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate halves of `x` `[batch, seq, heads, head_dim]` by `positions[batch, seq] * inv_freq`.

    Pairs are (i, i + head_dim/2) (the HF "rotate_half" layout), computed in float32:

        out = x * [cos, cos] + swap(x) * [-sin, sin],   swap([x1, x2]) = [x2, x1]

    i.e. x1 cos - x2 sin and x2 cos + x1 sin (the same formula; XLA may contract the products
    and sums differently, ~1 ulp). `swap` reverses a size-2 axis, which XLA fuses into the
    elementwise loop, where splitting and concatenating the halves made XLA:CPU write both out
    (~12% of the reference update's op time; BENCHMARKS.md). Parity with `transformers`:
    tests/test_hf_checkpoint.py.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    cos2, sin2 = jnp.concatenate([cos, cos], -1), jnp.concatenate([-sin, sin], -1)
    x32 = x.astype(jnp.float32)
    halves = x32.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
    swapped = jnp.flip(halves, axis=-2).reshape(x.shape)
    return (x32 * cos2 + swapped * sin2).astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d) masked by `allowed`) v with grouped KV heads.

    q `[batch, q_len, heads, d]`, k/v `[batch, kv_len, kv_heads, d]`, allowed
    `[batch, q_len, kv_len]` bool -> `[batch, q_len, heads, d]`. Query head h reads KV head
    h // (heads / kv_heads). Scores and softmax are float32.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed[:, None, None], scores * head_dim**-0.5, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)


def attend_chunked(q, k, v, allowed, chunk: int) -> jax.Array:
    """`attend` over blocks of `chunk` queries, each under `jax.checkpoint`.

    Every query row's softmax is independent, so the result equals `attend` up to matmul
    rounding; the backward pass recomputes one block's `[batch, heads, chunk, kv_len]` scores at
    a time instead of keeping `[batch, heads, q_len, kv_len]` float32. Queries are padded to a
    multiple of `chunk` (padded rows attend to nothing, stay finite and are dropped).
    """
    q_len = q.shape[1]
    pad = -q_len % chunk
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    allowed = jnp.pad(allowed, ((0, 0), (0, pad), (0, 0)))
    blocks = lambda x: jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)
    block = jax.checkpoint(lambda qa: attend(qa[0], k, v, qa[1]), prevent_cse=False)
    out = jax.lax.map(block, (blocks(q), blocks(allowed)))  # [blocks, batch, chunk, heads, d]
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], -1, *q.shape[2:])
    return out[:, :q_len]


def attend_dot_product(q, k, v, allowed) -> jax.Array:
    """`attend` by `jax.nn.dot_product_attention`: cuDNN's fused flash attention on a GPU with
    bfloat16 or float16 operands (`cudnn_applies`), which keeps no `[heads, q_len, kv_len]`
    probabilities for the backward pass; XLA elsewhere (jax's `implementation=None` picks XLA,
    so cuDNN is asked for by name). Same shapes and grouped KV heads as `attend`.

    cuDNN's backward pass gives NaN gradients when a query row has nothing to attend to (left
    padding, the tail of a packed row; measured on an H200, BENCHMARKS.md "Accelerator check"),
    so on that path such a row attends to its own position instead. Its output is never read
    (the loss, the metrics and every later key mask drop padding), so real rows are unchanged.
    """
    if not cudnn_applies(q):
        return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None])
    mask = with_own_position(allowed)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def with_own_position(allowed: jax.Array) -> jax.Array:
    """`allowed` `[batch, q_len, kv_len]` where every query row with nothing to attend to may
    attend to its own position (query i sits at key i + kv_len - q_len); other rows unchanged."""
    q_len, kv_len = allowed.shape[1:]
    own = jnp.arange(q_len)[:, None] + (kv_len - q_len) == jnp.arange(kv_len)[None]
    return allowed | (own[None] & ~allowed.any(-1, keepdims=True))


def cudnn_applies(q: jax.Array) -> bool:
    """Whether `attend_dot_product` asks for cuDNN: the default device is a GPU, the operands
    are bfloat16 or float16 and the head size is one cuDNN's flash attention takes (a multiple
    of 8, at most 128)."""
    device = jax.config.jax_default_device
    platform = getattr(device, "platform", device) or jax.default_backend()
    head_dim = q.shape[-1]
    return (
        platform in ("gpu", "cuda")
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def attend_cache(q: jax.Array, k_t: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """`attend` over a KV cache: the same softmax(q k^T / sqrt(d)) v with grouped KV heads.

    q `[batch, q_len, heads, d]`, k_t `[batch, kv_heads, d, kv_len]` (keys transposed), v
    `[batch, kv_heads, kv_len, d]`, allowed `[batch, q_len, kv_len]` -> `[batch, q_len, heads,
    d]`. Both products contract a cache operand along its major axis, so XLA:CPU runs them as
    plain batched matmuls with no transposing copy of the cache.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k_t.shape[1]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkgtd,bkds->bkgts", q, k_t, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed[:, None, None], scores * head_dim**-0.5, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim)


def attend_cache_chunks(q, k_chunks, v_chunks, allowed: jax.Array) -> jax.Array:
    """`attend_cache` over a cache held in chunks along its length: the scores of every chunk,
    one softmax over all of them, then the sum of each chunk's probabilities times its values.

    k_chunks, v_chunks: sequences of `attend_cache`'s k_t and v over consecutive slots;
    allowed `[batch, q_len, total slots]`. Each chunk is read in place (no concatenated copy of
    the cache); only the `[batch, heads, q_len, slots]` scores are concatenated.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k_chunks[0].shape[1]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    scores = jnp.concatenate(
        [jnp.einsum("bkgtd,bkds->bkgts", q, k, preferred_element_type=jnp.float32)
         for k in k_chunks], axis=-1,
    )  # fmt: skip
    scores = jnp.where(allowed[:, None, None], scores * head_dim**-0.5, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_chunks[0].dtype)
    starts = np.cumsum([0] + [v.shape[2] for v in v_chunks])
    out = sum(
        jnp.einsum("bkgts,bksd->bkgtd", probs[..., a:b], v)
        for a, b, v in zip(starts[:-1], starts[1:], v_chunks, strict=True)
    )
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim)
