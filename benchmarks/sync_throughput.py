"""The off-policy dividend: what window generation buys at sync_interval 1, 4 and 20.

    python benchmarks/sync_throughput.py                          # both workloads, 1 / 4 / 20
    python benchmarks/sync_throughput.py --workload embedded --intervals 1 20 --blocks 2

With `sync_interval = k` the sampler's parameters cannot change for k steps, so `rl_jax.train`
generates the batches of those k steps in one call (`SyncSchedule.window`, up to the
`window_cap_gib` of KV cache, `--window-cap-gib`, default 4). For each workload and interval the same seed runs
`(blocks + 1) * 20` steps through `rl_jax.host_side.HostSide.step`; the first 20 (which compile
every program) are not timed. Reported over the timed steps: sampling throughput (rollout
tokens per second of sampling time), whole steps per second, the sample / learn seconds per
step, and the ratios to interval 1 measured in the same run. Workloads:
  embedded   the warm-started tiny policy on the sums task, 8 prompts x 8 (16 x 8 in the entries
             recorded before 2026-12-02), 25-token cap;
  reference  ../shared/models/tiny-qwen2 on the peers' prompts "What is A+B? Answer:",
             8 prompts x 8, 64 new tokens (benchmarks/rl_step.py), no reference-model KL.
A line `RESULT_JSON {...}` ends the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import rl_step  # noqa: E402

from rl_jax import build, host_memory, models, parallel  # noqa: E402
from rl_jax import config as config_lib  # noqa: E402
from rl_jax.host_side import HostSide  # noqa: E402
from rl_jax.tasks import Example  # noqa: E402
from rl_jax.tokenizer import HFTokenizer  # noqa: E402
from rl_jax.train import generation_window, make_step  # noqa: E402

BLOCK = 20  # steps per timing block: the largest interval measured


@dataclasses.dataclass
class AdditionTask:
    """The reference workload as a task: the peers' addition prompts and whole-number reward."""

    tokenizer: HFTokenizer
    name: str = "addition"
    max_prompt_len: int = 9
    max_response_len: int = rl_step.NEW_TOKENS

    def sample_prompts(self, rng, n: int) -> list[Example]:
        texts, answers = rl_step.addition_prompts(np.random.default_rng(rng))
        return [Example(t, a) for t, a in zip(texts[:n], answers[:n], strict=True)]

    def eval_examples(self, n=None) -> list[Example]:
        return self.sample_prompts(-1, n or rl_step.NUM_PROMPTS)

    def reward(self, completion: str, example: Example) -> float:
        return rl_step.addition_reward(completion, example.answer)


def workload(name: str, interval: int, steps: int, cap: float, out: pathlib.Path):
    """(config, run) of a workload at `interval`."""
    fields = dict(
        sync_interval=interval, steps=steps, eval_every=0, checkpoint_every=0, window_cap_gib=cap
    )
    if name == "embedded":
        config = config_lib.build("embedded", **fields, out_dir=str(out))
        return config, build.build_run(config)
    config = config_lib.build(
        "embedded", **fields, prompts_per_step=rl_step.NUM_PROMPTS, group_size=rl_step.GROUP,
        learning_rate=1e-5, micro_batches=8, ref_metrics=False, out_dir=str(out),
    )  # fmt: skip
    model_config, model = models.load_hf_checkpoint(rl_step.MODEL_DIR)
    tokenizer = HFTokenizer(str(rl_step.MODEL_DIR / "tokenizer.json"))
    graphdef, params = nnx.split(model)
    run = build.Run(AdditionTask(tokenizer), tokenizer, model_config, graphdef, params, 64)
    return config, run


def measure(name: str, interval: int, blocks: int, cap: float, out: pathlib.Path) -> dict:
    steps = (blocks + 1) * BLOCK
    config, run = workload(name, interval, steps, cap, out)
    mesh = parallel.make_mesh(1)
    window = generation_window(config, run)
    host = HostSide(config, run, make_step(config, run, mesh), mesh, window_size=window)
    # Placed as `rl_jax.train.train` places them, so no step after the first compiles again.
    params = jax.tree.map(
        parallel.from_host, run.params, parallel.param_shardings(run.params, mesh)
    )
    state = host.step_fn.init(params, [config.seed])
    load = os.getloadavg()[0]
    sample = learn = tokens = 0.0
    rows = config.rows
    for step in range(1, steps + 1):
        state, (metrics,) = host.step(state, step)
        if step > BLOCK:
            sample += metrics["time/sample"]
            learn += metrics["time/learn"]
            tokens += metrics["response_length/mean"] * rows
    timed = steps - BLOCK
    return {
        "workload": name,
        "sync_interval": interval,
        "window": window,
        "timed_steps": timed,
        "sample_tokens_per_s": round(tokens / sample, 1),
        "steps_per_s": round(timed / (sample + learn), 3),
        "sample_s_per_step": round(sample / timed, 4),
        "learn_s_per_step": round(learn / timed, 4),
        "loadavg_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("embedded", "reference", "both"), default="both")
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 4, 20])
    parser.add_argument("--blocks", type=int, default=2, help="timed blocks of 20 steps")
    parser.add_argument(
        "--window-cap-gib", type=float, default=4.0, help="the runs' window_cap_gib (0: no windows)"
    )
    args = parser.parse_args()
    if any(BLOCK % k for k in args.intervals):
        parser.error(f"every interval must divide {BLOCK}")
    names = ("embedded", "reference") if args.workload == "both" else (args.workload,)
    rows = rl_step.NUM_PROMPTS * rl_step.GROUP  # both workloads: 8 prompts x 8
    print(f"{parallel.use_cpu_cores(rows) or 1} CPU device(s)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for k in args.intervals:
                out = pathlib.Path(tmp) / f"{name}_{k}"
                results.append(measure(name, k, args.blocks, args.window_cap_gib, out))
    print("workload   interval window  sample tok/s  (x k=1)  steps/s  (x k=1)  sample s  learn s")
    for r in results:
        base = next(b for b in results if b["workload"] == r["workload"])
        print(
            f"{r['workload']:10s} {r['sync_interval']:8d} {r['window']:6d}"
            f"  {r['sample_tokens_per_s']:12.0f}  {r['sample_tokens_per_s'] / base['sample_tokens_per_s']:7.2f}"
            f"  {r['steps_per_s']:7.3f}  {r['steps_per_s'] / base['steps_per_s']:7.2f}"
            f"  {r['sample_s_per_step']:8.4f}  {r['learn_s_per_step']:7.4f}   load {r['loadavg_1m']}"
        )  # fmt: skip
    print("RESULT_JSON " + json.dumps(results))


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    main()
