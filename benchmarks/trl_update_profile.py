"""Where TRL's training update spends its time on the reference workload (`torch.profiler`).

    $PEERS_HOME/trl/bin/python benchmarks/trl_update_profile.py --model ../shared/models/tiny-qwen2

Runs Hugging Face TRL's `GRPOTrainer` with the peers' settings (`../shared/peers/bench_common.py`
and `trl_grpo_bench.py`: 8 prompts x 8 completions of up to 64 tokens, lr 1e-5, beta 0, one
optimizer step of the whole batch of 64, float32, no gradient checkpointing) and profiles, on
the steps after `--warmup`, only the update: from the moment `_generate_and_score_completions`
returns (generation, rewards and advantages done) to the end of the optimizer step, i.e. the
forward, the log-probs, the loss, the backward, gradient clipping and AdamW. Operator self times
(`torch.profiler`, CPU, summed per operator over the profiled steps and divided by their number)
are grouped into `CATEGORIES` (set to compare with BENCHMARKS.md's rl_jax breakdown), printed as
a table, and written as one `RESULT_JSON {...}` line. The `GRPOConfig` restates
`trl_grpo_bench.py`'s, which builds its config inside its `main` and cannot be imported. torch runs each operator on the calling thread with its
intra-op threads inside it, so self times add up to wall time (unlike XLA:CPU's per-thread op
times). It needs torch, transformers and TRL: run it with the TRL venv of
`../shared/peers/setup_trl.sh`, not with rl_jax's environment.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys
import time

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Category -> (exact operator names, name prefixes); an in-place variant ("aten::add_") counts as
# its operator; whatever matches none is "elementwise / other".
CATEGORIES = {
    "matmul": ({"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}, ()),
    "attention": (set(), ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    "log-probs / entropy": (
        {
            "aten::_log_softmax",
            "aten::log_softmax",
            "aten::logsumexp",
            "aten::_softmax",
            "aten::softmax",
            "aten::gather",
        },
        ("ChunkedLogProb",),  # TRL's chunked log-prob autograd function
    ),  # fmt: skip
    "copies / layout": (
        {
            "aten::copy",
            "aten::clone",
            "aten::contiguous",
            "aten::cat",
            "aten::t",
            "aten::transpose",
            "aten::to",
            "aten::_to_copy",
        },
        (),
    ),  # fmt: skip
    "optimizer (AdamW, clipping)": (
        {"aten::_fused_adamw", "aten::_fused_adam", "aten::norm", "aten::linalg_vector_norm"},
        ("aten::_foreach", "Optimizer."),
    ),  # fmt: skip
    "backward bookkeeping": (set(), ("autograd::", "torch::autograd")),
}


def category(name: str) -> str:
    """The `CATEGORIES` label of a profiler event name."""
    base = name.rstrip("_")
    for label, (names, prefixes) in CATEGORIES.items():
        if base in names or name.startswith(prefixes):
            return label
    return "elementwise / other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF folder of the tiny-qwen2 workload")
    parser.add_argument("--peers", default=str(pathlib.Path(__file__).parents[2] / "shared/peers"),
                        help="folder holding bench_common.py")  # fmt: skip
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output-dir", default="/tmp/trl_update_profile")
    args = parser.parse_args()
    if not (pathlib.Path(args.peers) / "bench_common.py").is_file():
        sys.exit(f"--peers: no bench_common.py in {args.peers}")
    if args.steps <= args.warmup:
        sys.exit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    sys.path.insert(0, args.peers)
    import bench_common as bc
    import torch
    from datasets import Dataset
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    prompts, answers = bc.make_addition_prompts(bc.PROMPTS_PER_STEP * (args.steps + 2))
    dataset = Dataset.from_dict({"prompt": prompts, "answer": answers})
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, local_files_only=True, dtype=torch.float32
    )
    config = GRPOConfig(
        output_dir=args.output_dir, max_steps=args.steps,
        per_device_train_batch_size=bc.PROMPTS_PER_STEP * bc.GROUP_SIZE,
        gradient_accumulation_steps=1, num_generations=bc.GROUP_SIZE, num_iterations=1,
        max_completion_length=bc.MAX_COMPLETION_LENGTH, temperature=bc.TEMPERATURE, top_p=1.0,
        top_k=0, learning_rate=bc.LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        beta=bc.BETA, loss_type="grpo", scale_rewards="group", bf16=False, fp16=False,
        use_cpu=True, gradient_checkpointing=False, use_vllm=False, report_to="none",
        logging_steps=1, save_strategy="no", shuffle_dataset=False, dataloader_num_workers=0,
        seed=0, disable_tqdm=True, log_completions=False,
    )  # fmt: skip
    step = {"index": 0, "profiler": None, "start": 0.0}
    update_seconds = []
    totals = collections.Counter()

    class ProfiledTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if step["index"] >= args.warmup:
                step["profiler"] = profile(activities=[ProfilerActivity.CPU])
                step["profiler"].__enter__()
            step["start"] = time.perf_counter()
            return out

    class StepEnd(TrainerCallback):
        def on_step_end(self, *_, **__):
            seconds = time.perf_counter() - step["start"]
            prof = step["profiler"]
            if prof is not None:
                prof.__exit__(None, None, None)
                update_seconds.append(seconds)
                for event in prof.key_averages():
                    totals[event.key] += event.self_cpu_time_total / 1e3  # ms
                step["profiler"] = None
            step["index"] += 1

    def reward(prompts, completions, answer, **kwargs):
        return bc.addition_reward(completions, answer)

    trainer = ProfiledTrainer(
        model=model, args=config, train_dataset=dataset, reward_funcs=reward,
        processing_class=tokenizer, callbacks=[StepEnd()],
    )  # fmt: skip
    trainer.train()
    steps = len(update_seconds)
    by_category = collections.Counter()
    for name, ms in totals.items():
        by_category[category(name)] += ms / steps
    profiled_ms = sum(by_category.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {steps} profiled updates,"
          f" wall {1e3 * sum(update_seconds) / steps:.0f} ms each (profiled)")  # fmt: skip
    print("| category | ms per update | share |\n|---|---|---|")
    for label, ms in by_category.most_common():
        print(f"| {label} | {ms:.0f} | {ms / profiled_ms:.0%} |")
    print("top operators (ms per update):")
    for name, ms in totals.most_common(15):
        print(f"  {ms / steps:8.1f}  {name}")
    result = {
        "profiled_updates": steps,
        "update_wall_ms": round(1e3 * sum(update_seconds) / steps, 1),
        "by_category_ms": {k: round(v, 1) for k, v in by_category.items()},
        "top_ops_ms": {k: round(v / steps, 1) for k, v in totals.most_common(25)},
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "trl": __import__("trl").__version__},
    }
    print("RESULT_JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
