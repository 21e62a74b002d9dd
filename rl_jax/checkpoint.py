"""Checkpoints of the whole training state, one orbax directory per learner step.

`<directory>/<step>/state` holds an arbitrary pytree of arrays (learner state, sampler state
with its possibly stale params, pending snapshots, PRNG keys: raw uint32 keys and typed
`jax.random.key` arrays alike) and `<directory>/<step>/meta` a JSON object (data position,
config, versions). Restoring into a target pytree gives arrays bit-identical to the saved ones,
with the target's structure, dtypes and shardings, so a resumed run continues exactly where the
saved one stopped (DESIGN.md §1: one `RunState` pytree carries everything).

Crash safety: orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when
complete, and `save` returns only then. A kill mid-save leaves the temporary directory, which is
ignored (with a warning) and removed. A finished checkpoint that is later damaged fails to load;
`restore_latest` then warns and falls back to the next older one.

Integrity: damage that still decodes (random bytes written over array data) would load silently,
so the meta item also records a CRC-32 of every array's bytes (with its dtype and shape), taken
from the arrays being saved; `restore_latest` recomputes them on the restored arrays and treats a
mismatch, or a checkpoint without checksums, like an unreadable one. The checksums live in the
meta item, so they are committed by the same rename as the arrays; arrays spread over several
processes are checksummed shard by shard (`rl_jax.checksums`).

A failed save (a full disk, a read-only directory) raises `CheckpointSaveError` with one line
naming the directory and the cause; the hundred tracebacks that orbax's writer threads print for
one failed write are held back (they are replayed when the save succeeds).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import pathlib
import sys
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rl_jax import checksums

PyTree = Any
STATE_ITEM = "state"
META_ITEM = "meta"
_TMP_MARKER = ".orbax-checkpoint-tmp"
CHECKSUMS_KEY = "array_checksums"  # reserved key of the meta item


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or set aside."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names the directory and the cause."""


def _save_failure(error: BaseException) -> str:
    """The cause of a failed save in a few words: the OS error, else the error's first line."""
    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for link in chain:
        if isinstance(link, OSError) and link.strerror:
            return f"{link.strerror} ({link.filename})" if link.filename else link.strerror
    text = " ".join(str(link) for link in chain)
    for cause in (os.strerror(code) for code in (28, 30, 13, 122)):  # ENOSPC EROFS EACCES EDQUOT
        if cause in text:
            return cause
    return f"{type(error).__name__}: {_first_line(error)}"


class _HeldStderr:
    """What `_stderr_held_back` yields: set `drop` to discard the output of a successful block."""

    drop = False


@contextlib.contextmanager
def _stderr_held_back():
    """Sends fd 2 (Python's and C++'s writes alike) to a temporary file for the block.

    Replayed on stderr when the block succeeds (unless `drop` was set); dropped if it raises,
    since orbax's threads then print dozens of tracebacks of the one failure that the raised
    error already names (and absl logging is silenced for the threads that keep failing).
    """
    sys.stderr.flush()
    original = os.dup(2)
    control = _HeldStderr()
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield control
        except BaseException:
            logging.getLogger("absl").setLevel(logging.CRITICAL)
            raise
        else:
            sys.stderr.flush()
            if not control.drop:
                held.seek(0)
                os.write(original, held.read())
        finally:
            sys.stderr.flush()
            os.dup2(original, 2)
            os.close(original)


