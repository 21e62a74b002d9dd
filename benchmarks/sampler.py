"""Sampler throughput: `rl_jax.sampler.generate` against Hugging Face `transformers` `generate`.

    python benchmarks/sampler.py                 # both models, HF baseline if installed
    python benchmarks/sampler.py --skip-hf --repeats 3

Workload (the reference RL step, /work/shared/models/README.md): 8 prompts x group 8 = 64
sequences, 64 new tokens, temperature 1.0, no top-k / top-p, float32. EOS is disabled on both
sides (rl_jax: an eos_id outside the vocabulary; HF: min_new_tokens = max_new_tokens), so every
call generates exactly 64 x 64 = 4096 tokens. Models:
- tiny: the `tiny` preset (2 layers, d=128, vocab 64), random init, random 16-token prompts;
  HF gets a Qwen2ForCausalLM with the same shapes (random init: only speed is compared).
- tiny-qwen2: the shared reference checkpoint (4 layers, d=256, vocab 512, 3.2M params) loaded
  by both libraries, prompts "What is A+B? Answer:" through its tokenizer.json (9 tokens).
Reported: the first call (for rl_jax: trace + compile + run; the compile is the difference to
the median), then `--repeats` rounds alternating rl_jax and HF (so load from other processes
hits both alike), their median and best, and tokens/s = 4096 / median (and / best). The
1-minute load average before and after is recorded. A line `RESULT_JSON {...}` ends the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import time

import jax
import numpy as np
from flax import nnx

from rl_jax import host_memory, models, sampler
from rl_jax.tokenizer import HFTokenizer

MODEL_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / "tiny-qwen2"
NUM_PROMPTS, GROUP, NEW_TOKENS = 8, 8, 64


def arithmetic_prompts(tokenizer: HFTokenizer, seed: int):
    """The reference workload's prompts, left-padded: (ids, mask) int32 [NUM_PROMPTS, P]."""
    rng = np.random.default_rng(seed)
    texts = [f"What is {a}+{b}? Answer:" for a, b in rng.integers(10, 100, (NUM_PROMPTS, 2))]
    return tokenizer.encode_batch(texts, padding_side="left")


def random_prompts(vocab_size: int, length: int, seed: int):
    ids = np.random.default_rng(seed).integers(3, vocab_size, (NUM_PROMPTS, length), np.int32)
    return ids, np.ones_like(ids)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(runners: dict, repeats: int) -> dict:
    """First call of each runner, then `repeats` rounds alternating between them, so that load
    from other processes falls on all of them alike: {name: timings}."""
    first = {name: _time(fn) for name, fn in runners.items()}
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            times[name].append(_time(fn))
    tokens = NUM_PROMPTS * GROUP * NEW_TOKENS
    return {
        name: {
            "first_call_s": round(first[name], 3),
            "median_s": round(statistics.median(t), 4),
            "min_s": round(min(t), 4),
            "tokens_per_s": round(tokens / statistics.median(t), 1),
            "tokens_per_s_best": round(tokens / min(t), 1),
        }
        for name, t in times.items()
    }


def rl_jax_runner(config: models.ModelConfig, model, ids, mask):
    graphdef, params = nnx.split(model)
    sampling = sampler.SamplingConfig(
        eos_id=config.vocab_size, pad_id=0, temperature=1.0, max_new_tokens=NEW_TOKENS
    )
    state = sampler.SamplerState.create(params, jax.random.key(0))

    def run():
        nonlocal state
        rollout, state = sampler.generate(graphdef, state, ids, mask, sampling, GROUP)
        lengths = np.asarray(rollout.response_length)  # blocks until done
        assert lengths.sum() == NUM_PROMPTS * GROUP * NEW_TOKENS

    return run


def hf_runner(model, ids, mask):
    import torch

    input_ids = torch.from_numpy(np.repeat(ids, GROUP, 0).astype(np.int64))
    attention_mask = torch.from_numpy(np.repeat(mask, GROUP, 0).astype(np.int64))
    torch.manual_seed(0)

    def run():
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS, pad_token_id=0,
            )  # fmt: skip
        assert out.shape[1] == ids.shape[1] + NEW_TOKENS

    return run


def hf_tiny_model(config: models.ModelConfig):
    """A random Qwen2ForCausalLM with the shapes of `config` (speed comparison only)."""
    import transformers

    hf_config = transformers.Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        intermediate_size=config.intermediate_size, tie_word_embeddings=config.tie_embeddings,
        rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(hf_config).eval()


def busy_fraction(seconds: float = 2.0) -> float:
    """Share of all CPU time spent busy over `seconds` (from /proc/stat; 0.0 where missing)."""
    try:
        readings = []
        for i in range(2):
            with open("/proc/stat") as stat:
                fields = [int(x) for x in stat.readline().split()[1:8]]
            readings.append((fields[3] + fields[4], sum(fields)))
            if i == 0:
                time.sleep(seconds)
    except OSError:
        return 0.0
    (idle0, total0), (idle1, total1) = readings
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_until_idle(max_wait_s: float, threshold: float = 0.15) -> bool:
    """Blocks until the CPUs are nearly idle (True) or `max_wait_s` passed (False)."""
    deadline = time.time() + max_wait_s
    while time.time() < deadline:
        if busy_fraction() < threshold:
            return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-dir", type=pathlib.Path, default=MODEL_DIR)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--wait-idle", type=float, default=0.0, help="seconds to wait for idle")
    args = parser.parse_args()
    try:
        import torch
        import transformers
    except ImportError:
        args.skip_hf = True

    tiny = dataclasses.replace(models.get_config("tiny"), vocab_size=64)
    qwen_config, qwen = models.load_hf_checkpoint(args.model_dir)
    workloads = {
        "tiny": (tiny, models.init_model(tiny, seed=0), random_prompts(64, 16, seed=0)),
        "tiny-qwen2": (qwen_config, qwen, arithmetic_prompts(HFTokenizer(args.model_dir), 0)),
    }
    results = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "workload": f"{NUM_PROMPTS}x{GROUP} sequences, {NEW_TOKENS} new tokens, float32",
    }
    if args.wait_idle > 0:
        results["started_idle"] = wait_until_idle(args.wait_idle)
    results["loadavg_before"] = os.getloadavg()[0]
    if not args.skip_hf:
        results["torch"], results["transformers"] = torch.__version__, transformers.__version__
        results["torch_threads"] = torch.get_num_threads()
    for name, (config, model, (ids, mask)) in workloads.items():
        runners = {"rl_jax": rl_jax_runner(config, model, ids, mask)}
        if not args.skip_hf:
            hf_model = (
                hf_tiny_model(config)
                if name == "tiny"
                else transformers.AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
            )
            runners["hf"] = hf_runner(hf_model, ids, mask)
        for runner, timing in interleaved(runners, args.repeats).items():
            results[f"{name}/{runner}"] = timing
            print(f"{name:10s} {runner:7s} {timing}", flush=True)
    results["compiles"] = sampler.compile_count()
    results["loadavg_after"] = os.getloadavg()[0]
    results["busy_after"] = round(busy_fraction(), 2)
    print("RESULT_JSON", json.dumps(results))


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    main()
