"""Jitted KV-cache generation that records behaviour log-probs (DESIGN.md §1).

The off-policy analysis of arXiv 2509.24203 (§2-3) needs, for every generated token, its
log-probability under the distribution it was actually drawn from. Each row records two, as
defined in `rl_jax.sampling`: `sampled_logp` (under the top-k / top-p truncated softmax(z / T)
that was sampled from: exact importance-sampling data; 0 for greedy decoding) and
`untruncated_logp` (under the untruncated softmax(z / T): what the learner recomputes, as in the
paper's code). The two are the same array, bit for bit, when top-k and top-p are off.

Shapes: prompts are left-padded to a bucket width `P` (a few static sizes) and each prompt is
repeated `group_size` times (the layout of `rl_jax.groups`: row r answers prompt r // G); responses are `N` columns, the bucket of
`max_new_tokens`. One compiled program per (batch, P, N, top-k off or its power-of-two bucket,
top-p on or off, bucketed count and length of stop sequences): temperature, top_k, top_p, greedy,
eos_id, pad_id, the stop tokens and the cap are traced, so changing them never recompiles.
`compile_count()` counts the compilations.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rl_jax import parallel
from rl_jax.groups import rows_from_prompts
from rl_jax.sampling import SamplingConfig, draw

_LOG = logging.getLogger(__name__)
_compile_counter = [0]
LAYER_COPY_MAX_BYTES = 2**30  # see _prepare_model


@flax.struct.dataclass
class SamplerState:
    """What the sampler holds: `params` (of version `policy_version`, int32 scalar) and `key`."""

    params: Any
    policy_version: jax.Array
    key: jax.Array

    @classmethod
    def create(cls, params, key, policy_version: int = 0) -> SamplerState:
        return cls(params=params, policy_version=jnp.asarray(policy_version, jnp.int32), key=key)


@flax.struct.dataclass
class Rollout:
    """One batch of responses, rows grouped by prompt (row r answers prompt r // group_size).

    prompt_tokens, prompt_mask: [B, P] int32, left-padded (mask 1 on real tokens).
    response_tokens: [B, N] int32, pad_id after the end. response_mask: [B, N] float32, 1 up to
    and including EOS / the last token of a stop sequence. sampled_logp, untruncated_logp: [B, N]
    float32 (module docstring), 0 where the mask is 0. response_length: [B] int32.
    truncated: [B] bool, hit max_new_tokens without EOS or a stop sequence.
    policy_version: [B] int32, the version of the params that sampled the row.
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    response_tokens: jax.Array
    response_mask: jax.Array
    sampled_logp: jax.Array
    untruncated_logp: jax.Array
    response_length: jax.Array
    truncated: jax.Array
    policy_version: jax.Array


def bucket_size(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n; above the largest bucket, n rounded up to a multiple of it."""
    for b in buckets:
        if n <= b:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def _pow2_bucket(n: int, smallest: int) -> int:
    """The smallest power of two >= max(n, smallest)."""
    return max(smallest, 1 << max(n - 1, 0).bit_length())


def compile_count() -> int:
    """How many times the generation program has been traced (= compiled) in this process."""
    return _compile_counter[0]


@flax.struct.dataclass
class _Knobs:
    """The traced part of a SamplingConfig: changing any of these never recompiles.

    stop_ids: [S, M] right-aligned stop sequences, -1 = any token (left filler), -2 = no token
    (unused rows). S and M are padded to buckets (4, 8, ...) so they rarely change the shape.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    greedy: jax.Array
    eos_id: jax.Array
    pad_id: jax.Array
    max_new_tokens: jax.Array
    stop_ids: jax.Array

    @classmethod
    def of(cls, config: SamplingConfig) -> _Knobs:
        stops = config.stop_sequences
        width = _pow2_bucket(max((len(s) for s in stops), default=1), 4)
        stop_ids = np.full((_pow2_bucket(len(stops), 4), width), -2, np.int32)
        for row, stop in zip(stop_ids, stops, strict=False):
            row[:] = -1
            row[width - len(stop) :] = stop
        ints = {k: np.int32(getattr(config, k)) for k in ("top_k", "eos_id", "pad_id")}
        return cls(
            temperature=np.float32(config.temperature),
            top_p=np.float32(config.top_p),
            greedy=np.bool_(config.greedy),
            max_new_tokens=np.int32(config.max_new_tokens),
            stop_ids=stop_ids,
            **ints,
        )


def row_keys(key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """(next key, `[batch]` row keys) of a generate call with `key`: row r draws token t from
    fold_in(fold_in(k, r), t), k a fresh split of `key`, the same however rows are sharded or
    batched with other calls' rows."""
    next_key, sample_key = jax.random.split(key)
    rows = jnp.arange(batch, dtype=jnp.uint32)
    return next_key, jax.vmap(lambda r: jax.random.fold_in(sample_key, r))(rows)


def _step_keys(row_keys: jax.Array, step: jax.Array) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)


def _ends_response(recent: jax.Array, token: jax.Array, knobs: _Knobs) -> jax.Array:
    """Whether `token` [B] is EOS or completes a stop sequence; `recent` [B, M] ends with it."""
    stops = knobs.stop_ids[None]  # [1, num_stops, M]
    matched = jnp.all((recent[:, None, :] == stops) | (stops == -1), axis=2)
    return (token == knobs.eos_id) | jnp.any(matched, axis=1)


def _batch_constraint(mesh: Mesh | None):
    """x -> x with axis `axis` split over every device of `mesh` (identity without a mesh)."""

    def constrain(x, axis=0):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, parallel.rows_sharding(mesh, axis))

    return constrain


@dataclasses.dataclass(frozen=True)
class GenerationProgram:
    """What one compiled generation program is specialised to (its static arguments).

    graphdef: the model. top_k_width: a power of two >= top_k (0 = top-k off). nucleus: whether
    top-p is on. width: the response width N. mesh: the devices the rows are split over (None:
    no constraint). loop_axes: the names of the vmapped axes the program runs inside (they share
    one decode loop). The rest of a `SamplingConfig` arrives traced (`_Knobs`).
    """

    graphdef: Any
    top_k_width: int
    nucleus: bool
    width: int
    mesh: Mesh | None = None
    loop_axes: tuple[str, ...] = ()

    @classmethod
    def of(cls, graphdef, config: SamplingConfig, mesh=None, loop_axes=()) -> GenerationProgram:
        """The program of `config`: what it fixes (top-k width, top-p on, response width)."""
        width = bucket_size(config.max_new_tokens, config.generation_buckets)
        top_k_width = config.top_k and _pow2_bucket(config.top_k, 8)
        return cls(graphdef, top_k_width, config.top_p < 1.0, width, mesh, tuple(loop_axes))


def _prepare_model(graphdef, params):
    """(model, its layers sliced once or None) for the decode loop.

    Weights stored wider than the compute dtype (float32 master weights, bfloat16 compute) are
    cast once here: every use casts them anyway, so the results are the same bit for bit, and
    the copies XLA keeps for the loop (sliced layers, all-gathered fsdp shards) are half size.
    Layer weights are sliced once here, not at every decode step: a faster decode for small
    models (the reference workload), but in float32 compute a second copy of the layer weights
    for the whole call (Qwen2.5-1.5B on one device: 84.8 vs 80.1 GiB). Above
    `LAYER_COPY_MAX_BYTES` of layer weights each step slices its layers instead (BENCHMARKS.md,
    "Scale"). With bfloat16 compute the cast is that copy and both ways measure the same.
    """
    compute = jnp.dtype(nnx.merge(graphdef, params).config.dtype)
    narrow = lambda x: (
        x.astype(compute)
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize > compute.itemsize
        else x
    )
    model = nnx.merge(graphdef, jax.tree.map(narrow, params))
    layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model.layers)))
    return model, model.unstacked_layers() if layer_bytes <= LAYER_COPY_MAX_BYTES else None


