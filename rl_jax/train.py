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

import jax
import jax.numpy as jnp

from rl_jax import (
    build,
    guards,
    host_memory,
    memory_estimate,
    models,
    parallel,
    preemption,
    run_dir,
    run_lock,
)
from rl_jax import config as config_lib
from rl_jax.checkpoint import Checkpointer, CheckpointSaveError
from rl_jax.host_side import HostSide
from rl_jax.learner import Learner
from rl_jax.metrics import MetricsWriter
from rl_jax.sampler import SamplingConfig, check_slots
from rl_jax.step import RunState, Step
from rl_jax.tasks import base as tasks_base


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
    """The run's jitted step: each component built from its part of the config and the run."""
    draw, memory = config.sampling, config.memory
    sampling = SamplingConfig(
        eos_id=run.tokenizer.eos_id,
        pad_id=run.tokenizer.pad_id,
        temperature=draw.temperature,
        top_k=draw.top_k,
        top_p=draw.top_p,
        max_new_tokens=run.max_response_len,
        generation_buckets=(run.max_response_len,),
        prompt_buckets=(run.task.max_prompt_len,),
        decode_slots=draw.decode_slots,
    )
    learner = Learner(
        graphdef=run.graphdef,
        algorithm=config.algorithm.preset(),
        optimizer=config.optimizer,
        steps=config.steps,
        group_size=config.group_size,
        temperature=draw.temperature,
        micro_batches=memory.micro_batches,
        ref_metrics=config.ref_metrics,
        memory=memory.options(),
        logprob_chunk=memory.logprob_chunk,
        mesh=mesh,
        packing=memory.packing,
    )
    return Step(learner, sampling, config.sync, config.group_size, mesh, config.runs_per_batch)


