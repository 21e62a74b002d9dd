"""The run directory (`out_dir`): which run it holds, and whether a new invocation may continue it.

A run's identity is every `TrainConfig` field (by dotted path, `rl_jax.config.field_paths`)
except `RESUMABLE_FIELDS` (its length, logging and checkpoint cadence, and where it lives), so a
field added to `TrainConfig` is part of the identity unless it is listed there. Every
checkpoint's meta item stores the config it was written by. Before anything is written into an
existing `out_dir`, `check_resume` compares:

- the identity stored with the newest readable checkpoint (or, before the first checkpoint,
  the run's `config.json`) with the new config's; any difference is refused with the fields
  listed and what to do: resume with the old settings, or start afresh elsewhere. A stored
  config is read in any layout `rl_jax.config.flatten` reads: the nested one written now, or the
  flat one of runs written before the config had parts;
- `steps`: it may grow (a finished run is extended: the sampler snapshots a longer run needs are
  saved, see `SyncSchedule.snapshot_due`), unless the learning-rate schedule decays over `steps`;
  it may not shrink below the newest checkpoint.

`write_config` writes `config.json` only after that decision (atomically, so a kill never leaves
a torn one). `created_root` and `remove_if_no_output` let the CLI remove a directory it created
for a run that failed before writing any metrics or checkpoint, unless another process holds
it by then (`rl_jax.run_lock`; `train` takes that lock before `check_resume`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from collections.abc import Mapping

from rl_jax import atomic, checkpoint, run_lock
from rl_jax import config as config_lib
from rl_jax.config import TrainConfig
from rl_jax.metrics import METRICS_FILE

# TrainConfig fields that a resumed run may change; every other field is the run's identity.
RESUMABLE_FIELDS = frozenset(
    {"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "out_dir"}
)
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class RunDirError(ValueError):
    """out_dir holds a run that this config may not continue; the message says what to do."""


def identity(config: Mapping) -> dict:
    """{dotted path: value} of the identity fields of a config given as a dict (`json.loads` of
    `to_json`, nested, or a stored config of the flat layout).

    A field missing from `config` (written before the field existed) takes the field's default,
    the behaviour the run had when it was written; a stored key no field has is ignored.
    """
    values = {**config_lib.defaults(), **config_lib.flatten(config, strict=False)}
    out = {path: value for path, value in values.items() if path not in RESUMABLE_FIELDS}
    return json.loads(json.dumps(out))  # tuples -> lists, as stored


def _stored_config(out: pathlib.Path) -> tuple[dict, str] | None:
    """(config dict, where it was read) of the run in `out`, or None when there is none."""
    checkpoints = out / CHECKPOINT_DIR
    for step in reversed(checkpoint.finished_steps(checkpoints)):
        try:
            stored = json.loads(checkpoint.read_meta(checkpoints, step)["config"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable: restore_latest reports it and falls back to an older one
        if isinstance(stored, dict):
            return stored, f"its checkpoint of step {step}"
    path = out / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict):
            raise ValueError(f"it holds {type(stored).__name__} {stored!r:.40}, not a JSON object")
    except (UnicodeDecodeError, ValueError) as error:
        raise RunDirError(
            f"{path} is not a readable config ({error}); delete it, or pass another --out"
        ) from error
    return stored, str(path)


def _start_afresh(out: pathlib.Path) -> str:
    return f"to start a new run, pass another --out or delete {out}"


def check_resume(config: TrainConfig) -> None:
    """Raises RunDirError unless `config` may start or continue the run in `config.out_dir`.

    Reads only; nothing is written or created.
    """
    out = pathlib.Path(config.out_dir)
    stored = _stored_config(out)
    if stored is None:
        return
    old, source = stored
    new = json.loads(config.to_json())
    old_id, new_id = identity(old), identity(new)
    differing = [
        f"{name}={old_id[name]!r} -> {new_id[name]!r}"
        for name in new_id
        if old_id[name] != new_id[name]
    ]
    old_steps = old.get("steps")
    optimizer = config.optimizer
    if not differing and isinstance(old_steps, int) and old_steps != config.steps:
        if optimizer.decay_steps(old_steps) != optimizer.decay_steps(config.steps):
            differing.append(
                f"steps={old_steps} -> {config.steps} (optimizer.schedule="
                f"{optimizer.schedule!r} decays the learning rate over the run's steps)"
            )
    if differing:
        raise RunDirError(
            f"{out} holds a different run ({source}): {', '.join(differing)}; to resume it, use "
            f"its settings (in {out / CONFIG_FILE}); {_start_afresh(out)}"
        )
    steps = checkpoint.finished_steps(out / CHECKPOINT_DIR)
    if steps and config.steps < steps[-1]:
        raise RunDirError(
            f"steps={config.steps} is below the newest checkpoint of the run in {out}, step "
            f"{steps[-1]}; to continue it, pass steps>={steps[-1]}; {_start_afresh(out)}"
        )


def write_config(config: TrainConfig) -> None:
    """Writes `<out_dir>/config.json` atomically (call after `check_resume`)."""
    atomic.write_text(pathlib.Path(config.out_dir) / CONFIG_FILE, config.to_json())


def created_root(out_dir: str | os.PathLike) -> pathlib.Path | None:
    """The outermost directory of `out_dir` that does not exist yet (what a run would create)."""
    path = pathlib.Path(out_dir).absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def remove_if_no_output(root: pathlib.Path | None, config: TrainConfig) -> None:
    """Removes `root` (from `created_root`) if none of the config's runs wrote a metrics line
    or a checkpoint, and no other process holds one of their directories (`run_lock`): a run
    that started there meanwhile keeps it."""
    if root is None or not root.exists():
        return
    with contextlib.ExitStack() as held:
        for single in config.runs():
            out = pathlib.Path(single.out_dir)
            if out.is_dir():
                try:
                    held.enter_context(run_lock.hold(out))
                except run_lock.RunLockedError:
                    return
            metrics = out / METRICS_FILE
            if checkpoint.finished_steps(out / CHECKPOINT_DIR) or (
                metrics.is_file() and metrics.stat().st_size
            ):
                return
        shutil.rmtree(root, ignore_errors=True)
