"""The machine's measured float32 matmul peak, the denominator of every FLOP-utilisation figure.

    python benchmarks/peak.py                 # JAX (XLA:CPU), all cores
    python benchmarks/peak.py --torch         # also torch.matmul (if installed)

Square float32 matmuls C = A B of size n (2 n^3 FLOP each) under `jax.jit`, several sizes;
for each size the median of `--repeats` timed calls (after one warm-up call), and the peak is
the best size's median GFLOP/s. `measure_peak()` is imported by benchmarks/rl_step.py,
benchmarks/learner.py and benchmarks/sampler.py so that utilisation is always measured against
the peak of the same run, on the same (possibly shared) machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

SIZES = (256, 512, 1024, 2048)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compile, first-touch pages
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_matmul_gflops(n: int, repeats: int = 7, dtype=jnp.float32) -> float:
    """Median GFLOP/s of an [n, n] @ [n, n] matmul in `dtype` under jax.jit."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n), np.float32), dtype) for _ in range(2))
    matmul = jax.jit(jnp.matmul)
    seconds = _median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)
    return 2 * n**3 / seconds / 1e9


def torch_matmul_gflops(n: int, repeats: int = 7) -> float:
    """Median GFLOP/s of an [n, n] @ [n, n] float32 torch.matmul."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = _median_seconds(lambda: torch.matmul(a, b), repeats)
    return 2 * n**3 / seconds / 1e9


def measure_peak(sizes=SIZES, repeats: int = 7, with_torch: bool = False) -> dict:
    """{"peak_gflops": best JAX median, "jax": {n: GFLOP/s}, ["torch": {...}], load average}."""
    load_before = os.getloadavg()[0]
    result = {"jax": {n: round(jax_matmul_gflops(n, repeats), 2) for n in sizes}}
    if with_torch:
        result["torch"] = {n: round(torch_matmul_gflops(n, repeats), 2) for n in sizes}
    result["peak_gflops"] = max(result["jax"].values())
    result["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def forward_flops(config, context_lengths) -> float:
    """Matmul FLOPs of one causal forward pass, 2 per multiply-add, counting useful work only.

    `context_lengths`: for every token fed to the model, how many positions it attends to
    (its own included); with a KV cache this is the same count as a full forward over the
    sequence. Per token: 2 x (every weight matrix's size, the output head included) plus
    attention, 2 x 2 x heads x head_dim x context (q k^T and probs v). Norms, RoPE, softmax
    and the optimizer are elementwise work and not counted.
    """
    c = config
    attn_width = c.num_heads * c.head_dim
    kv_width = c.num_kv_heads * c.head_dim
    per_layer = 2 * c.hidden_size * attn_width + 2 * c.hidden_size * kv_width
    per_layer += 3 * c.hidden_size * c.intermediate_size
    weights = c.num_layers * per_layer + c.hidden_size * c.vocab_size
    context = np.asarray(context_lengths, np.float64)
    attention = c.num_layers * 4 * attn_width * context.sum()
    return float(2 * weights * context.size + attention)


def sequence_flops(config, batch: int, prompt_len: int, response_len: int) -> dict:
    """Useful FLOPs of sampling `response_len` tokens after `prompt_len` for `batch` rows, and of
    one training forward + backward (3x the forward: the backward costs two matmuls per
    forward matmul) over prompt + response."""
    seq = prompt_len + response_len
    sampled = np.arange(1, seq)  # the last sampled token is never fed back
    trained = np.arange(1, seq + 1)
    return {
        "sample": batch * forward_flops(config, sampled),
        "train": 3 * batch * forward_flops(config, trained),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--torch", action="store_true", help="also time torch.matmul")
    args = parser.parse_args()
    result = measure_peak(repeats=args.repeats, with_torch=args.torch)
    for lib in ("jax", "torch"):
        for n, gflops in result.get(lib, {}).items():
            print(f"{lib:5s} n={n:5d}  {gflops:7.2f} GFLOP/s")
    print(f"peak {result['peak_gflops']:.2f} GFLOP/s  load {result['loadavg_1m']}")
    print("RESULT_JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
