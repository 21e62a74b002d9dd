"""Many seeds in one program: wall time per step of the embedded default for 1, 2, 5, 10 seeds.

    python benchmarks/seeds.py                       # seeds 1 2 5 10, 8 steps each
    python benchmarks/seeds.py --seeds 1 5 --steps 12

For each seed count N, the embedded default (warm-started tiny policy, 8 prompts x 8
responses, GRPO, sync_interval 1) runs `--steps` steps of `rl_jax.host_side.HostSide.step` with
`num_seeds = N`: one compiled sample, the host reward of all N batches, one compiled learn. The
process has one XLA:CPU device per core (`rl_jax.parallel.use_cpu_cores`, as the command-line
entry points; `RL_JAX_CPU_DEVICES` sets the count), and several settings run in it, their steps
alternating: the runs one at a time inside the program (`runs_per_batch = 1`, the default) on all
devices; the same on the first device alone (what one device per process gives); and for N > 1
all N vmapped together (`runs_per_batch = N`) on all devices. The median over the steps after
the first (which compiles) is reported with its sample / learn split, the time per seed-step,
the ratio to one seed on all devices, and the useful FLOP rate of the whole step
(`peak.sequence_flops` at the batch's mean response length, times N) as a share of the matmul
peak measured in the same run, and the process's CPU seconds per step (all its threads, XLA's
included) with the cores they keep busy on average (CPU s / step s). The 1-minute load average
is recorded around each N; a line `RESULT_JSON {...}` ends the output.
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

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import peak  # noqa: E402

from rl_jax import build, host_memory, parallel  # noqa: E402
from rl_jax import config as config_lib  # noqa: E402
from rl_jax.host_side import HostSide  # noqa: E402
from rl_jax.train import make_step  # noqa: E402


def _host(num_seeds: int, runs_per_batch: int, devices: int, steps: int, out: pathlib.Path):
    config = config_lib.build(
        "embedded", num_seeds=num_seeds, runs_per_batch=runs_per_batch, steps=steps,
        eval_every=0, checkpoint_every=0, out_dir=str(out),
    )  # fmt: skip
    run = build.build_run(config)
    mesh = parallel.make_mesh(config.memory.fsdp, jax.devices()[:devices])
    host = HostSide(config, run, make_step(config, run, mesh), mesh)
    params = jax.device_put(run.params, parallel.replicated(mesh))
    return host, host.step_fn.init(params, [single.seed for single in config.runs()])


def measure(num_seeds: int, steps: int, out: pathlib.Path) -> list[dict]:
    """One result per (runs_per_batch, devices) setting, their steps alternating."""
    everywhere = jax.device_count()
    settings = sorted({(1, everywhere), (1, 1), (num_seeds, everywhere)})
    hosts = {
        (b, d): _host(num_seeds, b, d, steps, out / f"batch_{b}_devices_{d}") for b, d in settings
    }
    record = {
        key: {"times": [], "cpu": [], "sample": [], "learn": [], "length": []} for key in settings
    }
    load_before = os.getloadavg()[0]
    for step in range(1, steps + 1):
        for key in settings:
            host, state = hosts[key]
            start, cpu_start = time.perf_counter(), time.process_time()
            state, metrics = host.step(state, step)
            hosts[key] = (host, state)
            r = record[key]
            r["times"].append(time.perf_counter() - start)
            r["cpu"].append(time.process_time() - cpu_start)
            r["sample"].append(metrics[0]["time/sample"])
            r["learn"].append(metrics[0]["time/learn"])
            r["length"].append(statistics.mean(m["response_length/mean"] for m in metrics))
    load_after = os.getloadavg()[0]
    results = []
    for key in settings:
        host, r = hosts[key][0], record[key]
        config = host.config
        flops = peak.sequence_flops(
            host.run.model_config, config.prompts_per_step * config.group_size,
            host.run.task.max_prompt_len, round(statistics.mean(r["length"][1:])),
        )  # fmt: skip
        median = statistics.median(r["times"][1:])
        cpu = statistics.median(r["cpu"][1:])
        results.append({
            "seeds": num_seeds,
            "runs_per_batch": key[0],
            "devices": key[1],
            "step_s": round(median, 4),
            "sample_s": round(statistics.median(r["sample"][1:]), 4),
            "learn_s": round(statistics.median(r["learn"][1:]), 4),
            "step_s_range": [round(min(r["times"][1:]), 4), round(max(r["times"][1:]), 4)],
            "cpu_s": round(cpu, 4),
            "cores_busy": round(cpu / median, 2),
            "first_step_s": round(r["times"][0], 2),
            "gflops_per_s": round(num_seeds * (flops["sample"] + flops["train"]) / median / 1e9, 2),
            "loadavg_1m": [round(load_before, 2), round(load_after, 2)],
        })  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    if min(args.seeds) < 1 or args.steps < 2:
        parser.error("--seeds must be >= 1 and --steps >= 2 (the first step compiles)")
    embedded = config_lib.build("embedded")
    parallel.use_cpu_cores(embedded.rows)
    matmul = peak.measure_peak()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.seeds:
            for result in measure(n, args.steps, pathlib.Path(tmp) / f"seeds_{n}"):
                result["peak_share"] = round(result["gflops_per_s"] / matmul["peak_gflops"], 3)
                results.append(result)
    one = [r for r in results if r["seeds"] == 1 and r["devices"] == jax.device_count()]
    base = one[0]["step_s"] if one else None
    print(
        f"matmul peak {matmul['peak_gflops']:.1f} GFLOP/s (load {matmul['loadavg_1m']}), "
        f"{jax.device_count()} device(s)"
    )
    print("seeds  runs/batch  devices  step s  (sample + learn)  per seed-step s  x one seed"
          "  GFLOP/s  peak share  CPU s  cores busy")  # fmt: skip
    for r in results:
        ratio = f"{r['step_s'] / base:10.2f}" if base else f"{'-':>10}"
        print(
            f"{r['seeds']:5d}  {r['runs_per_batch']:10d}  {r['devices']:7d}  {r['step_s']:6.3f}"
            f"  ({r['sample_s']:.3f} + {r['learn_s']:.3f})  {r['step_s'] / r['seeds']:15.3f}"
            f"  {ratio}  {r['gflops_per_s']:7.1f}  {r['peak_share']:10.2f}  {r['cpu_s']:5.3f}"
            f"  {r['cores_busy']:10.2f}   load {r['loadavg_1m']}"
        )
    print(
        "RESULT_JSON "
        + json.dumps({"peak": matmul, "devices": jax.device_count(), "runs": results})
    )


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    main()
