"""A decoder-only transformer of the Qwen2 / Llama family in Flax NNX.

    h_0 = E[tokens];  for each layer l:
        a   = h + W_o · Attn(RoPE(W_q n), RoPE(W_k n), W_v n),  n = RMSNorm(h)
        h'  = a + W_down (silu(W_gate m) * W_up m),            m = RMSNorm(a)
    logits = RMSNorm(h_L) · W_head   (W_head = E^T when embeddings are tied)

Layers are stacked on a leading axis. A full forward runs them with `lax.scan` (one compiled
layer body for any depth) or, for shallow models, a Python loop over the stack
(`MemoryOptions.scan_layers`); a cached decode runs them unrolled, each against its own cache
buffer (`KVCache`), which keeps the per-token step free of cache copies. Attention is grouped-query
(num_kv_heads divides num_heads) with an optional q/k/v bias (Qwen2); its kernels live in
`rl_jax.models.attention`. Masked scores take a large finite negative value, so rows with
nothing to attend to (left padding) stay finite.
Parameters are stored in `config.param_dtype` and cast to the compute dtype `config.dtype` where
used; logits are float32. `Decoder.hidden_states` takes `MemoryOptions` (layer recomputation,
attention implementation) for differentiated forwards at scale.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rl_jax.models.attention import apply_rope, attend_cache, rope_inv_freq
from rl_jax.models.config import ModelConfig
from rl_jax.models.memory import REMAT_POLICIES, MemoryOptions

_INIT_STD = 0.02


class KVCache(NamedTuple):
    """Preallocated keys and values, one array per layer (tuples of `num_layers` arrays).

    k[l]: `[batch, num_kv_heads, head_dim, max_len]`, keys stored transposed so that q k^T reads
    the cache as a plain matrix product; v[l]: `[batch, num_kv_heads, max_len, head_dim]`.
    Separate per-layer buffers let a decode step update and read each layer in place.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


