"""The off-policy RL loop: sample -> reward -> advantages -> update -> sync (DESIGN.md §1, §4, §5).

    python -m rl_jax.train [PRESET_OR_JSON] [key=value ...] --out DIR

Two pytrees carry the run: the `LearnerState` (params, optimizer state, step) and the
`SamplerState` (possibly stale params, policy version, key). At learner step k the sampler must
hold version v(k) of the sync schedule; when it does not, the due snapshot is swapped in. Every
rollout carries the version that produced it, and staleness is logged every step. A frozen copy
of the initial parameters (shared with the sampler's version 0, never donated) serves `kl/ref`.

Everything random at step k derives from (seed, k), so a run killed and restarted from its last
checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rl_jax import build, guards, parallel, run_dir
from rl_jax import config as config_lib
from rl_jax.checkpoint import Checkpointer, CheckpointSaveError
from rl_jax.learner import Learner, LearnerState, TrainBatch
from rl_jax.metrics import MetricsWriter
from rl_jax.sampler import Rollout, SamplerState, SamplingConfig, generate
from rl_jax.sync import PendingSnapshots


@dataclasses.dataclass
class RunResult:
    """What `train` returns: the final states and every step's metrics."""

    config: config_lib.TrainConfig
    learner_state: LearnerState
    sampler_state: SamplerState
    metrics: list[dict]


def rollout_metrics(rollout: Rollout, rewards: np.ndarray, step: int, cap: int) -> dict:
    """Host-side metrics of one batch of rollouts (DESIGN.md §5)."""
    lengths = np.asarray(rollout.response_length)
    staleness = (step - 1) - np.asarray(rollout.policy_version)
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/clip_ratio": float(np.asarray(rollout.truncated).mean()),
        "response_length/cap": float(cap),
        "staleness/mean": float(staleness.mean()),
        "staleness/max": float(staleness.max()),
        "policy_version": float(np.asarray(rollout.policy_version).max()),
    }


def train(config: config_lib.TrainConfig) -> RunResult:
    """Runs (or resumes) one training run; returns its final states and metrics."""
    mesh = parallel.make_mesh(config.fsdp)
    run_dir.check_resume(config)  # refuses another run's out_dir or fewer steps; writes nothing
    out = pathlib.Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)  # the first write: an unwritable out_dir fails here
    run = build.build_run(config)
    schedule = config.sync_schedule()
    sampling = SamplingConfig(
        eos_id=run.tokenizer.eos_id,
        pad_id=run.tokenizer.pad_id,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        max_new_tokens=run.max_response_len,
        generation_buckets=(run.max_response_len,),
        prompt_buckets=(run.task.max_prompt_len,),
    )
    learner = Learner(
        graphdef=run.graphdef,
        algorithm=config.algorithm_preset(),
        optimizer=config.optimizer(),
        group_size=config.group_size,
        temperature=config.temperature,
        micro_batches=config.micro_batches,
        ref_metrics=config.ref_metrics,
    )
    params = jax.device_put(run.params, parallel.param_shardings(run.params, mesh))
    ref_params = params  # the sampler's version 0 shares these buffers; neither is donated
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    key = jax.random.key(config.seed)
    state = {
        "learner": learner.init(copy(params)),
        "sampler": SamplerState(params=ref_params, policy_version=jnp.int32(0), key=key),
        "pending": PendingSnapshots.empty(params, schedule.num_slots),
    }
    checkpointer = Checkpointer(
        out / run_dir.CHECKPOINT_DIR, save_every=config.checkpoint_every or config.steps,
        keep=config.keep_checkpoints,
    )  # fmt: skip
    start = 0
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        start, state, _ = restored
    metrics_log = []
    with MetricsWriter(out, config.steps, resume_step=start) as writer:  # refuses a gap
        run_dir.write_config(config)
        if start:
            print(f"resuming {out} from step {start}", flush=True)
        if start == 0 and config.evaluates_at(0):
            writer.write(
                0, {"eval/reward": evaluate(run, learner, state["learner"], sampling, config)}
            )
        for step in range(start + 1, config.steps + 1):
            state, metrics = train_step(
                run, learner, state, sampling, mesh, ref_params, step, config
            )
            if config.evaluates_at(step):
                metrics["eval/reward"] = evaluate(run, learner, state["learner"], sampling, config)
            writer.write(step, metrics)
            metrics_log.append({"step": step, **metrics})
            if checkpointer.should_save(step, config.steps):
                checkpointer.save(step, state, {"step": step, "config": config.to_json()})
    checkpointer.close()
    return RunResult(config, state["learner"], state["sampler"], metrics_log)


