"""Learner and sampler throughput and FLOP utilisation over model sizes and batch shapes.

    python benchmarks/learner.py                     # the default grid, both phases
    python benchmarks/learner.py --phase learn --repeats 3
    python benchmarks/learner.py --models tiny-qwen2 --shapes 64x9x64,32x9x128

For every (model, shape = batch x prompt x response) it times, after one compiling call,
`--repeats` calls of
- learn: `Learner.update` (the `grpo` preset, AdamW, clip 1.0, no reference KL) on a batch of
  random tokens with every response token real, and
- sample: `sampler.generate` with EOS disabled, so exactly batch x response tokens are drawn,
and reports the median seconds, tokens/s (response tokens per second) and the achieved useful
FLOP/s (`peak.sequence_flops`) as a fraction of the matmul peak measured in the same run. The
models are random-initialised shapes of the Qwen2 family: `tiny-qwen2` is the reference
workload's (hidden 256, 4 layers, 4 / 2 heads, intermediate 704, vocab 512); `small` and
`medium` double the width and the depth. A line `RESULT_JSON {...}` ends the output.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from rl_jax import algorithms, host_memory, models, sampler  # noqa: E402
from rl_jax.config_sections import OptimizerConfig  # noqa: E402
from rl_jax.learner import Learner, TrainBatch  # noqa: E402

_BASE = models.ModelConfig(
    vocab_size=512, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
    intermediate_size=704, rope_theta=10000.0, rms_norm_eps=1e-6, qkv_bias=True,
    tie_embeddings=False,
)  # fmt: skip
MODELS = {
    "tiny-qwen2": _BASE,
    "small": dataclasses.replace(
        _BASE, hidden_size=512, num_heads=8, num_kv_heads=4, intermediate_size=1408
    ),  # fmt: skip
    "medium": dataclasses.replace(
        _BASE, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408
    ),  # fmt: skip
}
SHAPES = ("16x9x64", "64x9x64", "64x9x128")
GROUP = 8


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of `repeats` later calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def random_batch(config, batch: int, prompt: int, response: int) -> TrainBatch:
    """A `TrainBatch` of random tokens (seed 0) with every prompt and response token real."""
    rng = np.random.default_rng(0)
    tokens = lambda n: jnp.asarray(rng.integers(1, config.vocab_size, (batch, n)), jnp.int32)
    return TrainBatch(
        prompt_tokens=tokens(prompt), prompt_mask=jnp.ones((batch, prompt), jnp.int32),
        response_tokens=tokens(response), response_mask=jnp.ones((batch, response), jnp.float32),
        untruncated_logp=jnp.full((batch, response), -np.log(config.vocab_size), jnp.float32),
        rewards=jnp.asarray(rng.integers(0, 2, (batch,)), jnp.float32),
    )  # fmt: skip


def learn_runner(config, params, batch: int, prompt: int, response: int):
    graphdef, params = params
    learner = Learner(
        graphdef=graphdef, algorithm=algorithms.get("grpo"),
        optimizer=OptimizerConfig(learning_rate=1e-5, grad_clip=1.0), group_size=GROUP,
        ref_metrics=False,
    )  # fmt: skip
    train_batch = random_batch(config, batch, prompt, response)
    state = learner.init(params)
    key = jax.random.key(0)

    def run():
        nonlocal state
        state, metrics = learner.update(state, train_batch, None, key)
        float(metrics["loss"])

    return run


def sample_runner(config, params, batch: int, prompt: int, response: int):
    graphdef, params = params
    sampling = sampler.SamplingConfig(
        eos_id=config.vocab_size, temperature=1.0, max_new_tokens=response,
        prompt_buckets=(prompt,), generation_buckets=(response,),
    )  # fmt: skip
    ids = np.random.default_rng(0).integers(1, config.vocab_size, (batch // GROUP, prompt))
    mask = np.ones_like(ids)
    state = sampler.SamplerState.create(params, jax.random.key(0))

    def run():
        nonlocal state
        rollout, state = sampler.generate(graphdef, state, ids, mask, sampling, GROUP)
        np.asarray(rollout.response_length)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"of {list(MODELS)}")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="batch x prompt x response")
    parser.add_argument("--phase", choices=("both", "learn", "sample"), default="both")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    phases = ("learn", "sample") if args.phase == "both" else (args.phase,)
    peak_result = peak.measure_peak()
    peak_flops = peak_result["peak_gflops"] * 1e9
    print(f"matmul peak {peak_result['peak_gflops']} GFLOP/s", flush=True)
    rows = []
    for name in args.models.split(","):
        config = MODELS[name]
        model = models.init_model(config, 0)
        num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        params = nnx.split(model)
        for shape in args.shapes.split(","):
            batch, prompt, response = (int(x) for x in shape.split("x"))
            flops = peak.sequence_flops(config, batch, prompt, response)
            for phase in phases:
                make = learn_runner if phase == "learn" else sample_runner
                load = os.getloadavg()[0]
                first, median = _median_seconds(
                    make(config, params, batch, prompt, response), args.repeats
                )
                phase_flops = flops["train" if phase == "learn" else "sample"]
                row = {
                    "model": name, "params_m": round(num_params / 1e6, 2), "shape": shape,
                    "phase": phase, "first_s": round(first, 3), "median_s": round(median, 4),
                    "tokens_per_s": round(batch * response / median, 1),
                    "gflop": round(phase_flops / 1e9, 2),
                    "gflops": round(phase_flops / median / 1e9, 2),
                    "mfu": round(phase_flops / median / peak_flops, 3),
                    "loadavg_1m": round(load, 2),
                }  # fmt: skip
                rows.append(row)
                print(
                    f"{name:10s} {row['params_m']:5.2f}M {shape:9s} {phase:6s} "
                    f"median {median:7.3f} s  {row['tokens_per_s']:8.1f} tok/s  "
                    f"{row['gflops']:6.2f} GFLOP/s  MFU {row['mfu']:.3f}  load {load:.2f}",
                    flush=True,
                )
    result = {"peak": peak_result, "rows": rows, "jax": jax.__version__}
    print("RESULT_JSON " + json.dumps(result))


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    main()
