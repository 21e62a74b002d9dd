"""The embedded default's RL step with the learner's packing off and on, alternated.

    python benchmarks/packing_embedded.py [--rounds 3] [--steps-per-round 3] [--json]

Two runs of `python -m rl_jax.train embedded` (same seed, no evaluation, no checkpoints; one
XLA:CPU device per core as the CLI sets up) step side by side in one process through
`rl_jax.host_side.HostSide.step`: after `--warmup-steps` untimed steps each (they compile the
update, and the packed run one update per new packed shape, `packing.planned_shapes`, which
a later step may still add), every round takes
`--steps-per-round` steps of the padded run, then as many of the packed run, and reports the
seconds of each (sample + learn, as `time/sample` and `time/learn` log them) and their ratio.
Both runs sample the same tokens (tests/test_packing.py), so only the update differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rl_jax import config as config_lib
from rl_jax import packing, parallel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed, compile")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    base = config_lib.build("embedded", eval_every=0, checkpoint_every=0)
    parallel.use_cpu_cores(base.rows // base.memory.micro_batches)

    import jax

    from rl_jax import build
    from rl_jax.host_side import HostSide
    from rl_jax.train import generation_window, make_step

    mesh = parallel.make_mesh(base.memory.fsdp)
    runs = {}
    for packed in (False, True):
        config = config_lib.build("embedded", eval_every=0, checkpoint_every=0, packing=packed)
        run = build.build_run(config)
        step_fn = make_step(config, run, mesh)
        params = jax.tree.map(
            parallel.from_host, run.params, parallel.param_shardings(run.params, mesh)
        )
        host = HostSide(config, run, step_fn, mesh, window_size=generation_window(config, run))
        runs["packed" if packed else "padded"] = [host, step_fn.init(params, [config.seed])]

    def steps(name, first, count):
        host, state = runs[name]
        seconds = {"sample": 0.0, "learn": 0.0}
        for k in range(first, first + count):
            state, (metrics,) = host.step(state, k)
            seconds["sample"] += metrics["time/sample"]
            seconds["learn"] += metrics["time/learn"]
        runs[name][1] = state
        return seconds

    first = {name: steps(name, 1, args.warmup_steps) for name in runs}
    print(f"# {jax.device_count()} devices; warm-up steps: {first}", file=sys.stderr)
    step = 1 + args.warmup_steps
    for i in range(args.rounds):
        load = os.getloadavg()[0]
        times = {name: steps(name, step, args.steps_per_round) for name in ("padded", "packed")}
        step += args.steps_per_round
        record = {"round": i + 1, "steps": args.steps_per_round}
        for name, t in times.items():
            record[f"{name}_s"] = round(t["sample"] + t["learn"], 3)
            record[f"{name}_learn_s"] = round(t["learn"], 3)
        record["speedup"] = round(record["padded_s"] / record["packed_s"], 3)
        record["learn_speedup"] = round(record["padded_learn_s"] / record["packed_learn_s"], 3)
        record["packed_shapes"] = packing.planned_shapes()  # so far, in both runs' steps
        record["loadavg_1m"] = round(load, 2)
        print(json.dumps(record) if args.json else "  ".join(f"{k}={v}" for k, v in record.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