def train_step(run, learner, state, sampling, mesh, ref_params, step, config):
    """Learner step k: sync if due, sample, score, update, snapshot if due. Returns new state."""
    schedule = config.sync_schedule()
    sampler, pending = state["sampler"], state["pending"]
    version = schedule.version_for_step(step)
    if int(sampler.policy_version) != version:
        sampler_params, pending = pending.take(version)
        sampler = sampler.replace(params=sampler_params, policy_version=jnp.int32(version))

    t0 = time.perf_counter()
    examples = run.task.sample_prompts((config.seed, step), config.prompts_per_step)
    prompt_tokens, prompt_mask = run.tokenizer.encode_batch(
        [ex.prompt for ex in examples], length=run.task.max_prompt_len, add_bos=True
    )
    sampler = sampler.replace(key=jax.random.fold_in(jax.random.key(config.seed), step))
    rollout, sampler = generate(
        run.graphdef, sampler, prompt_tokens, prompt_mask, sampling,
        group_size=config.group_size, mesh=mesh,
    )  # fmt: skip
    texts = run.tokenizer.decode_batch(np.asarray(rollout.response_tokens))
    grouped = [ex for ex in examples for _ in range(config.group_size)]
    rewards = np.array(
        [run.task.reward(t, ex) for t, ex in zip(texts, grouped, strict=True)], np.float32
    )
    guards.check_rewards(rewards, texts, [ex.prompt for ex in grouped])
    t1 = time.perf_counter()

    batch = TrainBatch.from_rollout(rollout, parallel.shard_batch(rewards, mesh))
    learner_key = jax.random.fold_in(jax.random.key(config.seed + 1), step)
    learner_state, learner_metrics = learner.update(
        state["learner"], batch, ref_params if config.ref_metrics else None, learner_key
    )
    learner_metrics = {k: float(v) for k, v in jax.device_get(learner_metrics).items()}
    guards.check_update(step, learner_metrics)
    t2 = time.perf_counter()

    if schedule.snapshot_due(step):
        pending = pending.push(step, learner_state.params)
    num_tokens = float(np.asarray(rollout.response_length).sum())
    metrics = rollout_metrics(rollout, rewards, step, run.max_response_len)
    metrics.update(learner_metrics)
    metrics.update({
        "time/sample": t1 - t0,
        "time/learn": t2 - t1,
        "throughput/tokens_per_s": num_tokens / max(t2 - t0, 1e-9),
    })  # fmt: skip
    return {"learner": learner_state, "sampler": sampler, "pending": pending}, metrics


def evaluate(run, learner, learner_state, sampling, config) -> float:
    """Mean reward of the learner's policy on the fixed held-out prompts (one response each)."""
    examples = run.task.eval_examples(config.eval_prompts)
    prompt_tokens, prompt_mask = run.tokenizer.encode_batch(
        [ex.prompt for ex in examples], length=run.task.max_prompt_len, add_bos=True
    )
    state = SamplerState(
        params=learner_state.params, policy_version=learner_state.step,
        key=jax.random.key(config.seed + 2),
    )  # fmt: skip
    rollout, _ = generate(run.graphdef, state, prompt_tokens, prompt_mask, sampling, group_size=1)
    texts = run.tokenizer.decode_batch(np.asarray(rollout.response_tokens))
    return float(np.mean([run.task.reward(t, ex) for t, ex in zip(texts, examples, strict=True)]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rl_jax.train",
        description="Train a policy with a group-relative REINFORCE preset (arXiv 2509.24203).",
        epilog=config_lib.TrainConfig.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", default="embedded",
                        help=f"a preset {sorted(config_lib.PRESETS)} or a JSON file")  # fmt: skip
    parser.add_argument(
        "overrides", nargs="*", help="key=value (JSON values; dotted keys for dicts)"
    )
    parser.add_argument("--out", help="output directory (the out_dir field)")
    args = parser.parse_args(argv)
    if args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = "embedded"
    try:
        overrides = config_lib.parse_overrides(args.overrides)
        if args.out:
            overrides["out_dir"] = args.out
        config = config_lib.build(args.config, overrides)
    except ValueError as err:
        return _report(err)
    created = run_dir.created_root(config.out_dir)
    try:
        result = train(config)
    except (ValueError, OSError, guards.NonFiniteError, CheckpointSaveError) as err:
        run_dir.remove_if_no_output(created, config.out_dir)
        return _report(err)
    if not result.metrics:
        print(f"nothing to do: the run in {config.out_dir} has finished its {config.steps} steps")
        return 0
    last = result.metrics[-1]
    print(" ".join(f"{k}={last[k]:.4g}" for k in ("reward/mean", "kl/ref", "entropy") if k in last))
    return 0


def _report(error: Exception) -> int:
    """Prints one `error:` line for `error`; returns the exit status.

    2: bad input (the config, the out_dir, the files it names); 1: the run itself failed (a
    non-finite update, a save that did not fit on the disk).
    """
    if isinstance(error, OSError) and error.filename and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    else:
        message = " ".join(str(error).split())
    print(f"error: {message}", file=sys.stderr, flush=True)
    if isinstance(error, CheckpointSaveError):
        # orbax's writer threads keep printing tracebacks of the failed write until exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    return 1 if isinstance(error, (guards.NonFiniteError, CheckpointSaveError)) else 2


if __name__ == "__main__":
    sys.exit(main())
