"""Many seeds in one program: wall time per step of the embedded default for 1, 2, 5, 10 seeds.

    python benchmarks/seeds.py                       # seeds 1 2 5 10, 8 steps each
    python benchmarks/seeds.py --seeds 1 5 --steps 12

For each seed count N, the embedded default (warm-started tiny policy, 8 prompts x 8
responses; 16 x 8 before 2026-12-02, GRPO, sync_interval 1) runs `--steps` steps of
`rl_jax.train.HostSide.step` with `num_seeds = N`: one vmapped sample, the host reward of all N batches, one vmapped learn. The
median over the steps after the first (which compiles) is reported with its sample / learn
split, the time per seed-step, the ratio to one seed, and the useful FLOP rate of the whole step
(`peak.sequence_flops` at the batch's mean response length, times N) as a share of the matmul
peak measured in the same run. The 1-minute load average is recorded around each N; a line
`RESULT_JSON {...}` ends the output.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import peak  # noqa: E402

from rl_jax import build, host_memory, parallel  # noqa: E402
from rl_jax import config as config_lib  # noqa: E402
from rl_jax.train import HostSide, make_step  # noqa: E402


def measure(num_seeds: int, steps: int, out: pathlib.Path) -> dict:
    config = config_lib.build(
        "embedded", num_seeds=num_seeds, steps=steps, eval_every=0, checkpoint_every=0,
        out_dir=str(out),
    )  # fmt: skip
    run = build.build_run(config)
    mesh = parallel.make_mesh(config.fsdp)
    host = HostSide(config, run, make_step(config, run, mesh), mesh)
    state = host.step_fn.init(run.params, [single.seed for single in config.runs()])
    load_before = os.getloadavg()[0]
    times, samples, learns, lengths = [], [], [], []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        state, metrics = host.step(state, step)
        times.append(time.perf_counter() - start)
        samples.append(metrics[0]["time/sample"])
        learns.append(metrics[0]["time/learn"])
        lengths.append(statistics.mean(m["response_length/mean"] for m in metrics))
    rows = config.prompts_per_step * config.group_size
    flops = peak.sequence_flops(
        run.model_config, rows, run.task.max_prompt_len, round(statistics.mean(lengths[1:]))
    )
    median = statistics.median(times[1:])
    return {
        "seeds": num_seeds,
        "step_s": round(median, 4),
        "sample_s": round(statistics.median(samples[1:]), 4),
        "learn_s": round(statistics.median(learns[1:]), 4),
        "step_s_range": [round(min(times[1:]), 4), round(max(times[1:]), 4)],
        "first_step_s": round(times[0], 2),
        "gflops_per_s": round(num_seeds * (flops["sample"] + flops["train"]) / median / 1e9, 2),
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    matmul = peak.measure_peak()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.seeds:
            result = measure(n, args.steps, pathlib.Path(tmp) / f"seeds_{n}")
            result["peak_share"] = round(result["gflops_per_s"] / matmul["peak_gflops"], 3)
            results.append(result)
    base = results[0]["step_s"] / results[0]["seeds"]
    print(f"matmul peak {matmul['peak_gflops']:.1f} GFLOP/s (load {matmul['loadavg_1m']})")
    print("seeds  step s  (sample + learn)  per seed-step s  x one seed  GFLOP/s  peak share")
    for r in results:
        print(
            f"{r['seeds']:5d}  {r['step_s']:6.3f}  ({r['sample_s']:.3f} + {r['learn_s']:.3f})"
            f"  {r['step_s'] / r['seeds']:15.3f}  {r['step_s'] / base:10.2f}"
            f"  {r['gflops_per_s']:7.1f}  {r['peak_share']:10.2f}   load {r['loadavg_1m']}"
        )
    print("RESULT_JSON " + json.dumps({"peak": matmul, "runs": results}))


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    main()