def _abstract_leaf(leaf):
    """The restore target of one leaf: arrays keep shape, dtype and sharding; scalars -> numpy."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, (jax.ShapeDtypeStruct, np.ndarray)):
        return leaf
    if isinstance(leaf, (np.generic, bool, int, float)):
        return np.asarray(leaf)
    raise TypeError(f"cannot restore a leaf of type {type(leaf).__name__}; use arrays or scalars")


def _like_target(target_leaf, restored_leaf):
    """Python and numpy scalars come back as what the target held; arrays as restored."""
    if isinstance(target_leaf, (bool, int, float)):
        return type(target_leaf)(restored_leaf.item())
    if isinstance(target_leaf, np.generic):
        return restored_leaf[()]
    return restored_leaf


def _first_line(error: BaseException, limit: int = 300) -> str:
    # tensorstore errors carry a multi-kilobyte spec after the first line.
    text = str(error).strip().split("\n", 1)[0]
    return text if len(text) <= limit else text[:limit] + "..."


def finished_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the finished checkpoints in `directory` (named by their step), oldest first.

    Reads the directory listing only: usable without a `Checkpointer`, which creates directories.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(entry.name) for entry in directory.iterdir() if entry.name.isdigit())


def read_meta(directory: str | os.PathLike, step: int) -> dict:
    """The meta item of the checkpoint of `step`, read as plain JSON (OSError, ValueError)."""
    return json.loads((pathlib.Path(directory) / str(step) / META_ITEM / "metadata").read_text())


def _interrupted_saves(directory: pathlib.Path) -> list[str]:
    """Names of temporary directories that interrupted saves left behind."""
    if not directory.is_dir():
        return []
    return sorted(entry.name for entry in directory.iterdir() if _TMP_MARKER in entry.name)


class Checkpointer:
    """Saves every `save_every` steps and at the end; keeps the newest `keep` checkpoints.

    Args:
      directory: where step directories live; created if missing.
      save_every: checkpoint interval in learner steps (>= 1).
      keep: number of most recent checkpoints kept on disk (>= 1).
      read_only: only restore; nothing is created, removed or written (`rl_jax.evaluate` and
        `rl_jax.export` read checkpoints of runs that may still be training).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int = 3,
        read_only: bool = False,
    ):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = pathlib.Path(directory).absolute()
        self.save_every = save_every
        self.keep = keep
        # Listed before the manager starts, which removes them in the background (read-only: a
        # temporary directory may be a save in progress, and stays).
        self._interrupted = [] if read_only else _interrupted_saves(self.directory)
        self._unusable: set[int] = set()
        if read_only:  # orbax's read-only mode: no directory created, nothing cleaned up
            options = ocp.CheckpointManagerOptions(
                read_only=True, max_to_keep=None, save_interval_steps=0, create=False,
                cleanup_tmp_directories=False, enable_async_checkpointing=False,
            )  # fmt: skip
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
                create=True,
            )
        absl = logging.getLogger("absl")
        level = absl.level
        if read_only:  # orbax warns that the directory is read-only, which is what we asked for
            absl.setLevel(logging.ERROR)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=(STATE_ITEM, META_ITEM)
            )
        finally:
            absl.setLevel(level)

    @property
    def steps(self) -> list[int]:
        """Steps of the finished checkpoints on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int, total_steps: int) -> bool:
        """True every `save_every` steps and at the last step."""
        return step % self.save_every == 0 or step == total_steps

    def save(self, step: int, state: PyTree, meta: Mapping[str, Any]) -> None:
        """Write `state` (a pytree of arrays/scalars) and `meta` (JSON-able) as step `step`.

        Blocks until the checkpoint is complete on disk. Checkpoints at steps >= `step` that
        `restore_latest` found unusable are renamed to `<step>.unusable` first; any other
        checkpoint at a step >= `step` raises FileExistsError (it belongs to a later run).
        """
        if not isinstance(meta, Mapping):
            raise TypeError(f"meta must be a mapping, got {type(meta).__name__}")
        if CHECKSUMS_KEY in meta:
            raise ValueError(f"meta key {CHECKSUMS_KEY!r} is reserved for the array checksums")
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as error:
            raise TypeError(f"meta must be JSON-serialisable: {error}") from error
        self._set_aside_unusable_from(step)
        meta = {**meta, CHECKSUMS_KEY: checksums.of(state)}
        try:
            with _stderr_held_back():
                self._manager.save(
                    step,
                    args=ocp.args.Composite(
                        **{
                            STATE_ITEM: ocp.args.StandardSave(state),
                            META_ITEM: ocp.args.JsonSave(meta),
                        }
                    ),
                    force=True,
                )
                self._manager.wait_until_finished()
        except Exception as error:  # orbax wraps OS errors in ValueError and others
            raise CheckpointSaveError(
                f"could not save the checkpoint of step {step} in {self.directory}: "
                f"{_save_failure(error)}"
            ) from error

    def _set_aside_unusable_from(self, step: int) -> None:
        later = [s for s in self.steps if s >= step]
        usable = [s for s in later if s not in self._unusable]
        if usable:
            raise FileExistsError(
                f"{self.directory} already holds checkpoints at steps {usable} >= {step}; "
                "restore the latest one or use a new directory"
            )
        if not later:
            return
        if jax.process_index() == 0:
            for unusable_step in later:
                source = self.directory / str(unusable_step)
                target = source.with_name(f"{unusable_step}.unusable")
                suffix = 1
                while target.exists():
                    target = source.with_name(f"{unusable_step}.unusable-{suffix}")
                    suffix += 1
                source.rename(target)
                warnings.warn(
                    f"set aside the unusable checkpoint of step {unusable_step} as {target.name}",
                    CheckpointWarning,
                    stacklevel=3,
                )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"rl_jax checkpoint set aside {step}")
        self._unusable.difference_update(later)
        self._manager.reload()

    def restore_latest(
        self, target: PyTree, max_step: int | None = None
    ) -> tuple[int, PyTree, dict] | None:
        """(step, state, meta) of the newest checkpoint (at or before `max_step`, if given) that
        loads, or None if there is none.

        `target` is a pytree of the saved structure: concrete arrays or jax.ShapeDtypeStruct
        (dtype and sharding of the result follow it; scalars come back as their target's type).
        Unreadable checkpoints, and those whose arrays do not match their checksums, are
        skipped, newest first, with a CheckpointWarning naming the step and the error.
        """
        for name in self._interrupted:
            warnings.warn(
                f"ignoring {self.directory / name}: a save that was interrupted before it finished",
                CheckpointWarning,
                stacklevel=2,
            )
        self._interrupted = []
        abstract = jax.tree.map(_abstract_leaf, target)
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(abstract), META_ITEM: ocp.args.JsonRestore()}
        )
        candidates = sorted(
            (s for s in self.steps if max_step is None or s <= max_step), reverse=True
        )
        for step in candidates:
            failure = None
            with _stderr_held_back() as held:
                try:
                    restored = self._manager.restore(step, args=args)
                    meta = dict(restored[META_ITEM])
                    checksums.verify(restored[STATE_ITEM], meta.pop(CHECKSUMS_KEY, None))
                except Exception as error:  # orbax and tensorstore raise many types
                    failure = f"{type(error).__name__}: {_first_line(error)}"
                    del error
                    gc.collect()  # orbax's abandoned reads finalize (and print) while held
                    held.drop = True
            if failure is not None:
                self._unusable.add(step)
                warnings.warn(
                    f"skipping the checkpoint of step {step} in {self.directory}: {failure}",
                    CheckpointWarning,
                    stacklevel=2,
                )
                continue
            state = jax.tree.map(_like_target, target, restored[STATE_ITEM])
            return step, state, meta
        if candidates:
            warnings.warn(
                f"none of the checkpoints {candidates[::-1]} in {self.directory} could be restored;"
                " if all failed alike, `target` probably does not match the saved state",
                CheckpointWarning,
                stacklevel=2,
            )
        return None

    def discard_after(self, step: int) -> None:
        """Deletes the usable checkpoints of steps > `step`: a resume from `step` writes them anew
        (runs trained in lockstep resume from the newest step they all have). Unusable ones stay
        until `save` sets them aside as `<step>.unusable`."""
        for later in [s for s in self.steps if s > step and s not in self._unusable]:
            self._manager.delete(later)

    def close(self) -> None:
        """Wait for pending work and release the manager's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
