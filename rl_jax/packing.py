"""Packed sequences: the learner pays for real tokens, not padding (issue 31).

The padded layout gives every row its prompt bucket P plus the response width N. Packing lays
the real tokens of each row (its prompt tokens with mask 1, then its response up to its length)
end to end into R packed rows of W positions. Each row is a segment: its own id, positions
0, 1, 2, ... (the RoPE positions the padded layout gives it: `default_positions` counts real
tokens only), and attention never leaves it (`Decoder.hidden_states(segment_ids=...)`, one mask
for every attention implementation). A real token's hidden state is therefore the padded
layout's, up to float summation order, and so is every log-prob, entropy and KL term; the
learner gathers them back to `[rows, N]` and computes the loss and metrics on that layout as
before (the same token-mean and global denominator, per-row sequence means per row).

Shards. The learner splits a batch into micro-batches and each micro-batch's rows over the
devices of its mesh (`Learner.shard_rows`: `[M, S, r]` row ids); each shard packs only its own
rows, so gradient accumulation and per-device accumulation see nothing else. A `Packing` of a
batch of B rows in M micro-batches of S shards, each shard R packed rows:

  source    [M, S * R, W]  index into the shard's `[r, P + N]` tokens concat(prompt, response),
                           flattened, of the token at each packed position (0 on filler).
  segment   [M, S * R, W]  1 + the row's index in its shard; 0 on filler.
  position  [M, S * R, W]  the token's position in its row.
  target    [B, N]         index into the shard's packed positions `[R * W]`, flattened, of the
                           hidden state that predicts response token n of row b (the position
                           of the token before it); 0 past the row's length (masked anyway).

Shapes, so that the jitted update compiles a bounded number of times. W is the smallest of
`widths(P + N)` (P + N, and P + N halved, quartered and eighthed, rounded up) that holds the
longest row; R is the most bins that first-fit-decreasing needs in any shard, rounded up to a
multiple of ceil(r / 32). So one batch shape gives at most 4 x 32 packed updates, each logged
once when first planned, and R <= r, W <= P + N: a packed update never holds more positions
than the padded one. Leading axes (runs of `num_seeds`) share one shape: the largest.
"""

from __future__ import annotations

import logging

import flax.struct
import jax
import numpy as np

_LOG = logging.getLogger(__name__)
NUM_WIDTHS = 4  # P + N, then halved NUM_WIDTHS - 1 times
ROW_STEPS = 32  # packed row counts: multiples of ceil(rows per shard / ROW_STEPS)
_planned: set = set()  # shapes logged so far


@flax.struct.dataclass
class Packing:
    """Index arrays of a packed batch (module docstring); int32, optional leading axes."""

    source: jax.Array
    segment: jax.Array
    position: jax.Array
    target: jax.Array


def planned_shapes() -> int:
    """How many distinct packed shapes `plan` has produced in this process (each compiles)."""
    return len(_planned)


def widths(full: int) -> tuple[int, ...]:
    """The packed widths for a padded width `full`, largest first."""
    return tuple(dict.fromkeys(-(-full // 2**k) for k in range(NUM_WIDTHS)))


def row_bucket(needed: int, rows: int) -> int:
    """`needed` packed rows rounded up to a multiple of ceil(rows / ROW_STEPS), at most `rows`."""
    step = -(-rows // ROW_STEPS)
    return min(-(-needed // step) * step, rows)


def first_fit_decreasing(lengths: np.ndarray, width: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each summing to <= `width`: longest first, each into the
    first bin with room (stable: equal lengths keep their order)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        size = int(lengths[i])
        b = next((b for b, free in enumerate(room) if size <= free), len(bins))
        if b == len(bins):
            bins.append([])
            room.append(width)
        bins[b].append(int(i))
        room[b] -= size
    return bins


def plan(prompt_mask, response_lengths, response_width: int, shard_rows) -> Packing:
    """The `Packing` (numpy) of batches with `prompt_mask` `[..., B, P]` (1 on real tokens, at
    least one per row), `response_lengths` `[..., B]` in [0, N] (the response mask of a row is
    1 on its first length tokens) and the learner's `shard_rows` `[M, S, r]`."""
    masks = np.asarray(prompt_mask) != 0
    lengths = np.asarray(response_lengths).astype(np.int64)
    lead, (batch, prompt_width) = lengths.shape[:-1], masks.shape[-2:]
    if masks.shape[:-1] != lengths.shape:
        raise ValueError(f"packing: prompt mask {masks.shape} and lengths {lengths.shape} differ")
    masks, lengths = masks.reshape(-1, batch, prompt_width), lengths.reshape(-1, batch)
    shard_rows = np.asarray(shard_rows)
    num_micro, num_shards, rows = shard_rows.shape
    if shard_rows.size != batch:
        raise ValueError(f"packing: {shard_rows.shape} shards of a batch of {batch} rows")
    if masks.sum(-1).min() < 1:
        raise ValueError("packing: every row needs at least one prompt token")
    if lengths.min() < 0 or lengths.max() > response_width:
        raise ValueError(f"packing: response lengths must lie in [0, {response_width}]")
    full = prompt_width + response_width
    totals = masks.sum(-1) + lengths
    width = min(w for w in widths(full) if w >= totals.max())
    shards = shard_rows.reshape(num_micro * num_shards, rows)
    bins = [[first_fit_decreasing(t[ids], width) for ids in shards] for t in totals]
    packed = row_bucket(max(len(b) for run in bins for b in run), rows)
    key = (batch, prompt_width, response_width, shard_rows.shape, packed, width)
    if key not in _planned:
        _planned.add(key)
        _LOG.info(
            "packed update: %d rows of %d positions per shard (padded: %d of %d)",
            packed, width, rows, full,
        )  # fmt: skip

    shape = (len(totals), num_micro, num_shards * packed, width)
    source, segment, position = (np.zeros(shape, np.int32) for _ in range(3))
    target = np.zeros((len(totals), batch, response_width), np.int32)
    for k, run_bins in enumerate(bins):
        for shard, (ids, shard_bins) in enumerate(zip(shards, run_bins, strict=True)):
            micro, first = divmod(shard, num_shards)
            for b, members in enumerate(shard_bins):
                row, offset = first * packed + b, 0
                for i in members:
                    cols = np.concatenate(
                        [
                            np.flatnonzero(masks[k, ids[i]]),
                            prompt_width + np.arange(lengths[k, ids[i]]),
                        ]
                    )
                    span = slice(offset, offset + len(cols))
                    source[k, micro, row, span] = i * full + cols
                    segment[k, micro, row, span] = i + 1
                    position[k, micro, row, span] = np.arange(len(cols))
                    # Response token n is predicted by the position of the token before it.
                    prompt_len = len(cols) - lengths[k, ids[i]]
                    n = np.arange(lengths[k, ids[i]])
                    target[k, ids[i], n] = b * width + offset + prompt_len - 1 + n
                    offset += len(cols)
    return Packing(
        source=source.reshape(*lead, *shape[1:]),
        segment=segment.reshape(*lead, *shape[1:]),
        position=position.reshape(*lead, *shape[1:]),
        target=target.reshape(*lead, batch, response_width),
    )
