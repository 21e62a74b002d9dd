"""The off-policy RL loop: sample -> reward -> learn, one jitted step at a time (DESIGN.md §1).

    python -m rl_jax.train [PRESET_OR_JSON] [key=value ...] --out DIR

The step itself is `rl_jax.step` (a `RunState` through a jitted `sample` and a jitted `learn`,
the sync schedule applied inside them). This module is the host side around it: prompts in,
token ids out to the task's reward, rewards back in, metrics read once per step and logged,
held-out evaluations, checkpoints and resume. `num_seeds` runs go through the same step as one
compiled program; each writes its own metrics, TensorBoard events and checkpoints.

Everything random at step k derives from (seed, k), so a run killed and restarted from its last
checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rl_jax import build, groups, guards, host_memory, parallel, run_dir
from rl_jax import config as config_lib
from rl_jax.checkpoint import Checkpointer, CheckpointSaveError
from rl_jax.learner import Learner
from rl_jax.metrics import MetricsWriter
from rl_jax.sampler import SamplingConfig, check_slots
from rl_jax.step import RunState, Step


@dataclasses.dataclass
class RunResult:
    """What `train` returns: the final state (run axis first) and each run's metrics per step."""

    config: config_lib.TrainConfig
    state: RunState
    run_metrics: list[list[dict]]

    @property
    def metrics(self) -> list[dict]:
        """The first run's metrics (the only run's, with num_seeds = 1)."""
        return self.run_metrics[0]


def make_step(config: config_lib.TrainConfig, run: build.Run, mesh) -> Step:
    """The run's jitted step from its config and its parts."""
    sampling = SamplingConfig(
        eos_id=run.tokenizer.eos_id,
        pad_id=run.tokenizer.pad_id,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        max_new_tokens=run.max_response_len,
        generation_buckets=(run.max_response_len,),
        prompt_buckets=(run.task.max_prompt_len,),
        decode_slots=config.decode_slots,
    )
    learner = Learner(
        graphdef=run.graphdef,
        algorithm=config.algorithm_preset(),
        optimizer=config.optimizer(),
        group_size=config.group_size,
        temperature=config.temperature,
        micro_batches=config.micro_batches,
        ref_metrics=config.ref_metrics,
        memory=config.memory_options(),
        logprob_chunk=config.logprob_chunk,
        mesh=mesh,
    )
    return Step(
        learner, sampling, config.sync_schedule(), config.group_size, mesh, config.runs_per_batch
    )