class Dense(nnx.Module):
    """y = x W (+ b) with W `[in, out]` stored in param_dtype and applied in `dtype`.

    The product runs on x flattened to `[rows, in]`, so the weight gradient x^T dy is a 2-D
    contraction over rows: XLA:CPU runs it without the transposing copy of dy it inserts for a
    contraction over `[batch, seq]`, ~10-15% of an update on the reference workload
    (BENCHMARKS.md, "Where the learner update's time goes"). The forward is the same product.
    """

    def __init__(self, d_in: int, d_out: int, *, bias: bool, config: ModelConfig, rngs):
        pdtype = jnp.dtype(config.param_dtype)
        self.dtype = config.dtype
        self.kernel = nnx.Param(_INIT_STD * jax.random.normal(rngs.params(), (d_in, d_out), pdtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), pdtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        rows = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = (rows @ self.kernel[...].astype(self.dtype)).reshape(*x.shape[:-1], -1)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
        return y


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * scale, normalised in float32."""

    def __init__(self, dim: int, config: ModelConfig):
        self.eps = config.rms_norm_eps
        self.dtype = config.dtype
        self.scale = nnx.Param(jnp.ones((dim,), config.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(self.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
        return scale * x32.astype(self.dtype)


class Block(nnx.Module):
    """One pre-norm transformer layer: grouped-query attention with RoPE, then a SwiGLU MLP."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.config = config
        self.input_norm = RMSNorm(d, config)
        self.q_proj = Dense(d, config.num_heads * config.head_dim, bias=config.qkv_bias,
                            config=config, rngs=rngs)  # fmt: skip
        self.k_proj = Dense(d, config.num_kv_heads * config.head_dim, bias=config.qkv_bias,
                            config=config, rngs=rngs)  # fmt: skip
        self.v_proj = Dense(d, config.num_kv_heads * config.head_dim, bias=config.qkv_bias,
                            config=config, rngs=rngs)  # fmt: skip
        self.o_proj = Dense(config.num_heads * config.head_dim, d, bias=False, config=config,
                            rngs=rngs)  # fmt: skip
        self.post_attn_norm = RMSNorm(d, config)
        self.gate_proj = Dense(d, f, bias=False, config=config, rngs=rngs)
        self.up_proj = Dense(d, f, bias=False, config=config, rngs=rngs)
        self.down_proj = Dense(f, d, bias=False, config=config, rngs=rngs)

    def qkv(self, x: jax.Array, positions: jax.Array):
        """Rotated queries `[b, t, heads, d]` and keys, values `[b, t, kv_heads, d]`."""
        c = self.config
        n = self.input_norm(x)
        batch, seq = x.shape[:2]
        q = self.q_proj(n).reshape(batch, seq, c.num_heads, c.head_dim)
        k = self.k_proj(n).reshape(batch, seq, c.num_kv_heads, c.head_dim)
        v = self.v_proj(n).reshape(batch, seq, c.num_kv_heads, c.head_dim)
        inv_freq = rope_inv_freq(c)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def finish(self, x: jax.Array, attn_out: jax.Array) -> jax.Array:
        """Residual output projection, then the residual SwiGLU MLP."""
        x = x + self.o_proj(attn_out.reshape(*attn_out.shape[:2], -1))
        m = self.post_attn_norm(x)
        return x + self.down_proj(jax.nn.silu(self.gate_proj(m)) * self.up_proj(m))


def default_positions(tokens: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Position ids `[batch, seq]`: cumsum(mask) - 1 clipped at 0 (arange without a mask)."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


class Decoder(nnx.Module):
    """The policy network. `model(tokens)` -> float32 logits `[batch, seq, vocab]`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdtype = jnp.dtype(config.param_dtype)
        shape = (config.vocab_size, config.hidden_size)
        self.embed = nnx.Param(_INIT_STD * jax.random.normal(rngs.params(), shape, pdtype))

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs)

        self.layers = make_layers(rngs)  # every parameter has a leading [num_layers] axis
        self.final_norm = RMSNorm(config.hidden_size, config)
        if config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Param(
                _INIT_STD * jax.random.normal(rngs.params(), shape[::-1], pdtype)
            )

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0).astype(self.config.dtype)

    def output_head(self) -> tuple[jax.Array, str]:
        """(W_head, layout): the embedding `[vocab, d]` ("vd") when tied, else `[d, vocab]` ("dv")."""
        if self.lm_head is None:
            return self.embed[...], "vd"
        return self.lm_head[...], "dv"

    def logits_of(self, x: jax.Array) -> jax.Array:
        """float32 logits of final-normed hidden states `x` `[batch, seq, d]`."""
        head, layout = self.output_head()
        spec = "btd,vd->btv" if layout == "vd" else "btd,dv->btv"
        x = x.astype(self.config.dtype)
        return jnp.einsum(
            spec, x, head.astype(self.config.dtype), preferred_element_type=jnp.float32
        )

    def __call__(self, tokens, positions=None, attention_mask=None) -> jax.Array:
        """Causal forward over `tokens` `[batch, seq]` int32 -> logits `[batch, seq, vocab]`.

        `attention_mask` `[batch, seq]` is 1 on real tokens and 0 on (left) padding; key j is
        visible to query i iff j <= i and mask[j] = 1. Left padding leaves the logits of real
        tokens unchanged; padded rows are finite but meaningless.
        """
        return self.logits_of(self.hidden_states(tokens, positions, attention_mask))

    def hidden_states(
        self, tokens, positions=None, attention_mask=None, memory: MemoryOptions = MemoryOptions(),
        segment_ids=None,
    ) -> jax.Array:  # fmt: skip
        """`__call__` up to the final RMSNorm: `[batch, seq, d]` in the compute dtype.

        `memory` picks the layer recomputation and the attention implementation; every choice
        computes the same function (`attend_chunked` and `attend_dot_product` up to rounding).
        `segment_ids` `[batch, seq]` (packed sequences, `rl_jax.packing`): key j is visible to
        query i only if both are in the same segment (ids equal and > 0; 0 marks filler, which
        sees nothing), on top of causality and `attention_mask`; pass the `positions` that
        restart in each segment. Every attention implementation reads this one mask.
        """
        if positions is None:
            if segment_ids is not None:
                raise ValueError("hidden_states: segment_ids need their positions")
            positions = default_positions(tokens, attention_mask)
        seq = tokens.shape[1]
        allowed = jnp.tril(jnp.ones((seq, seq), bool))[None]
        if attention_mask is not None:
            allowed = allowed & (attention_mask[:, None, :] > 0)
        if segment_ids is not None:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            allowed = allowed & same & (segment_ids[:, None, :] > 0)
        allowed = jnp.broadcast_to(allowed, (tokens.shape[0], seq, seq))
        graphdef, layer_params = nnx.split(self.layers)

        def layer(x, params):
            block = nnx.merge(graphdef, params)
            q, k, v = block.qkv(x, positions)
            return block.finish(x, memory.attend(q, k, v, allowed)), None

        policy = REMAT_POLICIES[memory.remat]
        if memory.remat != "none":
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
        x = self.embed_tokens(tokens)
        if memory.scans(self.config.num_layers):
            x, _ = jax.lax.scan(layer, x, layer_params)
        else:
            for i in range(self.config.num_layers):
                x, _ = layer(x, jax.tree.map(lambda a, i=i: a[i], layer_params))
        return self.final_norm(x)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        return init_cache(self.config, batch, max_len, dtype)

    def unstacked_layers(self) -> list[Block]:
        """One `Block` per layer, each holding its slice of the stacked parameters.

        Under jit the slices are copies: whoever holds the list holds a second copy of the layer
        weights (the sampler does, for the length of one `generate` call).
        """
        graphdef, state = nnx.split(self.layers)
        return [
            nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            for i in range(self.config.num_layers)
        ]

    def decode(
        self, tokens, positions, cache: KVCache, cache_index, cache_mask, layers=None,
        last_only: bool = False, kv_len: int | None = None,
    ):  # fmt: skip
        """Run `tokens` `[batch, T]` against `cache`; see `rl_jax.models.decode`.

        The layers run unrolled, each against its own cache buffer. `layers` (from
        `unstacked_layers`) lets a caller that decodes in a loop slice the stacked parameters
        once, outside the loop, instead of at every step. `last_only` projects only the last
        position onto the vocabulary (logits `[batch, 1, vocab]`: what a prefill needs).
        `kv_len` (static) attends to the first `kv_len` slots only, which must hold every slot
        up to `cache_index + T - 1`: a prefill from slot 0 passes T and scores `[T, T]` instead
        of `[T, max_len]` per head.
        """
        steps = tokens.shape[1]
        max_len = cache.v[0].shape[2]
        slots = cache_index + jnp.arange(steps, dtype=jnp.int32)  # [T]
        causal = jnp.arange(max_len, dtype=jnp.int32)[None, :] <= slots[:, None]  # [T, max_len]
        allowed = causal[None] & (cache_mask[:, None, :] > 0)  # [batch, T, max_len]
        kv_len = kv_len or max_len
        allowed = allowed[:, :, :kv_len]
        dtype = self.config.dtype
        zero = jnp.int32(0)
        x = self.embed_tokens(tokens)
        keys, values = [], []
        for block, k_t, v in zip(layers or self.unstacked_layers(), cache.k, cache.v, strict=True):
            q, k, new_v = block.qkv(x, positions)
            k_t = jax.lax.dynamic_update_slice(
                k_t, k.transpose(0, 2, 3, 1).astype(k_t.dtype), (zero, zero, zero, cache_index)
            )
            v = jax.lax.dynamic_update_slice(
                v, new_v.transpose(0, 2, 1, 3).astype(v.dtype), (zero, zero, cache_index, zero)
            )
            k_read, v_read = k_t[..., :kv_len].astype(dtype), v[:, :, :kv_len].astype(dtype)
            x = block.finish(x, attend_cache(q, k_read, v_read, allowed))
            keys.append(k_t)
            values.append(v)
        if last_only:
            x = x[:, -1:]
        return self.logits_of(self.final_norm(x)), KVCache(tuple(keys), tuple(values))


def init_model(config: ModelConfig, seed) -> Decoder:
    """A freshly initialised decoder: N(0, 0.02^2) matrices, zero biases, unit norm scales.

    `seed` is an int (may be traced, e.g. under vmap over seeds) or a typed PRNG key.
    """
    is_key = isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key)
    graphdef, init_params = _initializer(config)
    return nnx.merge(graphdef, init_params(seed if is_key else jax.random.key(seed)))


@functools.lru_cache(maxsize=16)
def _initializer(config: ModelConfig):
    """(graphdef, jitted key -> params) drawing every matrix from one normal sample.

    Same distribution as the module constructors, but one random draw compiles in ~1 s where
    a draw per parameter compiles for ~10 s on CPU.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract))
    is_matrix = [path[-1].key not in ("scale", "bias") for path, _ in leaves]
    sizes = [
        leaf.size if matrix else 0 for (_, leaf), matrix in zip(leaves, is_matrix, strict=True)
    ]
    offsets = np.cumsum([0, *sizes])

    def make(key):
        noise = _INIT_STD * jax.random.normal(key, (int(offsets[-1]),), config.param_dtype)
        values = []
        for i, ((path, leaf), matrix) in enumerate(zip(leaves, is_matrix, strict=True)):
            if matrix:
                values.append(noise[offsets[i] : offsets[i + 1]].reshape(leaf.shape))
            else:
                fill = 1.0 if path[-1].key == "scale" else 0.0
                values.append(jnp.full(leaf.shape, fill, leaf.dtype))
        state = jax.tree.map(lambda x: x, abstract)  # a fresh State to fill
        nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, values))
        return state

    return graphdef, jax.jit(make)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """Zero KV cache in `dtype` (default: the compute dtype), laid out as `KVCache` describes."""
    dtype = jnp.dtype(dtype or config.dtype)
    heads, dim, layers = config.num_kv_heads, config.head_dim, config.num_layers
    keys = tuple(jnp.zeros((batch, heads, dim, max_len), dtype) for _ in range(layers))
    values = tuple(jnp.zeros((batch, heads, max_len, dim), dtype) for _ in range(layers))
    return KVCache(keys, values)


