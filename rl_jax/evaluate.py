"""Scores a trained run's policy on its task's held-out problems: reward, accuracy and pass@k.

    python -m rl_jax.evaluate RUN_DIR [--split test] [--samples K] [--temperature T]
                              [--prompts N] [--step N] [--json]

Restores the learner's parameters of the newest checkpoint (or of `--step`) of every run in
RUN_DIR (`rl_jax.saved_run`; a `num_seeds` directory evaluates each seed), draws K responses to
each of the split's prompts at temperature T (default: the run's own sampling settings) and
scores them with the task's reward. Per run:

    reward/mean            the mean reward of all responses
    accuracy               the fraction of correct responses (`task.correct`: the answer part
                           of the reward, without format terms)
    pass@k, k = 1..K       the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language
                           Models Trained on Code", eq. 1), averaged over prompts: with c of a
                           prompt's n = K responses correct,
                           pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)
    response_length/mean   tokens per response, EOS included

With several seeds each line gives the mean over seeds +- the half-width of its 95% t-interval
(`rl_jax.intervals`) and the per-seed values. The results go to
`RUN_DIR/eval/step_<N>_<split>_<prompts>x<K>_t<T>.json` (written atomically); `--json` prints
that document instead of the lines.

Splits: "test" is the task's held-out set (`task.eval_examples`: GSM8K's test split, the
arithmetic task's held-out sums); "train" the first N training problems (GSM8K's train split; a
fixed draw of seed 0 for the arithmetic task).

Keys: response j of prompt p (of n prompts) draws with row key fold_in(s, j * n + p), s the
sample key of the held-out evaluation in training (`Step.evaluate`), so the draws depend on
neither the batching nor the devices, and response 0 of the first `eval_prompts` test prompts at
the run's temperature is the response the training-time evaluation drew for that prompt.
Prompts are generated `prompts_per_step * group_size // K` at a time (the training batch's
rows), split over the devices when the rows divide over them, else on each device whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import sys

import jax
import numpy as np

from rl_jax import host_memory, intervals, parallel, saved_run
from rl_jax.groups import rows_from_prompts
from rl_jax.sampler import generate_rows
from rl_jax.step import EVAL, purpose_key

SPLITS = ("test", "train")
EVAL_DIR = "eval"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021's unbiased pass@k of one prompt with c of n samples correct:
    1 - C(n - c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i) (no overflow)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def examples_of(task, split: str, n: int | None) -> list:
    """The first `n` problems of `split` (default: as many as the held-out set has)."""
    held_out = task.eval_examples()
    if split == "test":
        available = held_out
    elif hasattr(task, "train_examples"):
        available = task.train_examples()
    else:  # the arithmetic task draws its training prompts
        return task.sample_prompts(0, n or len(held_out))
    if n is not None and n > len(available):
        raise ValueError(
            f"--prompts {n} exceeds the {len(available)} problems of the {split} split"
        )
    return available[: n or len(held_out)]


def run_metrics(rewards: np.ndarray, correct: np.ndarray, lengths: np.ndarray) -> dict:
    """The metrics of one run from `[prompts, K]` rewards, correctness and response lengths."""
    n = correct.shape[1]
    counts = correct.sum(axis=1)
    metrics = {"reward/mean": float(rewards.mean()), "accuracy": float(correct.mean())}
    for k in range(1, n + 1):
        metrics[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in counts]))
    metrics["response_length/mean"] = float(lengths.mean())
    return metrics


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate(graphdef, sampling, mesh, params, root, indices, tokens, mask):
    """Responses to `[rows, P]` prompt rows; row r draws with key fold_in(s, indices[r]), s the
    sample key of the training-time evaluation (split as `sampler.row_keys` splits it)."""
    _, sample_key = jax.random.split(purpose_key(root, EVAL))
    keys = jax.vmap(lambda i: jax.random.fold_in(sample_key, i))(indices)
    return generate_rows(graphdef, params, 0, keys, tokens, mask, sampling, mesh)[0]


def sample(saved: saved_run.SavedRun, index: int, examples, samples: int, sampling):
    """(`[n * K, N]` response token ids, `[n * K]` lengths) of run `index`: K = `samples`
    responses to each of the n `examples`, prompt-major (row r answers prompt r // K)."""
    run, config = saved.run, saved.files.config
    tokens, mask = run.tokenizer.encode_batch(
        [ex.prompt for ex in examples], length=run.task.max_prompt_len, add_bos=True
    )
    n = len(examples)
    per_call = min(n, max(1, config.prompts_per_step * config.group_size // samples))
    mesh = saved.mesh if per_call * samples % saved.mesh.size == 0 else None
    sharding = parallel.replicated(saved.mesh) if mesh is None else parallel.rows_sharding(mesh, 0)
    put = lambda x: parallel.from_host(x, sharding)
    params, root = saved.params(index), saved.state.key[index]
    response_tokens, lengths = [], []
    for start in range(0, n, per_call):
        chunk = np.minimum(np.arange(start, start + per_call), n - 1)  # the last one repeats
        indices = (chunk[:, None] + n * np.arange(samples)[None, :]).reshape(-1)
        rollout = _generate(
            run.graphdef, sampling, mesh, params, root, put(indices.astype(np.uint32)),
            put(rows_from_prompts(tokens[chunk], samples)),
            put(rows_from_prompts(mask[chunk], samples)),
        )  # fmt: skip
        kept = min(per_call, n - start) * samples
        host_tokens, host_lengths = parallel.to_host(
            (rollout.response_tokens, rollout.response_length)
        )
        response_tokens.append(host_tokens[:kept])
        lengths.append(host_lengths[:kept])
    return np.concatenate(response_tokens), np.concatenate(lengths)


def evaluate_run(saved: saved_run.SavedRun, index: int, examples, samples: int, sampling) -> dict:
    """The metrics of run `index` of `saved` on `examples`, `samples` responses to each."""
    run = saved.run
    tokens, lengths = sample(saved, index, examples, samples, sampling)
    texts = run.tokenizer.decode_batch(tokens)
    pairs = list(zip(texts, [ex for ex in examples for _ in range(samples)], strict=True))
    rewards = np.asarray([run.task.reward(text, ex) for text, ex in pairs], np.float64)
    correct = np.asarray([run.task.correct(text, ex) for text, ex in pairs], bool)
    shape = (len(examples), samples)
    return run_metrics(rewards.reshape(shape), correct.reshape(shape), lengths.reshape(shape))


def evaluate(
    saved: saved_run.SavedRun,
    split: str = "test",
    samples: int = 1,
    temperature: float | None = None,
    prompts: int | None = None,
) -> dict:
    """The evaluation document: settings, each seed's metrics, their mean and 95% half-width."""
    examples = examples_of(saved.run.task, split, prompts)
    sampling = saved.step_fn.sampling
    if temperature is not None:
        sampling = dataclasses.replace(sampling, temperature=temperature)
    per_seed = {
        str(seed): evaluate_run(saved, i, examples, samples, sampling)
        for i, seed in enumerate(saved.seeds)
    }
    names = list(next(iter(per_seed.values())))
    mean, half = intervals.mean_interval([[m[k] for k in names] for m in per_seed.values()])
    return {
        "run_dir": str(saved.files.directory),
        "step": saved.step,
        "split": split,
        "prompts": len(examples),
        "samples": samples,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "max_response_len": sampling.max_new_tokens,
        "seeds": per_seed,
        "mean": dict(zip(names, mean.tolist(), strict=True)),
        "interval95": {
            k: None if math.isnan(h) else h for k, h in zip(names, half.tolist(), strict=True)
        },
    }


def output_path(doc: dict) -> pathlib.Path:
    """Where `doc` is written: RUN_DIR/eval/step_<N>_<split>_<prompts>x<K>_t<T>.json."""
    name = f"step_{doc['step']}_{doc['split']}_{doc['prompts']}x{doc['samples']}_t{doc['temperature']:g}"
    return pathlib.Path(doc["run_dir"]) / EVAL_DIR / f"{name}.json"


def write(doc: dict) -> pathlib.Path:
    """Writes `doc` to `output_path(doc)` atomically; returns the path."""
    path = output_path(doc)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def summary_lines(doc: dict) -> list[str]:
    """One line per metric: the value (with several seeds: mean +- 95% half-width, per seed)."""
    seeds = doc["seeds"]
    lines = [
        f"{doc['run_dir']} step {doc['step']}: {doc['split']} split, {doc['prompts']} prompts x "
        f"{doc['samples']} sample{'s' if doc['samples'] > 1 else ''} at temperature {doc['temperature']:g}"
        + (f", {len(seeds)} seeds" if len(seeds) > 1 else "")
    ]
    width = max(map(len, doc["mean"]))
    for name, mean in doc["mean"].items():
        half = doc["interval95"][name]
        value = intervals.describe(mean, math.nan if half is None else half)
        if len(seeds) > 1:
            value += "  (" + ", ".join(f"seed {s}: {m[name]:.3f}" for s, m in seeds.items()) + ")"
        lines.append(f"{name:<{width}}  {value}")
    return lines


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rl_jax.evaluate",
        description="Score a trained run's checkpoint on its task's held-out problems: mean "
        "reward, accuracy and unbiased pass@k.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run's --out directory")
    parser.add_argument("--split", choices=SPLITS, default="test", help="default: test")
    parser.add_argument("--samples", type=_positive(int), default=1, metavar="K",
                        help="responses per prompt; pass@k for k = 1..K (default 1)")  # fmt: skip
    parser.add_argument("--temperature", type=_positive(float), metavar="T",
                        help="sampling temperature (default: the run's)")  # fmt: skip
    parser.add_argument("--prompts", type=_positive(int), metavar="N",
                        help="the first N problems of the split (default: the held-out set)")  # fmt: skip
    parser.add_argument("--step", type=int, metavar="N",
                        help="the checkpoint of step N (default: the newest)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the JSON document")
    args = parser.parse_args(argv)
    try:
        files = saved_run.find(args.run_dir, args.step)
        config = files.config
        parallel.use_cpu_cores(
            max(1, config.prompts_per_step * config.group_size // args.samples) * args.samples
        )
        saved = saved_run.load(files)
        doc = evaluate(saved, args.split, args.samples, args.temperature, args.prompts)
        path = write(doc)
    except (ValueError, OSError) as error:  # build.InputError and RunInputError are ValueErrors
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return 2
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(summary_lines(doc)))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    sys.exit(main())