def generation_window(config: config_lib.TrainConfig, run: build.Run) -> int:
    """Steps per generate call: the largest divisor of `sync.interval` (at most `steps`) whose
    window's KV cache fits `sampling.window_cap_gib` per device; 1 on-policy or with a cap of 0.

    One step's cache is rows * num_seeds rows, split over all devices, of the cache the model's
    own `init_cache` allocates for (prompt + response) positions, in its compute dtype (measured
    with `jax.eval_shape`: nothing is allocated).
    """
    positions = run.task.max_prompt_len + run.max_response_len
    cache = jax.eval_shape(lambda: models.init_cache(run.model_config, 1, positions))
    row_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    rows = config.rows * config.num_seeds / jax.device_count()
    fits = max(1, int(config.sampling.window_cap_gib * 2**30 // (rows * row_bytes)))
    interval = config.sync.interval
    longest = min(interval, config.steps, fits)
    return max(d for d in range(1, longest + 1) if interval % d == 0)


def train(config: config_lib.TrainConfig) -> RunResult:
    """Runs (or resumes) the config's runs; returns their final state and metrics.

    Holds each run's directory for its life (`run_lock`: another process on it is refused) and
    stops on SIGTERM / SIGINT after saving the last finished step (`preemption`: raises
    `preemption.Preempted`).
    """
    out_dirs, processes = [_out(single) for single in config.runs()], jax.process_count()
    with run_lock.hold_runs(out_dirs, jax.process_index() == 0, processes):
        with preemption.watch(processes) as watch:
            return _train(config, watch)


def _train(config: config_lib.TrainConfig, watch: preemption.Watch) -> RunResult:
    runs = config.runs()
    parallel.check_rows(config.rows, jax.device_count(), "prompts_per_step * group_size")
    check_slots(config.sampling.decode_slots, config.rows, jax.device_count())
    primary = jax.process_index() == 0  # the one process that writes files other than checkpoints
    mesh = parallel.make_mesh(config.memory.fsdp)
    for single in runs:  # refuses another run's out_dir or fewer steps; writes nothing
        run_dir.check_resume(single)
    for single in runs if primary else ():  # the first write: an unwritable out_dir fails here
        _out(single).mkdir(parents=True, exist_ok=True)
    run = build.build_run(config)
    memory_estimate.check(config, run, generation_window(config, run))  # before compiling
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
    stopped = None
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
        note = None if start else build.random_weights_note(config)
        if note:
            print(note, flush=True)
        if start:
            print(f"resuming {config.out_dir} from step {start}", flush=True)
        if start == 0 and config.evaluates_at(0):
            for writer, reward in zip(writers, host.evaluate(state), strict=True):
                writer.write(0, {"eval/reward": reward})
        for step in range(start + 1, config.steps + 1):
            if watch.should_stop():  # a SIGTERM / SIGINT: save the last finished step and exit
                stopped = _stop(config, checkpointers, state, step - 1, start, watch.signum)
                break
            state, step_metrics = host.step(state, step)
            if config.evaluates_at(step):
                for metrics, reward in zip(step_metrics, host.evaluate(state), strict=True):
                    metrics["eval/reward"] = reward
            for writer, log, metrics in zip(writers, run_metrics, step_metrics, strict=True):
                writer.write(step, metrics)
                log.append({"step": step, **metrics})
            if checkpointers[0].should_save(step, config.steps):
                _save(checkpointers, runs, state, step)
    for ckpt in checkpointers:
        ckpt.close()
    if stopped is not None:  # after the metrics writers have flushed and closed
        print(stopped.message, flush=True)
        raise stopped
    return RunResult(config, state, run_metrics)


def _save(checkpointers: list[Checkpointer], runs, state: RunState, step: int) -> None:
    """Saves each run's slice of `state` as its checkpoint of `step`."""
    for i, (ckpt, single) in enumerate(zip(checkpointers, runs, strict=True)):
        run_state = jax.tree.map(lambda x, i=i: x[i], state)
        ckpt.save(step, run_state, {"step": step, "config": single.to_json()})


def _stop(config, checkpointers, state, last: int, start: int, signum: int):
    """Saves the checkpoint of `last` (the last finished step) unless it exists; the
    `preemption.Preempted` to raise once the metrics are flushed."""
    where = f"in {config.out_dir}; rerun the same command to resume"
    if last == start:
        saved = f"checkpoint {last} is the newest" if last else "nothing to save"
        return preemption.Preempted(signum, f"preempted at step {last}: {saved} {where}")
    if last not in checkpointers[0].steps:
        _save(checkpointers, config.runs(), state, last)
    return preemption.Preempted(
        signum, f"preempted at step {last}: saved checkpoint {last} {where}"
    )


class _NoWriter:
    """What processes other than the first write: nothing."""

    def write(self, step, metrics) -> None:
        pass


def _out(single: config_lib.TrainConfig) -> pathlib.Path:
    return pathlib.Path(single.out_dir)


def _console(run_index: int, config: config_lib.TrainConfig) -> dict:
    """How run `run_index` shows on the console. One run: a progress bar on a terminal, plain
    lines elsewhere. Several seeds (they advance in lockstep): on a terminal one bar for all of
    them, labelled with their seeds, and nothing from the others (their lines would break the
    bar); elsewhere every seed's lines, each labelled with its seed."""
    if config.num_seeds == 1:
        return {}
    if sys.stdout.isatty():
        last = config.seed + config.num_seeds - 1
        return {"label": f"seeds {config.seed}-{last}"} if run_index == 0 else {"console": False}
    return {"label": f"seed {config.seed + run_index}", "progress": False}


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rl_jax.train",
        description="Train a policy with a group-relative REINFORCE preset (arXiv 2509.24203).",
        epilog=config_lib.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", default="embedded",
                        help=f"a preset {sorted(config_lib.PRESETS)} or a JSON file")  # fmt: skip
    parser.add_argument(
        "overrides", nargs="*", help="key=value: a field's dotted path or shorthand (below)"
    )
    parser.add_argument("--out", help="output directory (the out_dir field)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the data preparation's progress bars and logs")  # fmt: skip
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[tasks_base.VERBOSE_ENV] = "1"
    if args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = "embedded"
    try:
        parallel.initialize_distributed()
        overrides = config_lib.parse_overrides(args.overrides)
        if args.out:
            overrides["out_dir"] = args.out
        config = config_lib.build(args.config, overrides)
        cpu_devices = parallel.use_cpu_cores(config.rows // config.memory.micro_batches)
    except ValueError as err:
        return _report(err)
    if cpu_devices and cpu_devices > 1:
        print(f"{cpu_devices} CPU devices, one per core ({parallel.CPU_DEVICES_ENV}=1: one)")
    created = run_dir.created_root(config.out_dir)
    try:
        result = train(config)
    except preemption.Preempted as stop:  # its line is printed
        return stop.code
    except run_lock.RunLockedError as err:
        return _report(err)  # the directory is another process's: nothing to clean up
    except (ValueError, OSError, ImportError, guards.NonFiniteError, CheckpointSaveError) as err:
        run_dir.remove_if_no_output(created, config)
        return _report(err)
    if not result.metrics:
        print(f"nothing to do: the run in {config.out_dir} has finished its {config.steps} steps")
        return 0
    last = result.metrics[-1]
    print(" ".join(f"{k}={last[k]:.4g}" for k in ("reward/mean", "kl/ref", "entropy") if k in last))
    where = config.out_dir if config.num_seeds == 1 else f"{config.out_dir}/seed_*"
    print(f"wrote metrics.jsonl, TensorBoard events and checkpoints to {where}")
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
