"""What bounds the learner update on the reference workload: its parts against their floors.

    python benchmarks/update_parts.py                 # 8 rounds, best of 3 calls each
    python benchmarks/update_parts.py --rounds 20

The reference update (benchmarks/learner.py's `tiny-qwen2` shapes: 64 rows x (9 + 64) tokens,
the `grpo` preset, AdamW, micro_batches 8, no reference KL, one CPU device) is compiled twice
in one process, and the two programs and an n = 1024 square matmul are called in turn, each
round keeping the best of `--best-of` calls of each:

- `update`: the update as it runs;
- `without attention core`: the same update with softmax(q k^T / sqrt(d)) v replaced by
  q + v (the KV heads repeated), which keeps every projection, RoPE, norm, the log-probs, the
  loss and the optimizer; the difference is what the attention core costs.

Then, isolated and alternating in the same way (minimum over `--calls` calls of each):

- the attention core of one layer and one micro-batch, forward + backward (`attend` under
  `jax.vjp`), against its six batched matmuls alone in the layout they need
  (`[16, 146, 64] x [16, 64, 73]` and the like: 16 = rows x KV heads, 146 = 2 query heads x 73);
- the update's projection matmuls (the 7 per layer, forward, backward-data and weight-gradient
  products, 8 rows x 73 tokens per micro-batch) in one jitted program: their GFLOP/s is the
  fastest these shapes run on the machine, to compare with the square-matmul peak
  (`peak.measure_peak`, measured in the same run) that defines the update's FLOP floor.

The update's FLOP floor is `peak.sequence_flops` at that peak. The machine's speed drifts within
minutes, so the update's time over its floor at each round's own square-matmul speed is
reported as well. The 1-minute load average is recorded; a line `RESULT_JSON {...}` ends the
output.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import peak  # noqa: E402
from learner import GROUP, MODELS, random_batch  # noqa: E402

from rl_jax import algorithms, host_memory, models  # noqa: E402
from rl_jax.config_sections import OptimizerConfig  # noqa: E402
from rl_jax.learner import Learner  # noqa: E402
from rl_jax.models.attention import attend  # noqa: E402

ROWS, PROMPT, RESPONSE, MICRO_BATCHES = 64, 9, 64, 8
PEAK_N = 1024  # the square matmul timed in every round, next to the updates


class WithoutAttentionCore(models.MemoryOptions):
    """`MemoryOptions` whose attention returns q + v (KV heads repeated): same shapes, no core."""

    def attend(self, q, k, v, allowed):
        return q + jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)


def reference_update(memory: models.MemoryOptions):
    """(jitted update of the reference workload with `memory`, its state, batch and key)."""
    config = MODELS["tiny-qwen2"]
    graphdef, params = nnx.split(models.init_model(config, 0))
    learner = Learner(
        graphdef=graphdef, algorithm=algorithms.get("grpo"),
        optimizer=OptimizerConfig(learning_rate=1e-5, grad_clip=1.0), group_size=GROUP,
        ref_metrics=False, micro_batches=MICRO_BATCHES, memory=memory,
    )  # fmt: skip
    batch = random_batch(config, ROWS, PROMPT, RESPONSE)
    state, key = learner.init(params), jax.random.key(0)
    update = jax.jit(lambda s, b, k: learner.traced_update(s, b, None, k))
    return update.lower(state, batch, key).compile(), (state, batch, key)


def alternate(programs: dict, rounds: int, best_of: int) -> dict:
    """{name: [best-of-`best_of` seconds per round]}, the programs called in turn each round."""
    times = {name: [] for name in programs}
    for _ in range(rounds):
        for name, (fn, args) in programs.items():
            best = float("inf")
            for _ in range(best_of):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                best = min(best, time.perf_counter() - start)
            times[name].append(best)
    return times


def attention_programs():
    """attend fwd + bwd of one layer and micro-batch, and its six batched matmuls alone."""
    c = MODELS["tiny-qwen2"]
    rows, seq = ROWS // MICRO_BATCHES, PROMPT + RESPONSE
    heads, kv_heads, dim = c.num_heads, c.num_kv_heads, c.head_dim
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    q, do = normal(rows, seq, heads, dim), normal(rows, seq, heads, dim)
    k, v = normal(rows, seq, kv_heads, dim), normal(rows, seq, kv_heads, dim)
    allowed = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (rows, seq, seq))

    def core(q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, allowed), q, k, v)
        return out, vjp(do)

    b, g = rows * kv_heads, heads // kv_heads
    mq, mk, mv, mdo = normal(b, g * seq, dim), normal(b, seq, dim), normal(b, seq, dim), normal(
        b, g * seq, dim
    )  # fmt: skip
    probs = normal(b, g * seq, seq)

    def matmuls(q, k, v, do, p):
        ein = jnp.einsum
        return (ein("bqd,bsd->bqs", q, k), ein("bqs,bsd->bqd", p, v), ein("bqd,bsd->bqs", do, v),
                ein("bqs,bqd->bsd", p, do), ein("bqs,bsd->bqd", p, k), ein("bqs,bqd->bsd", p, q))  # fmt: skip

    flops = 6 * 2 * b * g * seq * seq * dim
    return {
        "attention core fwd+bwd": (jax.jit(core), (q, k, v, do)),
        "its six batched matmuls": (jax.jit(matmuls), (mq, mk, mv, mdo, probs)),
    }, flops


def projection_program():
    """The 7 projections' forward, backward-data and weight-gradient matmuls of one layer and
    micro-batch, in one program; and their FLOPs."""
    c = MODELS["tiny-qwen2"]
    rows = ROWS // MICRO_BATCHES * (PROMPT + RESPONSE)
    d, kv, f = c.hidden_size, c.num_kv_heads * c.head_dim, c.intermediate_size
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    args = [(normal(rows, i), normal(i, o), normal(rows, o)) for i, o in shapes]
    dot = lambda a, b, ca, cb: jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())))

    def products(args):
        return [(dot(x, w, 1, 0), dot(dy, w, 1, 1), dot(x, dy, 0, 0)) for x, w, dy in args]

    flops = sum(3 * 2 * rows * i * o for i, o in shapes)
    return (jax.jit(products), (args,)), flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--best-of", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200, help="calls of each isolated part")
    args = parser.parse_args()
    if min(args.rounds, args.best_of, args.calls) < 1:
        parser.error("--rounds, --best-of and --calls must be >= 1")
    load_before = os.getloadavg()[0]
    square = jnp.ones((PEAK_N, PEAK_N), jnp.float32)
    updates = {
        "update": reference_update(models.MemoryOptions()),
        "without attention core": reference_update(WithoutAttentionCore()),
        f"square matmul n={PEAK_N}": (jax.jit(jnp.matmul), (square, square)),
    }
    for fn, fn_args in updates.values():
        jax.block_until_ready(fn(*fn_args))
    update_times = alternate(updates, args.rounds, args.best_of)

    attention, attention_flops = attention_programs()
    projections, projection_flops = projection_program()
    parts = {**attention, "projection matmuls": projections}
    for fn, fn_args in parts.values():
        jax.block_until_ready(fn(*fn_args))
    part_times = alternate(parts, args.calls, 1)
    peak_result = peak.measure_peak()

    result = {"updates": {}, "parts": {}, "peak": peak_result}
    for name, times in update_times.items():
        result["updates"][name] = {
            "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4),
        }  # fmt: skip
        print(f"{name:28s} median {statistics.median(times):.3f} s  range "
              f"{min(times):.3f}-{max(times):.3f} s")  # fmt: skip
    layers_x_micro = MODELS["tiny-qwen2"].num_layers * MICRO_BATCHES  # calls per update
    for name, times in part_times.items():
        flops = projection_flops if name == "projection matmuls" else attention_flops
        best = min(times)
        result["parts"][name] = {
            "min_ms": round(best * 1e3, 3), "median_ms": round(statistics.median(times) * 1e3, 3),
            "gflops_at_min": round(flops / best / 1e9, 1),
            "per_update_s_at_min": round(best * layers_x_micro, 4),
        }  # fmt: skip
        print(f"{name:28s} min {best * 1e3:.3f} ms  median "
              f"{statistics.median(times) * 1e3:.3f} ms  {flops / best / 1e9:.0f} GFLOP/s  "
              f"x{layers_x_micro} per update: {best * layers_x_micro:.3f} s")  # fmt: skip
    result["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["jax"] = jax.__version__
    train_flops = peak.sequence_flops(MODELS["tiny-qwen2"], ROWS, PROMPT, RESPONSE)["train"]
    floor = train_flops / (peak_result["peak_gflops"] * 1e9)
    # The floor in each round at that round's square-matmul speed: no drift between the two.
    round_peaks = [2 * PEAK_N**3 / t for t in update_times[f"square matmul n={PEAK_N}"]]
    ratios = [t * p / train_flops for t, p in zip(update_times["update"], round_peaks, strict=True)]
    update_s = result["updates"]["update"]["median_s"]
    result.update(
        floor_s=round(floor, 4), update_over_floor=round(update_s / floor, 3),
        update_over_round_floor=[round(x, 3) for x in sorted(ratios)],
    )  # fmt: skip
    print(
        f"peak {peak_result['peak_gflops']} GFLOP/s: the update's floor {floor:.3f} s, the "
        f"update's median {update_s / floor:.2f}x it; against each round's n={PEAK_N} matmul: "
        f"median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}); "
        f"load {result['loadavg_1m']}"
    )
    print("RESULT_JSON " + json.dumps(result))


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    main()