def _loop_state(batch: int, width: int, cache, knobs: _Knobs, constrain) -> dict:
    """The decode loop's carry before the first token: step t, last token, KV cache, which rows
    are done, the recent tokens (stop sequences) and the `[batch, width]` outputs."""
    rows = lambda fill, dtype: constrain(jnp.full((batch, width), fill, dtype))
    return {
        "t": jnp.int32(0),
        "token": constrain(jnp.zeros((batch,), jnp.int32)),
        "cache": cache,
        "done": constrain(jnp.zeros((batch,), bool)),
        "recent": constrain(jnp.full((batch, knobs.stop_ids.shape[1]), -1, jnp.int32)),
        "tokens": rows(knobs.pad_id, jnp.int32),
        "mask": rows(0, jnp.float32),
        "sampled_logp": rows(0, jnp.float32),
        "untruncated_logp": rows(0, jnp.float32),
    }


def _generate_program(
    program: GenerationProgram, params, policy_version, keys, prompt_tokens, prompt_mask, knobs
):
    """The compiled program: prefill, then a while_loop of one-token decode steps; `keys` are
    the `[B]` row keys (`row_keys`).

    The KV cache is allocated inside the program and lives in the loop carry, so each step
    updates it in place (XLA aliases the carry buffers) and it never crosses the jit boundary:
    nothing to copy, nothing to donate.
    """
    _compile_counter[0] += 1
    batch, prompt_width = prompt_tokens.shape
    width = program.width
    _LOG.info("compiling generate: batch %d, prompt %d, response %d", batch, prompt_width, width)
    constrain = _batch_constraint(program.mesh)
    keys = constrain(keys)
    model, layers = _prepare_model(program.graphdef, params)
    cache = jax.tree.map(constrain, model.init_cache(batch, prompt_width + width))
    # Constant over the loop: slots not yet written lie after the query's own slot, and causality
    # hides them; only left padding needs masking.
    cache_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, width), prompt_mask.dtype)], 1)
    prompt_length = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1, dtype=jnp.int32) - 1, 0)
    logits, cache = model.decode(
        prompt_tokens, positions, cache, jnp.int32(0), cache_mask, layers, last_only=True,
        kv_len=prompt_width,
    )  # fmt: skip
    top_p = knobs.top_p if program.nucleus else None

    def emit(carry, logits):
        """Sample column t for every live row; finished rows get pad_id, mask 0, logp 0."""
        t = carry["t"]
        sampled, sampled_logp, untruncated_logp = draw(
            logits,
            _step_keys(keys, t),
            program.top_k_width,
            knobs.top_k,
            knobs.temperature,
            top_p,
            knobs.greedy,
        )
        live = ~carry["done"]
        token = jnp.where(live, sampled, knobs.pad_id)
        recent = jnp.concatenate([carry["recent"][:, 1:], token[:, None]], axis=1)
        columns = {
            "tokens": token,
            "mask": live.astype(jnp.float32),
            "sampled_logp": jnp.where(live, sampled_logp, 0.0),
            "untruncated_logp": jnp.where(live, untruncated_logp, 0.0),
        }
        out = {k: carry[k].at[:, t].set(v) for k, v in columns.items()}
        done = carry["done"] | (live & _ends_response(recent, token, knobs))
        return {**carry, **out, "t": t + 1, "token": token, "recent": recent, "done": done}

    def step(carry):
        t, token = carry["t"], carry["token"]
        logits, cache = model.decode(
            token[:, None], (prompt_length + t - 1)[:, None], carry["cache"],
            prompt_width + t - 1, cache_mask, layers,
        )  # fmt: skip
        return emit({**carry, "cache": cache}, logits[:, 0])

    def more(carry):
        # Under vmap (named `loop_axes`) all batches share one loop: a per-batch condition
        # would make vmap select between old and new carries, copying the KV cache every step.
        live = jnp.any(~carry["done"]).astype(jnp.int32)
        for axis in program.loop_axes:
            live = jax.lax.psum(live, axis)
        return (carry["t"] < knobs.max_new_tokens) & (live > 0)

    carry = _loop_state(batch, width, cache, knobs, constrain)
    carry = jax.lax.while_loop(more, step, emit(carry, logits[:, -1]))
    return Rollout(
        prompt_tokens=prompt_tokens,
        prompt_mask=prompt_mask,
        response_tokens=carry["tokens"],
        response_mask=carry["mask"],
        sampled_logp=carry["sampled_logp"],
        untruncated_logp=carry["untruncated_logp"],
        response_length=jnp.sum(carry["mask"], axis=1).astype(jnp.int32),
        truncated=~carry["done"],
        policy_version=jnp.broadcast_to(policy_version, (batch,)).astype(jnp.int32),
    )


