"""Complete RL steps (sample -> reward -> advantage -> update) on the reference workload.

    python benchmarks/rl_step.py                      # 10 steps, peak measured in the same run
    python benchmarks/rl_step.py --steps 20 --prompt-bucket 16

Workload (/work/shared/models/README.md, the peers' /work/shared/peers/bench_common.py): the
tiny-qwen2 checkpoint (Qwen2 architecture, hidden 256, 4 layers, 4 heads / 2 KV heads,
intermediate 704, vocab 512); per step 8 prompts "What is A+B? Answer:" (A, B in [10, 99],
9 tokens) x group 8 = 64 responses of up to 64 new tokens at temperature 1.0; reward 1 if A+B
appears in the completion as a whole number; the `grpo` preset (std-normalised group
advantages, one-side clip, IS weight), AdamW lr 1e-5 with global-norm clip 1.0, one update per
step, no reference-model KL (`Learner(..., ref_metrics=False)`), float32. The update accumulates
the exact full-batch gradient over `--micro-batches` pieces (default 8, i.e. 8 rows x 73 tokens,
whose activations stay in the CPU caches; on this workload that is ~20% faster than one piece). The sampler holds the
learner's current params every step (on-policy). The rows of both are split over one XLA:CPU
device per core (`rl_jax.parallel.use_cpu_cores`, as `python -m rl_jax.train` does;
`RL_JAX_CPU_DEVICES=1` runs everything on one device).

A step is timed from prompt encoding to the update's metrics on the host; `sample` ends when
the rewards are computed (generation, detokenisation, reward), `learn` is the rest. Reported:
median step / sample / learn seconds (and this process's CPU seconds per phase, a
steadier figure on a shared machine) over the steps after the first (the first includes
compilation: compile time = first step - median step), completion tokens/s (generated tokens
per second of step time), peak host RSS, and achieved FLOP/s of each phase against its useful
FLOPs (`peak.sequence_flops`) as a fraction of the matmul peak measured in the same run
(`peak.measure_peak`), plus each phase's FLOP floor (useful FLOPs / peak). The 1-minute load
average is recorded around the run; a line `RESULT_JSON {...}` ends the output.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import resource
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import peak  # noqa: E402

from rl_jax import algorithms, host_memory, models, parallel  # noqa: E402
from rl_jax.config_sections import OptimizerConfig  # noqa: E402
from rl_jax.learner import Learner, TrainBatch  # noqa: E402
from rl_jax.sampler import SamplerState, SamplingConfig, generate  # noqa: E402
from rl_jax.tokenizer import HFTokenizer  # noqa: E402

MODEL_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / "tiny-qwen2"
NUM_PROMPTS, GROUP, NEW_TOKENS = 8, 8, 64
_NUMBER = re.compile(r"\d+")


def addition_prompts(rng: np.random.Generator):
    """NUM_PROMPTS prompts 'What is A+B? Answer:' and their answers str(A + B)."""
    pairs = rng.integers(10, 100, (NUM_PROMPTS, 2))
    return [f"What is {a}+{b}? Answer:" for a, b in pairs], [str(a + b) for a, b in pairs]


def addition_reward(completion: str, answer: str) -> float:
    """1.0 if `answer` appears in `completion` as a whole number, else 0.0."""
    return float(answer in _NUMBER.findall(completion))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RLStep:
    """The benchmarked loop's state and one step of it."""

    def __init__(
        self, model_dir: pathlib.Path, prompt_bucket: int, algorithm: str, seed: int,
        micro_batches: int,
    ):  # fmt: skip
        self.tokenizer = HFTokenizer(str(model_dir / "tokenizer.json"))
        self.config, model = models.load_hf_checkpoint(str(model_dir))
        self.graphdef, params = nnx.split(model)
        self.sampling = SamplingConfig(
            eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, temperature=1.0,
            max_new_tokens=NEW_TOKENS, prompt_buckets=(prompt_bucket,),
            generation_buckets=(NEW_TOKENS,),
        )  # fmt: skip
        self.mesh = parallel.make_mesh()
        self.learner = Learner(
            graphdef=self.graphdef,
            algorithm=algorithms.get(algorithm),
            optimizer=OptimizerConfig(learning_rate=1e-5, grad_clip=1.0),
            group_size=GROUP,
            temperature=1.0,
            ref_metrics=False,
            micro_batches=micro_batches,
            mesh=self.mesh,
        )
        self.state = self.learner.init(jax.device_put(params, parallel.replicated(self.mesh)))
        self.rng = np.random.default_rng(seed)
        self.key = jax.random.key(seed)
        self.step = 0

    def __call__(self) -> dict:
        self.step += 1
        t0, c0 = time.perf_counter(), time.process_time()
        texts, answers = addition_prompts(self.rng)
        ids, mask = self.tokenizer.encode_batch(texts, padding_side="left")
        sampler_state = SamplerState.create(
            self.state.params, jax.random.fold_in(self.key, self.step), self.step - 1
        )
        rollout, _ = generate(
            self.graphdef, sampler_state, ids, mask, self.sampling, GROUP, mesh=self.mesh
        )
        completions = self.tokenizer.decode_batch(np.asarray(rollout.response_tokens))
        rewards = np.array(
            [addition_reward(c, answers[i // GROUP]) for i, c in enumerate(completions)],
            np.float32,
        )
        t1, c1 = time.perf_counter(), time.process_time()
        batch = parallel.shard_batch(TrainBatch.from_rollout(rollout, rewards), self.mesh)
        learner_key = jax.random.fold_in(jax.random.key(1), self.step)
        self.state, metrics = self.learner.update(self.state, batch, None, learner_key)
        loss = float(metrics["loss"])
        t2, c2 = time.perf_counter(), time.process_time()
        return {
            "sample_cpu_s": c1 - c0,
            "learn_cpu_s": c2 - c1,
            "step_s": t2 - t0,
            "sample_s": t1 - t0,
            "learn_s": t2 - t1,
            "tokens": int(np.asarray(rollout.response_length).sum()),
            "reward": float(rewards.mean()),
            "loss": loss,
            "prompt_width": int(rollout.prompt_tokens.shape[1]),
        }


def summarize(records: list[dict], config, peak_gflops: float) -> dict:
    """Medians over the steps after the first, throughput and FLOP utilisation."""
    measured = records[1:]
    med = lambda k: statistics.median(r[k] for r in measured)
    step_s, sample_s, learn_s = med("step_s"), med("sample_s"), med("learn_s")
    tokens = sum(r["tokens"] for r in measured)
    mean_response = tokens / len(measured) / (NUM_PROMPTS * GROUP)
    flops = peak.sequence_flops(config, NUM_PROMPTS * GROUP, 9, mean_response)
    peak_flops = peak_gflops * 1e9
    return {
        "median_step_s": round(step_s, 3),
        "min_step_s": round(min(r["step_s"] for r in measured), 3),
        "median_sample_s": round(sample_s, 3),
        "median_learn_s": round(learn_s, 3),
        "median_sample_cpu_s": round(med("sample_cpu_s"), 3),
        "median_learn_cpu_s": round(med("learn_cpu_s"), 3),
        "first_step_s": round(records[0]["step_s"], 3),
        "compile_s": round(records[0]["step_s"] - step_s, 3),
        "tokens_per_step": round(tokens / len(measured), 1),
        "tokens_per_s": round(tokens / sum(r["step_s"] for r in measured), 1),
        "gflop_sample": round(flops["sample"] / 1e9, 2),
        "gflop_train": round(flops["train"] / 1e9, 2),
        "peak_gflops": peak_gflops,
        "mfu_step": round((flops["sample"] + flops["train"]) / step_s / peak_flops, 3),
        "mfu_sample": round(flops["sample"] / sample_s / peak_flops, 3),
        "mfu_learn": round(flops["train"] / learn_s / peak_flops, 3),
        "floor_step_s": round((flops["sample"] + flops["train"]) / peak_flops, 3),
        "floor_sample_s": round(flops["sample"] / peak_flops, 3),
        "floor_learn_s": round(flops["train"] / peak_flops, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "mean_reward": round(statistics.fmean(r["reward"] for r in measured), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps incl. the first (compile)")
    parser.add_argument("--prompt-bucket", type=int, default=9,
                        help="static prompt width (the workload's prompts are 9 tokens)")  # fmt: skip
    parser.add_argument("--algorithm", default="grpo", choices=algorithms.names())
    parser.add_argument("--model-dir", type=pathlib.Path, default=MODEL_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--micro-batches", type=int, default=8,
                        help="gradient-accumulation pieces per update (8: 8 rows of 73 tokens "
                             "each, whose activations stay in the CPU caches)")  # fmt: skip
    parser.add_argument("--skip-peak", action="store_true", help="no matmul peak measurement")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step compiles)")

    devices = parallel.use_cpu_cores(NUM_PROMPTS * GROUP // args.micro_batches) or 1
    print(f"{devices} CPU device(s)")
    load_before = os.getloadavg()
    step = RLStep(args.model_dir, args.prompt_bucket, args.algorithm, args.seed, args.micro_batches)
    records = []
    for i in range(args.steps):
        records.append(step())
        r = records[-1]
        print(
            f"step {i + 1:2d}  {r['step_s']:6.3f} s  (sample {r['sample_s']:.3f}, learn "
            f"{r['learn_s']:.3f})  tokens {r['tokens']}  reward {r['reward']:.3f}  "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    load_after = os.getloadavg()
    peak_result = {"peak_gflops": float("nan")} if args.skip_peak else peak.measure_peak()
    result = summarize(records, step.config, peak_result["peak_gflops"])
    result.update({
        "peak": peak_result,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "steps": args.steps,
        "micro_batches": args.micro_batches,
        "prompt_width": records[0]["prompt_width"],
        "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpus": len(os.sched_getaffinity(0)),
        "devices": jax.device_count(),
    })  # fmt: skip
    print(
        f"median step {result['median_step_s']} s = sample {result['median_sample_s']} + learn "
        f"{result['median_learn_s']}; {result['tokens_per_s']} tokens/s; compile "
        f"{result['compile_s']} s; peak RSS {result['peak_rss_mib']} MiB; CPU s sample "
        f"{result['median_sample_cpu_s']} learn {result['median_learn_cpu_s']}"
    )
    print(
        f"peak {result['peak_gflops']} GFLOP/s; utilisation step {result['mfu_step']}, sample "
        f"{result['mfu_sample']}, learn {result['mfu_learn']}; floors step "
        f"{result['floor_step_s']} s, sample {result['floor_sample_s']}, learn "
        f"{result['floor_learn_s']}"
    )
    print("RESULT_JSON " + json.dumps(result))


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    main()