def forward(graphdef, params, tokens, positions=None, attention_mask=None) -> jax.Array:
    """Pure `Decoder.__call__` over `(graphdef, params) = nnx.split(model)`: jit/vmap/shard it."""
    return nnx.merge(graphdef, params)(tokens, positions, attention_mask)


def forward_hidden(
    graphdef, params, tokens, attention_mask=None, memory: MemoryOptions = MemoryOptions(),
    positions=None, segment_ids=None,
) -> tuple[jax.Array, jax.Array, str]:  # fmt: skip
    """Pure `Decoder.hidden_states` -> (hidden `[batch, seq, d]`, W_head, its layout).

    `forward` = `hidden @ W_head` in float32; callers that need only some positions' logits
    (the learner's response positions) project those themselves (`logprobs.token_stats`).
    """
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(tokens, positions, attention_mask, memory, segment_ids)
    return (hidden, *model.output_head())


def decode(graphdef, params, tokens, positions, cache, cache_index, cache_mask):
    """Write k/v of `tokens` `[batch, T]` into cache slots `cache_index .. cache_index + T - 1`
    and return (logits `[batch, T, vocab]` float32, updated cache).

    The query in slot s attends to slots j <= s with `cache_mask[batch, j] = 1`; the caller
    sets the mask for the new slots too (0 for left padding in a prefill). `positions`
    `[batch, T]` are the RoPE positions. Prefill: T = prompt length, cache_index = 0; a decode
    step: T = 1. `cache_index` is an int32 scalar and may be traced; keep cache_index + T <=
    max_len (XLA clamps an out-of-range write start). Jit with the cache donated
    (`donate_argnums`) to update it in place.
    """
    model = nnx.merge(graphdef, params)
    return model.decode(tokens, positions, cache, jnp.asarray(cache_index, jnp.int32), cache_mask)