@functools.partial(jax.jit, static_argnums=0)
def _generate_jit(program: GenerationProgram, params, version, key, *rest):
    next_key, keys = row_keys(key, rest[0].shape[0])
    return _generate_program(program, params, version, keys, *rest), next_key


def _check_prompts(tokens: np.ndarray, mask: np.ndarray, group_size: int, mesh) -> None:
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(
            f"prompt_tokens {tokens.shape} and prompt_mask {mask.shape} must be [B, P]"
        )
    if not (isinstance(group_size, int) and group_size >= 1):
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if (
        not np.isin(mask, (0, 1)).all()
        or (np.diff(mask, axis=1) < 0).any()
        or not mask[:, -1].all()
    ):
        raise ValueError("prompt_mask must be 0/1, left-padded, with at least one token per row")
    devices = 1 if mesh is None else mesh.devices.size
    parallel.check_rows(
        tokens.shape[0] * group_size, devices, f"batch {tokens.shape[0]} x group_size {group_size}"
    )


def generate(
    graphdef,
    state: SamplerState,
    prompt_tokens,
    prompt_mask,
    config: SamplingConfig,
    group_size: int = 1,
    *,
    mesh: Mesh | None = None,
) -> tuple[Rollout, SamplerState]:
    """Samples `group_size` responses to each prompt: (Rollout, state with the next key).

    prompt_tokens, prompt_mask: [num_prompts, P] int, left-padded (tokenizer.encode_batch).
    The Rollout has B = num_prompts * group_size rows (row r answers prompt r // group_size),
    prompt width bucket(P) and response width bucket(max_new_tokens). Row r draws from keys
    fold_in(fold_in(k, r), t), k a fresh split of state.key, so results do not depend on
    `mesh`: with one, the batch is split over all its axes, params keep their own placement.
    """
    tokens = np.asarray(prompt_tokens).astype(np.int32)
    mask = np.asarray(prompt_mask).astype(np.int32)
    _check_prompts(tokens, mask, group_size, mesh)
    pad = bucket_size(tokens.shape[1], config.prompt_buckets) - tokens.shape[1]
    tokens = np.pad(
        rows_from_prompts(tokens, group_size), ((0, 0), (pad, 0)), constant_values=config.pad_id
    )
    mask = np.pad(rows_from_prompts(mask, group_size), ((0, 0), (pad, 0)))
    if mesh is not None:
        tokens, mask = jax.device_put((tokens, mask), parallel.rows_sharding(mesh))
    rollout, key = _generate_jit(
        GenerationProgram.of(graphdef, config, mesh), state.params, state.policy_version,
        state.key, tokens, mask, _Knobs.of(config),
    )  # fmt: skip
    return rollout, state.replace(key=key)


def generate_rows(
    graphdef,
    params,
    policy_version,
    keys,
    row_tokens,
    row_mask,
    config: SamplingConfig,
    mesh=None,
    loop_axes: tuple[str, ...] = (),
) -> Rollout:
    """The generation program for callers that trace it inside their own jit (`rl_jax.step`).

    row_tokens, row_mask: `[B, P]` prompts already expanded to rows (`rl_jax.groups`) and
    left-padded; keys: `[B]` row keys, `row_keys(key, B)[1]` for the draws `generate` makes with
    `state.key = key` (rows of several such calls may be stacked into one batch: each row's
    draws depend on its own key only). The config's knobs become constants of the caller's
    program. `loop_axes`: the names of the vmapped axes the call is inside (they share one
    decode loop, which runs until every row is done).
    """
    program = GenerationProgram.of(graphdef, config, mesh, loop_axes)
    return _generate_program(
        program, params, policy_version, keys, row_tokens, row_mask, _Knobs.of(config)
    )
