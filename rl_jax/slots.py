"""The decode loop of the sampler: a queue of rows through a fixed number of decode slots.

    rows 0 .. Q-1 (a prompt and a row key each)  ->  S slots, each with its own KV cache region
    loop: every live slot decodes one token; a slot whose row ends (EOS, a stop sequence, the
          cap) takes the next row of the queue: its prompt is prefilled into the slot's cache
          region and its first token drawn, while the other slots keep their state.

This is continuous batching (vLLM, SGLang, JetStream) inside one `lax.while_loop`. It is exact:
row r draws token t from fold_in(key_r, t) and attends to its own prompt and tokens only, in the
same cache layout as every other row (prompt left-padded to the bucket width P in slots 0 .. P-1,
token t's k/v in slot P + t), so a row's tokens depend on its prompt, its key and the parameters
alone, not on the slot it gets or on its neighbours. With S = Q (`slots=0`) the first prefill
fills every slot and nothing is refilled: the lock-step decode of all rows until the longest is
done. With sync_interval = k every row of a window is drawn from the same parameters, so the
queue may hold the whole window (`rl_jax.step`) without changing any row's distribution.

Prefill: the first S rows in one batch; a later row alone, when its slot frees (the rows that
free in the same step are prefilled one after another, each into its slot's cache region).
The alternative, a chunked prefill that feeds prompt tokens through the decode steps, would
hold a slot for P more steps per row and pad every decode step to the chunk; a prompt of one
row is a [P, d] forward that costs about one decode step of the slots.

Decode attention reads only the filled part of the cache: the cache is held in groups of
`GROUP_SLOTS` slots and in chunks along its length (`kv_widths`), each group's chunk its own
buffer, and a step reads each group's chunks up to that group's furthest live slot
(`decode_rows`), not the whole static P + N. Reading a prefix of
one buffer instead would copy it first on XLA:CPU, which cost more than it saved
(BENCHMARKS.md, "Slot decoding"). The lock-step decode (one slot per row) keeps its cache in
one chunk and reads all of it, as before slots: on XLA:CPU each chunk a step may read keeps its
own float32 copy of the chunk, 1.9 GiB per device more for Qwen2.5-1.5B at the paper's step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rl_jax.models.attention import attend_cache_chunks
from rl_jax.models.config import ModelConfig
from rl_jax.models.decoder import KVCache
from rl_jax.sampling import draw

OUTPUTS = ("tokens", "mask", "sampled_logp", "untruncated_logp")
GROUP_SLOTS = 8  # slots per cache group: each group reads up to its own furthest live slot


def kv_widths(total: int) -> tuple[int, ...]:
    """The ends of the cache's chunks: multiples of a chunk of at least 16 slots, at most 8 of
    them, the last `total` (a decode step reads 1 .. 8 chunks)."""
    eighth = -(-total // 8)
    chunk = max(16, -(-eighth // 16) * 16)
    return tuple(range(chunk, total, chunk)) + (total,)


def ends_response(recent: jax.Array, token: jax.Array, knobs) -> jax.Array:
    """Whether `token` [B] is EOS or completes a stop sequence; `recent` [B, M] ends with it."""
    stops = knobs.stop_ids[None]  # [1, num_stops, M]
    matched = jnp.all((recent[:, None, :] == stops) | (stops == -1), axis=2)
    return (token == knobs.eos_id) | jnp.any(matched, axis=1)


def _shared(x, loop_axes, reduce=jax.lax.psum):
    """`x` reduced over the named vmapped axes `loop_axes`: a value every batch agrees on, so a
    loop condition or branch index built from it stays unbatched (no select between carries)."""
    for axis in loop_axes:
        x = reduce(x, axis)
    return x


def chunked_cache(config: ModelConfig, batch: int, sizes, dtype=None) -> KVCache:
    """Zero KV cache for `decode_rows`: per layer, a tuple of chunks of the cache length
    `sizes` (keys `[batch, kv_heads, head_dim, size]`, values `[batch, kv_heads, size, d]`)."""
    dtype = jnp.dtype(dtype or config.dtype)
    heads, dim = config.num_kv_heads, config.head_dim
    keys = tuple(jnp.zeros((batch, heads, dim, n), dtype) for n in sizes)
    values = tuple(jnp.zeros((batch, heads, n, dim), dtype) for n in sizes)
    return KVCache((keys,) * config.num_layers, (values,) * config.num_layers)


def _write_rows(chunk, new, axis, at):
    """`chunk` (of a `chunked_cache`) with row b's `new[b]` written at `at[b]` along `axis`
    where 0 <= at[b] < the chunk's length. With one scalar `at` for all rows this is a
    dynamic_update_slice, not a scatter (XLA:CPU computes a bfloat16 scatter in float32,
    converting the whole chunk both ways)."""
    inside = (at >= 0) & (at < chunk.shape[axis])
    new = new.astype(chunk.dtype)
    if jnp.ndim(at) == 0:
        start = [jnp.int32(0)] * chunk.ndim
        start[axis] = jnp.clip(at, 0, chunk.shape[axis] - 1)
        new = jnp.expand_dims(new, axis)
        old = jax.lax.dynamic_slice(chunk, start, new.shape)
        return jax.lax.dynamic_update_slice(chunk, jnp.where(inside, new, old), start)
    batch = chunk.shape[0]
    target = jnp.where(inside, jnp.arange(batch), batch)  # else dropped
    index = (target, slice(None), slice(None), jnp.clip(at, 0, chunk.shape[axis] - 1))
    if axis == 2:
        index = (target, slice(None), index[3], slice(None))
    return chunk.at[index].set(new, mode="drop")


def decode_rows(model, tokens, positions, caches, cache_index, first_slot, chunks_read,
                layers=None):  # fmt: skip
    """One decode step of `model` (a `Decoder`, its layers unrolled as in `Decoder.decode`): one
    token per row, each row at its own cache slot, against a cache in groups of rows and chunks.

    `caches`: G `KVCache`s of `chunked_cache`, group g holding rows g * B/G .. (g + 1) * B/G - 1,
    each its own buffers, per layer a tuple of chunks along the cache length. tokens, positions,
    first_slot: `[B]` int32; cache_index: `[B]` int32, or a scalar (every row at one slot: the
    lock-step decode). Row b writes its k/v at slot `cache_index[b]` and attends to slots
    `first_slot[b] <= j <= cache_index[b]` (left padding before `first_slot`, nothing written
    yet after `cache_index`). Group g's attention reads only its first `chunks_read[g]` chunks
    (`[G]`, traced, >= 1; they must hold its rows' slots): the branches of a `lax.switch` read
    1, 2, ... chunks, each chunk its own buffer, so a decode step reads the filled part of each
    group's cache without copying it. Returns (logits `[B, vocab]`, caches).
    """
    batch, groups = tokens.shape[0], len(caches)
    size = batch // groups
    dtype = model.config.dtype
    sizes = [v.shape[2] for v in caches[0].v[0]]
    starts = np.cumsum([0, *sizes])
    x = model.embed_tokens(tokens[:, None])
    last = jnp.broadcast_to(cache_index, (batch,))
    at = lambda g: cache_index if jnp.ndim(cache_index) == 0 else cache_index[g * size :][:size]

    def attend_first(count, g):
        first, end = first_slot[g * size :][:size], last[g * size :][:size]

        def attend(q, k_chunks, v_chunks):
            slot = jnp.arange(starts[count], dtype=jnp.int32)[None]
            allowed = (slot >= first[:, None]) & (slot <= end[:, None])
            k_t = [k.astype(dtype) for k in k_chunks[:count]]
            v = [v.astype(dtype) for v in v_chunks[:count]]
            return attend_cache_chunks(q, k_t, v, allowed[:, None])

        return attend

    branches = [[attend_first(n, g) for n in range(1, len(sizes) + 1)] for g in range(groups)]
    written = [([], []) for _ in range(groups)]
    for i, block in enumerate(layers or model.unstacked_layers()):
        q, k, new_v = block.qkv(x, positions[:, None])
        k_new, v_new = k[:, 0], new_v[:, 0]  # [batch, kv_heads, head_dim]
        attn = []
        for g, cache in enumerate(caches):
            rows = slice(g * size, (g + 1) * size)
            k_chunks = tuple(
                _write_rows(c, k_new[rows], 3, at(g) - a)
                for c, a in zip(cache.k[i], starts[:-1], strict=True)
            )
            v_chunks = tuple(
                _write_rows(c, v_new[rows], 2, at(g) - a)
                for c, a in zip(cache.v[i], starts[:-1], strict=True)
            )
            if len(sizes) == 1:
                attn.append(branches[g][0](q[rows], k_chunks, v_chunks))
            else:
                attn.append(
                    jax.lax.switch(chunks_read[g] - 1, branches[g], q[rows], k_chunks, v_chunks)
                )
            written[g][0].append(k_chunks)
            written[g][1].append(v_chunks)
        x = block.finish(x, jnp.concatenate(attn, axis=0))
    caches = tuple(KVCache(tuple(k), tuple(v)) for k, v in written)
    return model.logits_of(model.final_norm(x))[:, 0], caches


def decode(model, layers, keys, prompt_tokens, prompt_mask, knobs, *, slots, width,
           top_k_width, nucleus, loop_axes=(), rows=None):  # fmt: skip
    """Decodes the queue `prompt_tokens`, `prompt_mask` `[Q, P]` (left-padded), `keys` `[Q]`.

    `knobs` (`sampler._Knobs`): the traced sampling settings; `knobs.max_new_tokens` is the cap
    of every row or, without a mesh, `[Q]` caps, one per row (benchmarks/padding_sampler.py ends
    rows at drawn lengths this way). Returns a dict: the `[Q, width]` columns of `OUTPUTS`
    (pad_id / 0 after a row's end), `ended` `[Q]` (EOS or a stop sequence before the cap) and
    `decode_steps` (int32: the first prefill's draw plus the loop's steps, so S x decode_steps
    slot-steps were computed, plus one draw per refill). `slots`: S, static; 0 or >= Q: one
    slot per row. `loop_axes`: the named vmapped axes the call is inside; they share one loop
    (a per-batch condition would make vmap select between old and new carries, copying the KV
    cache every step). `rows`: the sharding of the rows (lock-step over a mesh without
    `shard_map`), which the KV cache follows.
    """
    prompt_tokens, prompt_mask = jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask)
    queue, prompt_width = prompt_tokens.shape
    num_slots = min(slots or queue, queue)
    # Slots in groups of GROUP_SLOTS, each group's cache its own buffers (`decode_rows`).
    group = GROUP_SLOTS if num_slots < queue and num_slots % GROUP_SLOTS == 0 else num_slots
    # The cache in chunks [0, ends[0]), [ends[0], ends[1]), ...; lock-step in one (module doc).
    ends = kv_widths(prompt_width + width) if num_slots < queue else (prompt_width + width,)
    sizes = [b - a for a, b in zip((0, *ends), ends, strict=False)]

    def store(caches, prefilled, slot, fill):
        """`caches` (in groups and chunks) with the prompt slots 0 .. P-1 of `prefilled` (a plain
        `[n, ...]` cache) written at slots slot .. slot + n - 1 where `fill`: all slots (the first
        prefill, slot 0) or one."""
        if prefilled.v[0].shape[0] == num_slots:
            part = lambda g: jax.tree.map(lambda x: x[g * group : (g + 1) * group], prefilled)
            return tuple(store_one(c, part(g), 0, fill) for g, c in enumerate(caches))
        return tuple(
            store_one(c, prefilled, jnp.clip(slot - g * group, 0, group - 1),
                      fill & (slot // group == g))
            for g, c in enumerate(caches)
        )  # fmt: skip

    def store_one(cache, prefilled, slot, fill):

        def put(chunk, part):
            start = (slot,) + (0,) * (chunk.ndim - 1)
            old = jax.lax.dynamic_slice(chunk, start, part.shape)
            return jax.lax.dynamic_update_slice(chunk, jnp.where(fill, part, old), start)

        def layer(chunks, plain, axis):
            return tuple(
                put(chunk, jax.lax.slice_in_dim(plain, a, min(b, prompt_width), axis=axis))
                if a < prompt_width else chunk
                for chunk, a, b in zip(chunks, (0, *ends), ends, strict=False)
            )  # fmt: skip

        return KVCache(
            tuple(layer(c, p, 3) for c, p in zip(cache.k, prefilled.k, strict=True)),
            tuple(layer(c, p, 2) for c, p in zip(cache.v, prefilled.v, strict=True)),
        )

    prompt_length = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1, dtype=jnp.int32) - 1, 0)
    top_p = knobs.top_p if nucleus else None
    stop_width = knobs.stop_ids.shape[1]
    caps = jnp.broadcast_to(knobs.max_new_tokens, (queue,))

    def emit(carry, row, t, recent, logits, active):
        """Draws column t of rows `row` ([n], those `active`) and records it in carry["out"]:
        (carry, token, recent, finished), finished = the row drew its last column."""
        sampled, sampled_logp, untruncated_logp = draw(
            logits, jax.vmap(jax.random.fold_in)(keys[row], t), top_k_width, knobs.top_k,
            knobs.temperature, top_p, knobs.greedy,
        )  # fmt: skip
        token = jnp.where(active, sampled, knobs.pad_id)
        recent = jnp.concatenate([recent[:, 1:], token[:, None]], axis=1)
        ended = active & ends_response(recent, token, knobs)
        target = jnp.where(active, row, queue)  # out of range: dropped
        columns = (token, jnp.ones_like(sampled_logp), sampled_logp, untruncated_logp)
        out = {
            name: carry["out"][name].at[target, t].set(value, mode="drop")
            for name, value in zip(OUTPUTS, columns, strict=True)
        }
        out["ended"] = carry["out"]["ended"].at[target].set(ended, mode="drop")
        finished = ended | (t + 1 >= caps[row])
        return {**carry, "out": out}, token, recent, finished

    def emit_slots(carry, logits):
        live = carry["live"]
        carry, token, recent, finished = emit(
            carry, carry["row"], carry["t"], carry["recent"], logits, live
        )
        return {**carry, "token": token, "recent": recent, "t": carry["t"] + live,
                "live": live & ~finished}  # fmt: skip

    def refill_one(carry):
        """Prefills the next row of the queue into the first free slot and draws its column 0;
        changes nothing where no slot is free or the queue is empty."""
        free = ~carry["live"]
        fill = jnp.any(free) & (carry["next"] < queue)
        slot, row = jnp.argmax(free), jnp.minimum(carry["next"], queue - 1)
        logits, prefilled = model.decode(
            prompt_tokens[row][None], positions[row][None], model.init_cache(1, prompt_width),
            jnp.int32(0), prompt_mask[row][None], layers, last_only=True, kv_len=prompt_width,
        )  # fmt: skip
        cache = store(carry["cache"], prefilled, slot, fill)
        recent = jnp.full((1, stop_width), -1, jnp.int32)
        carry, token, recent, finished = emit(
            carry, row[None], jnp.zeros(1, jnp.int32), recent, logits[:, -1], fill[None]
        )
        at = lambda name, value: carry[name].at[slot].set(jnp.where(fill, value, carry[name][slot]))
        return {
            **carry, "cache": cache, "row": at("row", row), "t": at("t", 1),
            "token": at("token", token[0]), "recent": at("recent", recent[0]),
            "live": at("live", ~finished[0]), "next": carry["next"] + fill,
        }  # fmt: skip

    def refill(carry):
        def wanted(carry):
            want = jnp.any(~carry["live"]) & (carry["next"] < queue)
            return _shared(want.astype(jnp.int32), loop_axes) > 0

        if num_slots == queue:  # every row has its slot from the start
            return carry
        return jax.lax.while_loop(wanted, refill_one, carry)

    def step(carry):
        """One decode step of every slot, then the refills."""
        row, t, live = carry["row"], carry["t"], carry["live"]
        index = prompt_width + t - 1  # the cache slot of the token being decoded
        filled = jnp.where(live, index + 1, 1).reshape(-1, group).max(axis=1)  # per group
        if num_slots == queue:  # lock-step: the live rows share one slot (ended rows write
            index = filled[0] - 1  # there too, into a region no row reads again)
        chunks_read = jnp.sum(jnp.asarray(ends)[None] < filled[:, None], axis=1) + 1
        chunks_read = _shared(chunks_read, loop_axes, jax.lax.pmax)
        logits, cache = decode_rows(
            model, carry["token"], prompt_length[row] + t - 1, carry["cache"], index,
            prompt_width - prompt_length[row], chunks_read, layers,
        )  # fmt: skip
        carry = {**carry, "cache": cache, "steps": carry["steps"] + jnp.any(live)}
        return refill(emit_slots(carry, logits))

    def more(carry):
        return _shared(jnp.any(carry["live"]).astype(jnp.int32), loop_axes) > 0

    first = slice(0, num_slots)
    logits, prefilled = model.decode(
        prompt_tokens[first], positions[first], model.init_cache(num_slots, prompt_width),
        jnp.int32(0), prompt_mask[first], layers, last_only=True,
    )  # fmt: skip
    place = lambda tree: (  # the cache and the outputs are placed like the rows
        tree
        if rows is None
        else jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rows), tree)
    )
    cache = place(
        tuple(chunked_cache(model.config, group, sizes) for _ in range(num_slots // group))
    )
    cache = store(cache, prefilled, jnp.int32(0), jnp.bool_(True))
    columns = lambda fill, dtype: place(jnp.full((queue, width), fill, dtype))
    carry = {
        "cache": cache,
        "row": jnp.arange(num_slots, dtype=jnp.int32),
        "t": jnp.zeros(num_slots, jnp.int32),
        "token": jnp.zeros(num_slots, jnp.int32),
        "recent": jnp.full((num_slots, stop_width), -1, jnp.int32),
        "live": jnp.ones(num_slots, bool),
        "next": jnp.int32(num_slots),
        "steps": jnp.int32(1),
        "out": {
            "tokens": columns(knobs.pad_id, jnp.int32),
            "mask": columns(0, jnp.float32),
            "sampled_logp": columns(0, jnp.float32),
            "untruncated_logp": columns(0, jnp.float32),
            "ended": place(jnp.zeros(queue, bool)),
        },
    }
    carry = jax.lax.while_loop(more, step, refill(emit_slots(carry, logits[:, -1])))
    return {**place(carry["out"]), "decode_steps": carry["steps"]}
