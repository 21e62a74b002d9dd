"""Jitted KV-cache generation that records behaviour log-probs (DESIGN.md §1).

The off-policy analysis of arXiv 2509.24203 (§2-3) needs, for every generated token, its
log-probability under the distribution it was actually drawn from. Each row records two, as
defined in `rl_jax.sampling`: `sampled_logp` (under the top-k / top-p truncated softmax(z / T)
that was sampled from: exact importance-sampling data; 0 for greedy decoding) and
`untruncated_logp` (under the untruncated softmax(z / T): what the learner recomputes, as in the
paper's code). The two are the same array, bit for bit, when top-k and top-p are off.

Shapes: prompts are left-padded to a bucket width `P` (a few static sizes) and each prompt is
repeated `group_size` times (the layout of `rl_jax.groups`: row r answers prompt r // G); responses are `N` columns, the bucket of
`max_new_tokens`. The rows go through `decode_slots` decode slots (`rl_jax.slots`; 0 = all at
once, lock-step). One compiled program per (batch, P, N, decode slots, top-k off or its
power-of-two bucket, top-p on or off, bucketed count and length of stop sequences): temperature,
top_k, top_p, greedy, eos_id, pad_id, the stop tokens and the cap are traced, so changing them
never recompiles.
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
from jax.sharding import Mesh, PartitionSpec

from rl_jax import compat, parallel
from rl_jax import slots as slots_lib
from rl_jax.groups import rows_from_prompts
from rl_jax.sampling import SamplingConfig

_LOG = logging.getLogger(__name__)
_compile_counter = [0]
LAYER_COPY_MAX_BYTES = 2**30  # see _generate_program


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


@dataclasses.dataclass(frozen=True)
class GenerationProgram:
    """What one compiled generation program is specialised to (its static arguments).

    graphdef: the model. top_k_width: a power of two >= top_k (0 = top-k off). nucleus: whether
    top-p is on. width: the response width N. slots: decode slots summed over devices (0: one
    per row, the lock-step decode). mesh: the devices the rows are split over (None: one).
    loop_axes: the names of the vmapped axes the program runs inside (they share one decode
    loop). The rest of a `SamplingConfig` arrives traced (`_Knobs`).
    """

    graphdef: Any
    top_k_width: int
    nucleus: bool
    width: int
    slots: int = 0
    mesh: Mesh | None = None
    loop_axes: tuple[str, ...] = ()

    @classmethod
    def of(cls, graphdef, config: SamplingConfig, mesh=None, loop_axes=()) -> GenerationProgram:
        """The program of `config`: what it fixes (top-k width, top-p on, response width,
        decode slots)."""
        width = bucket_size(config.max_new_tokens, config.generation_buckets)
        top_k_width = config.top_k and _pow2_bucket(config.top_k, 8)
        return cls(
            graphdef, top_k_width, config.top_p < 1.0, width, config.decode_slots, mesh,
            tuple(loop_axes),
        )  # fmt: skip


def _generate_program(
    program: GenerationProgram, params, policy_version, keys, prompt_tokens, prompt_mask, knobs
):
    """The compiled program: the `[B]` rows (keys from `row_keys`) through `rl_jax.slots.decode`
    with `program.slots` decode slots (0: one per row, the lock-step decode): (Rollout,
    slot-steps).

    The KV cache is allocated inside the program and lives in the loop carry, so each step
    updates it in place (XLA aliases the carry buffers) and it never crosses the jit boundary:
    nothing to copy, nothing to donate. With a mesh and slots, each device decodes its share of
    the rows (a contiguous block of the queue) through its own `slots / devices` slots
    (`shard_map`): rows never move between devices. The lock-step decode is left to XLA's
    partitioner instead: `shard_map` would gather every replicated or fsdp-sharded weight
    before the loop (Qwen2.5-1.5B over 8 devices: 13.8 against 9.5 GiB per device, BENCHMARKS.md
    "Slot decoding"), where the partitioner gathers each inside the loop, where a step uses it.
    """
    _compile_counter[0] += 1
    graphdef, width, slots, mesh = program.graphdef, program.width, program.slots, program.mesh
    batch, prompt_width = prompt_tokens.shape
    devices = 1 if mesh is None else mesh.devices.size
    _LOG.info(
        "compiling generate: batch %d, prompt %d, response %d, slots %d",
        batch, prompt_width, width, slots,
    )  # fmt: skip

    # Weights stored wider than the compute dtype (float32 master weights, bfloat16 compute)
    # are cast once here, before a mesh gathers them: every use casts them anyway, so the
    # results are the same bit for bit, and the copies XLA keeps for the loop (sliced layers,
    # all-gathered fsdp shards) are half size.
    compute = jnp.dtype(nnx.merge(graphdef, params).config.dtype)
    narrow = lambda x: (
        x.astype(compute)
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize > compute.itemsize
        else x
    )
    params = jax.tree.map(narrow, params)

    def local(params, keys, prompt_tokens, prompt_mask, knobs, devices=1, rows=None):
        model = nnx.merge(graphdef, params)
        # Layer weights sliced once here, not at every decode step: a faster decode for small
        # models (the reference workload), but in float32 compute a second copy of the layer
        # weights for the whole call (Qwen2.5-1.5B on one device: 84.8 vs 80.1 GiB). Above 1 GiB
        # of layer weights each step slices its layers instead (BENCHMARKS.md, "Scale"). With
        # bfloat16 compute the cast above is that copy and both ways measure the same.
        layer_bytes = sum(
            x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model.layers))
        )
        layers = model.unstacked_layers() if layer_bytes <= LAYER_COPY_MAX_BYTES else None
        out = slots_lib.decode(
            model, layers, keys, prompt_tokens, prompt_mask, knobs, slots=slots // devices,
            width=width, top_k_width=program.top_k_width, nucleus=program.nucleus,
            loop_axes=program.loop_axes, rows=rows,
        )  # fmt: skip
        # Each refill draws its row's first token outside the decode steps: one slot-step.
        queue = prompt_tokens.shape[0]
        num_slots = min(slots // devices or queue, queue)
        return out, out.pop("decode_steps") * num_slots + queue - num_slots

    if mesh is None or not slots:
        # Lock-step: XLA partitions the rows (the cache is placed like them) and gathers each
        # fsdp-sharded weight inside the loop, where a decode step uses it.
        rows = None if mesh is None else parallel.rows_sharding(mesh)
        out, slot_steps = local(params, keys, prompt_tokens, prompt_mask, knobs, rows=rows)
    else:

        def per_device(*args):
            out, slot_steps = local(*args, devices=devices)
            return out, jax.lax.psum(slot_steps, tuple(mesh.axis_names))

        spec = parallel.rows_spec(mesh)
        out, slot_steps = compat.shard_map(
            per_device, mesh=mesh, in_specs=(PartitionSpec(), spec, spec, spec, PartitionSpec()),
            out_specs=(spec, PartitionSpec()), check_vma=False,
        )(params, keys, prompt_tokens, prompt_mask, knobs)  # fmt: skip
    rollout = Rollout(
        prompt_tokens=prompt_tokens,
        prompt_mask=prompt_mask,
        response_tokens=out["tokens"],
        response_mask=out["mask"],
        sampled_logp=out["sampled_logp"],
        untruncated_logp=out["untruncated_logp"],
        response_length=jnp.sum(out["mask"], axis=1).astype(jnp.int32),
        truncated=~out["ended"],
        policy_version=jnp.broadcast_to(policy_version, (batch,)).astype(jnp.int32),
    )
    return rollout, slot_steps


@functools.partial(jax.jit, static_argnums=0)
def _generate_jit(program: GenerationProgram, params, version, key, *rest):
    next_key, keys = row_keys(key, rest[0].shape[0])
    rollout, _ = _generate_program(program, params, version, keys, *rest)
    return rollout, next_key


def check_slots(decode_slots: int, rows: int, devices: int) -> None:
    """`decode_slots` must split evenly over the devices, as the rows do (`generate_rows`)."""
    if decode_slots % devices or rows % devices:
        raise ValueError(
            f"decode_slots = {decode_slots} and the {rows} rows must both divide over the "
            f"{devices} devices (each device decodes its share of the rows in its own slots)"
        )


def _check_prompts(tokens, mask, group_size: int, decode_slots: int, mesh) -> None:
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
    check_slots(decode_slots, tokens.shape[0] * group_size, devices)


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
    _check_prompts(tokens, mask, group_size, config.decode_slots, mesh)
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
) -> tuple[Rollout, jax.Array]:
    """The generation program for callers that trace it inside their own jit (`rl_jax.step`).

    row_tokens, row_mask: `[B, P]` prompts already expanded to rows (`rl_jax.groups`) and
    left-padded; keys: `[B]` row keys, `row_keys(key, B)[1]` for the draws `generate` makes with
    `state.key = key` (rows of several such calls may be stacked into one batch: each row's
    draws depend on its own key only). The config's knobs become constants of the caller's
    program. `loop_axes`: the names of the vmapped axes the call is inside (they share one
    decode loop, which runs until every row is done). Returns (Rollout, slot-steps): the
    decode slots times the decode steps plus one per refill, summed over devices; the
    Rollout's kept tokens over it are `sampler/row_step_utilization`.
    """
    program = GenerationProgram.of(graphdef, config, mesh, loop_axes)
    return _generate_program(
        program, params, policy_version, keys, row_tokens, row_mask, _Knobs.of(config)
    )