def generation_window(config: config_lib.TrainConfig, run: build.Run) -> int:
    """Steps per generate call: the largest divisor of `sync_interval` (at most `steps`) whose
    window's float32 KV cache fits `window_cap_gib` per device; 1 on-policy or with a cap of 0.

    One step's cache is rows * num_seeds * (prompt + response) positions of 2 * num_layers *
    num_kv_heads * head_dim floats, its rows split over all devices.
    """
    model = run.model_config
    positions = run.task.max_prompt_len + run.max_response_len
    rows = config.prompts_per_step * config.group_size * config.num_seeds / jax.device_count()
    per_step = rows * positions * 2 * model.num_layers * model.num_kv_heads * model.head_dim * 4
    fits = max(1, int(config.window_cap_gib * 2**30 // per_step))
    longest = min(config.sync_interval, config.steps, fits)
    return max(d for d in range(1, longest + 1) if config.sync_interval % d == 0)


def train(config: config_lib.TrainConfig) -> RunResult:
    """Runs (or resumes) the config's runs; returns their final state and metrics."""
    runs = config.runs()
    rows, devices = config.prompts_per_step * config.group_size, jax.device_count()
    if rows % devices:
        raise build.InputError(
            f"prompts_per_step * group_size = {rows} rows must divide over the {devices} devices "
            f"of {jax.process_count()} process(es)"
        )
    try:
        check_slots(config.decode_slots, rows, devices)
    except ValueError as error:
        raise build.InputError(str(error)) from None
    primary = jax.process_index() == 0  # the one process that writes files other than checkpoints
    mesh = parallel.make_mesh(config.fsdp)
    for single in runs:  # refuses another run's out_dir or fewer steps; writes nothing
        run_dir.check_resume(single)
    for single in runs if primary else ():  # the first write: an unwritable out_dir fails here
        _out(single).mkdir(parents=True, exist_ok=True)
    run = build.build_run(config)
    step_fn = make_step(config, run, mesh)
    shardings = parallel.param_shardings(run.params, mesh)
    params = jax.tree.map(parallel.from_host, run.params, shardings)
    state = step_fn.init(params, [single.seed for single in runs])
    checkpointers = [
        Checkpointer(
            _out(single) / run_dir.CHECKPOINT_DIR,
            save_every=config.checkpoint_every or config.steps,
            keep=config.keep_checkpoints,
        )  # fmt: skip
        for single in runs
    ]
    start, state = restore(checkpointers, state)
    host = HostSide(config, run, step_fn, mesh, window_size=generation_window(config, run))
    run_metrics = [[] for _ in runs]
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(
                MetricsWriter(_out(single), config.steps, resume_step=start, **_console(i, config))
                if primary
                else contextlib.nullcontext(_NoWriter())
            )
            for i, single in enumerate(runs)
        ]  # each refuses a gap in its metrics.jsonl before the restored step
        for single in runs if primary else ():
            run_dir.write_config(single)
        if start:
            print(f"resuming {config.out_dir} from step {start}", flush=True)
        if start == 0 and config.evaluates_at(0):
            for writer, reward in zip(writers, host.evaluate(state), strict=True):
                writer.write(0, {"eval/reward": reward})
        for step in range(start + 1, config.steps + 1):
            state, step_metrics = host.step(state, step)
            if config.evaluates_at(step):
                for metrics, reward in zip(step_metrics, host.evaluate(state), strict=True):
                    metrics["eval/reward"] = reward
            for writer, log, metrics in zip(writers, run_metrics, step_metrics, strict=True):
                writer.write(step, metrics)
                log.append({"step": step, **metrics})
            if checkpointers[0].should_save(step, config.steps):
                for i, (ckpt, single) in enumerate(zip(checkpointers, runs, strict=True)):
                    run_state = jax.tree.map(lambda x, i=i: x[i], state)
                    ckpt.save(step, run_state, {"step": step, "config": single.to_json()})
    for ckpt in checkpointers:
        ckpt.close()
    return RunResult(config, state, run_metrics)


class _NoWriter:
    """What processes other than the first write: nothing."""

    def write(self, step, metrics) -> None:
        pass


def _out(single: config_lib.TrainConfig) -> pathlib.Path:
    return pathlib.Path(single.out_dir)


def _console(run_index: int, config: config_lib.TrainConfig) -> dict:
    """The first run shows progress; the others only their last line."""
    return {} if run_index == 0 else {"progress": False, "log_every": config.steps}


def restore(checkpointers: list[Checkpointer], state: RunState) -> tuple[int, RunState]:
    """(step, state) of the newest step every run has a loadable checkpoint of; (0, state) if none.

    Runs advance in lockstep, so a kill between two runs' saves leaves them one save apart: they
    all resume from the older one (each run keeps `keep_checkpoints` >= 1 of them).
    """
    singles = [jax.tree.map(lambda x, i=i: x[i], state) for i in range(len(checkpointers))]
    limit = None
    while True:
        restored = [ckpt.restore_latest(s, max_step=limit) for ckpt, s in zip(
            checkpointers, singles, strict=True)]  # fmt: skip
        for ckpt, r in zip(checkpointers, restored, strict=True):
            if r is None and limit is None and ckpt.steps:
                raise ValueError(
                    f"none of the checkpoints {ckpt.steps} in {ckpt.directory} could be restored "
                    "(see the warnings above); move them away to start the run afresh"
                )
        if any(r is None for r in restored):
            return 0, state
        steps = {r[0] for r in restored}
        if len(steps) == 1:
            break
        limit = min(steps)
    for ckpt in checkpointers:
        ckpt.discard_after(restored[0][0])
    stack = lambda like, *xs: jax.device_put(jnp.stack(xs), like.sharding)
    return restored[0][0], jax.tree.map(stack, state, *[r[1] for r in restored])


@dataclasses.dataclass
class HostSide:
    """What the host does around the jitted step: prompts, rewards, metric reads, evaluation."""

    config: config_lib.TrainConfig
    run: build.Run
    step_fn: Step
    mesh: object
    window_size: int = 1  # steps per generate call (`generation_window`)
    _window: tuple | None = None  # (first step, steps, rollouts, rewards, utilization)

    def step(self, state: RunState, step: int) -> tuple[RunState, list[dict]]:
        """Learner step k of every run: sample (a new window when k is past the current one),
        score on the host, learn; each run's metrics."""
        config = self.config
        t0 = time.perf_counter()
        if self._window is None or not 0 <= step - self._window[0] < self._window[1]:
            state = self._sample_window(state, step)
        start, _, rollouts, rewards, utilization = self._window
        t1 = time.perf_counter()
        state, metrics = self.step_fn.learn(state, rollouts, rewards, step - start, step)
        metrics = parallel.to_host(metrics)
        t2 = time.perf_counter()
        rows = config.prompts_per_step * config.group_size
        out = []
        for i in range(config.num_seeds):
            values = {name: float(value[i]) for name, value in metrics.items()}
            guards.check_update(
                step, values, seed=config.seed + i if config.num_seeds > 1 else None
            )
            values.update({
                "time/sample": t1 - t0,
                "time/learn": t2 - t1,
                "sampler/row_step_utilization": float(utilization[i]),
                "throughput/tokens_per_s": values["response_length/mean"] * rows
                / max(t2 - t0, 1e-9),
            })  # fmt: skip
            out.append(values)
        return state, out

    def _sample_window(self, state: RunState, step: int) -> RunState:
        """Generates and scores the window of `SyncSchedule.window` that holds `step`."""
        config, task = self.config, self.run.task
        start, length = config.sync_schedule().window(step, self.window_size)
        examples = [
            [task.sample_prompts((single.seed, k), config.prompts_per_step) for k in
             range(start, start + length)]
            for single in config.runs()
        ]  # fmt: skip
        tokens, mask = self._encode(examples)
        rollouts, state, utilization = self.step_fn.sample(state, tokens, mask, start)
        tokens = parallel.to_host(rollouts.response_tokens)  # [runs, m, rows, N]
        rewards = np.stack(
            [
                self._rewards(tokens[:, j], [e[j] for e in examples], config.group_size)
                for j in range(length)
            ],
            axis=1,
        )
        rewards = parallel.from_host(rewards, parallel.rows_sharding(self.mesh, axis=2))
        self._window = (start, length, rollouts, rewards, parallel.to_host(utilization))
        return state

    def evaluate(self, state: RunState) -> list[float]:
        """Each run's mean reward on the fixed held-out prompts (one response each)."""
        examples = self.run.task.eval_examples(self.config.eval_prompts)
        tokens, mask = self.run.tokenizer.encode_batch(
            [ex.prompt for ex in examples], length=self.run.task.max_prompt_len, add_bos=True
        )
        replicated = parallel.replicated(self.mesh)
        rollout = self.step_fn.evaluate(
            state, parallel.from_host(tokens, replicated), parallel.from_host(mask, replicated)
        )
        runs = [examples] * self.config.num_seeds
        rewards = self._rewards(parallel.to_host(rollout.response_tokens), runs, 1)
        return [float(r.mean()) for r in rewards]

    def _encode(self, examples: list[list[list]]):
        """`[runs][m][num_prompts]` examples -> replicated `[runs, m, num_prompts, P]` arrays."""
        tokenizer, width = self.run.tokenizer, self.run.task.max_prompt_len
        encoded = [
            [
                tokenizer.encode_batch([ex.prompt for ex in e], length=width, add_bos=True)
                for e in run
            ]
            for run in examples
        ]
        replicated = parallel.replicated(self.mesh)
        return tuple(
            parallel.from_host(
                np.asarray([[pair[i] for pair in run] for run in encoded]), replicated
            )
            for i in (0, 1)
        )

    def _rewards(self, tokens: np.ndarray, examples: list[list], group_size: int) -> np.ndarray:
        """`[runs, rows]` float32 rewards of `[runs, rows, N]` response token ids."""
        out = []
        for run_tokens, run_examples in zip(tokens, examples, strict=True):
            texts = self.run.tokenizer.decode_batch(run_tokens)
            rows = groups.examples_for_rows(run_examples, group_size)
            run_rewards = [self.run.task.reward(t, ex) for t, ex in zip(texts, rows, strict=True)]
            guards.check_rewards(
                np.asarray(run_rewards, np.float32), texts, [ex.prompt for ex in rows]
            )
            out.append(run_rewards)
        return np.asarray(out, np.float32)


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
        parallel.initialize_distributed()
        overrides = config_lib.parse_overrides(args.overrides)
        if args.out:
            overrides["out_dir"] = args.out
        config = config_lib.build(args.config, overrides)
        cpu_devices = parallel.use_cpu_cores(
            config.prompts_per_step * config.group_size // config.micro_batches
        )
    except ValueError as err:
        return _report(err)
    if cpu_devices and cpu_devices > 1:
        print(f"{cpu_devices} CPU devices, one per core ({parallel.CPU_DEVICES_ENV}=1: one)")
    created = run_dir.created_root(config.out_dir)
    try:
        result = train(config)
    except (ValueError, OSError, guards.NonFiniteError, CheckpointSaveError) as err:
        run_dir.remove_if_no_output(created, config)
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
    host_memory.reexec_with_huge_pages()
    sys.exit(main())
