"""A trained run read back from its directory: what `rl_jax.evaluate` and `rl_jax.export` start
from.

    files = saved_run.find(RUN_DIR, step=None)   # cheap checks only: config, checkpoint steps
    saved = saved_run.load(files)                # the run's parts and its restored state

`RUN_DIR` is a run's `out_dir` (`rl_jax.run_dir`): `config.json` and `checkpoints/<step>/`, or,
for `num_seeds` > 1, the parent of its `seed_<s>/` runs (each a complete run directory). `find` reads the config and lists the
checkpoint steps every run has; `load` rebuilds the run (`build.build_run`, `train.make_step`)
and restores each run's `RunState` of that step, as a resumed training run does, but read-only:
nothing in the directory is created, removed or written, so it may read a run that is still
training. Bad input (no directory, no readable config, no checkpoint, a step that does not
exist) raises `RunInputError` with one line naming the file or step and what exists.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp

from rl_jax import build, checkpoint, parallel, run_dir, train
from rl_jax import config as config_lib
from rl_jax.step import RunState, Step


class RunInputError(ValueError):
    """RUN_DIR, its config or the requested step is unusable; the CLIs print it as `error:`."""


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """A run directory found usable: the (first) run's config, each run's (seed, directory) and
    the checkpoint step they all have."""

    directory: pathlib.Path
    config: config_lib.TrainConfig
    runs: tuple[tuple[int, pathlib.Path], ...]
    step: int


@dataclasses.dataclass
class SavedRun:
    """The run's parts and its state at `step` (a leading run axis, one entry per seed)."""

    files: RunFiles
    run: build.Run
    step_fn: Step
    mesh: object
    state: RunState

    @property
    def step(self) -> int:
        return self.files.step

    @property
    def seeds(self) -> list[int]:
        return [seed for seed, _ in self.files.runs]

    def params(self, index: int):
        """The learner's parameters of run `index` (a seed's policy at `step`)."""
        return jax.tree.map(lambda x: x[index], self.state.learner.params)


def read_config(directory: str | pathlib.Path) -> config_lib.TrainConfig:
    """The config of the run in `directory` (its config.json); RunInputError if unreadable."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise RunInputError(f"{directory} is not a directory")
    path = directory / run_dir.CONFIG_FILE
    if not path.is_file():
        raise RunInputError(
            f"{directory} is not a run directory: it has no {run_dir.CONFIG_FILE} (a run's "
            "--out directory has one, or seed_<s>/ runs that do)"
        )
    try:
        return config_lib.build(str(path))
    except (OSError, ValueError, TypeError) as error:
        message = " ".join(str(error).split())
        raise RunInputError(f"cannot read the run's config {path}: {message}") from error


def seed_runs(directory: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """(seed, path) of the `seed_<s>/` runs a `num_seeds` run wrote in `directory`, by seed."""
    if not directory.is_dir():
        return []
    found = [
        (int(path.name.removeprefix("seed_")), path)
        for path in directory.iterdir()
        if re.fullmatch(r"seed_\d+", path.name) and (path / run_dir.CONFIG_FILE).is_file()
    ]
    return sorted(found)


def find(directory: str | pathlib.Path, step: int | None = None) -> RunFiles:
    """The config, runs and checkpoint step (`step`, else the newest every run has) of the run
    in `directory`: one run, or the `seed_<s>/` runs of a `num_seeds` run. Reads files only;
    RunInputError names what is missing and what exists."""
    directory = pathlib.Path(directory)
    seeds = [] if (directory / run_dir.CONFIG_FILE).exists() else seed_runs(directory)
    if seeds:  # each seed's run is a complete run; they differ in the seed only
        config = read_config(seeds[0][1])
        runs = tuple(seeds)
    else:
        config = read_config(directory)
        runs = ((config.seed, directory),)
    steps = [checkpoint.finished_steps(path / run_dir.CHECKPOINT_DIR) for _, path in runs]
    common = sorted(set.intersection(*map(set, steps)))
    if not any(steps):
        where = ", ".join(str(path / run_dir.CHECKPOINT_DIR) for _, path in runs[:2])
        raise RunInputError(
            f"{directory} has no checkpoint (nothing in {where}{', ...' if len(runs) > 2 else ''})"
            "; a run saves one every checkpoint_every steps and at its last step"
        )
    if step is None:
        if not common:
            listing = "; ".join(f"{p}: {s}" for (_, p), s in zip(runs, steps, strict=True))
            raise RunInputError(
                f"the runs in {directory} have no checkpoint step in common ({listing})"
            )
        return RunFiles(directory, config, runs, common[-1])
    if step not in common:
        raise RunInputError(f"{directory} has no checkpoint of step {step}; it has steps {common}")
    return RunFiles(directory, config, runs, step)


def load(files: RunFiles) -> SavedRun:
    """The run's parts and every run's state at `files.step`, restored read-only.

    Parameters are split over the devices as in training where the device count allows the
    run's `fsdp`, else replicated. RunInputError when a checkpoint does not load (the warnings
    printed before it say why).
    """
    config = files.config
    run = build.build_run(config)
    fsdp = config.memory.fsdp if jax.device_count() % config.memory.fsdp == 0 else 1
    mesh = parallel.make_mesh(fsdp)
    step_fn = train.make_step(config, run, mesh)
    params = jax.tree.map(
        parallel.from_host, run.params, parallel.param_shardings(run.params, mesh)
    )
    state = step_fn.init(params, [seed for seed, _ in files.runs])
    restored = []
    for i, (_, path) in enumerate(files.runs):
        target = jax.tree.map(lambda x, i=i: x[i], state)
        directory = path / run_dir.CHECKPOINT_DIR
        ckpt = checkpoint.Checkpointer(directory, save_every=1, read_only=True)
        try:
            result = ckpt.restore_latest(target, max_step=files.step)
        finally:
            ckpt.close()
        if result is None or result[0] != files.step:
            raise RunInputError(
                f"the checkpoint of step {files.step} in {directory} could not be restored (see "
                f"the warnings above); its steps: {checkpoint.finished_steps(directory)}"
            )
        restored.append(result[1])
    stack = lambda like, *xs: jax.device_put(jnp.stack(xs), like.sharding)
    return SavedRun(files, run, step_fn, mesh, jax.tree.map(stack, state, *restored))
