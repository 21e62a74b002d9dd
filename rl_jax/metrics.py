"""Per-step metric logging: a JSONL file, TensorBoard events and a console view.

Each learner step k produces one line of `<out_dir>/metrics.jsonl`::

    {"step": k, "reward/mean": 0.41, "kl/ref": 0.0012, ...}

with the metric names of DESIGN.md §5. Values are floats. JSON has no NaN or infinity, so
non-finite values are written as the strings "NaN", "Infinity" and "-Infinity" (the spellings
Python's `float()` parses); `read_metrics` turns them back into floats. Every line is flushed as
it is written, so a killed run leaves a readable file whose last line at worst is torn;
`read_metrics` drops such a line with a warning.

A run resumed from the checkpoint of step s keeps the lines with step <= s and appends from
there, so its file equals the file of an uninterrupted run. The TensorBoard writer marks the
same point with a purge step, which makes TensorBoard discard the older events of steps > s.
Every step 1..s must then have its line: a file that lost some (deleted, or cut short by hand)
is refused with `MetricsGapError` rather than continued with a gap. That rewrite replaces the file
(atomically) while nothing appends to it: `rl_jax.run_lock` keeps a second run out of the
directory. It is not rebuilt: the file
is the run's only record of its metrics, and keeping a second copy in every checkpoint would
give two records that can disagree.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Mapping

import numpy as np

from rl_jax import atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# The numbers shown on the console: (metric name, short label for the progress bar).
KEY_METRICS = (
    ("reward/mean", "reward"),
    ("kl/ref", "kl"),
    ("entropy", "entropy"),
    ("response_length/mean", "len"),
    ("eval/reward", "held-out"),
)
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _to_float(name: str, value) -> float:
    """A Python float from a Python, numpy or JAX scalar; ValueError for anything else."""
    array = np.asarray(value)
    if array.shape != () or not (
        np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)
    ):
        raise ValueError(
            f"metric {name!r} must be a real scalar, got shape {array.shape} dtype {array.dtype}"
        )
    if np.iscomplexobj(array):
        raise ValueError(f"metric {name!r} must be real, got dtype {array.dtype}")
    return float(array)


def _encode(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _decode(value):
    return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def format_line(step: int, metrics: Mapping[str, float]) -> str:
    """The JSONL line (without newline) for one step: strict JSON, non-finite values as strings."""
    record = {"step": int(step)}
    for name, value in metrics.items():
        if name == "step":
            raise ValueError("'step' is reserved for the step number; rename the metric")
        record[name] = _encode(_to_float(name, value))
    return json.dumps(record, allow_nan=False)


def _parse_lines(text: str, source: str) -> list[tuple[str, dict]]:
    """(line, record) pairs of JSONL text; a torn last line is dropped with a warning."""
    lines = text.split("\n")
    parsed = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if all(not rest.strip() for rest in lines[index + 1 :]):
                warnings.warn(
                    f"{source}: ignoring a torn last line {index + 1} ({error}); "
                    "the run was probably killed while writing it",
                    stacklevel=3,
                )
                break
            raise ValueError(f"{source}: line {index + 1} is not valid JSON: {error}") from error
        parsed.append((line, {name: _decode(value) for name, value in record.items()}))
    return parsed


def _metrics_path(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    return path / METRICS_FILE if path.is_dir() else path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics file (`path` is the run's out_dir or the .jsonl file itself).

    Returns one dict per line, `{"step": int, name: float, ...}`, NaN/inf restored.
    """
    path = _metrics_path(path)
    return [record for _, record in _parse_lines(path.read_text(), str(path))]


class MetricsGapError(ValueError):
    """metrics.jsonl lacks lines of steps before the checkpoint a run resumes from."""


def _ranges(steps: list[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    spans, start = [], steps[0]
    for previous, step in zip(steps, steps[1:] + [None], strict=True):
        if step != previous + 1:
            spans.append(f"{start}-{previous}" if start != previous else f"{start}")
            start = step
    return ", ".join(spans)


def check_complete(path: str | os.PathLike, resume_step: int) -> None:
    """Raises MetricsGapError unless the metrics file has a line for every step 1..resume_step."""
    if resume_step == 0:
        return
    path = _metrics_path(path)
    what = "the run resumes from its checkpoint of step"
    advice = "restore the file, or start a new run with another --out (or delete the directory)"
    if not path.is_file():
        raise MetricsGapError(f"{path} is missing but {what} {resume_step}; {advice}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line is reported as part of the gap
        logged = {record["step"] for _, record in _parse_lines(path.read_text(), str(path))}
    missing = [step for step in range(1, resume_step + 1) if step not in logged]
    if missing:
        raise MetricsGapError(
            f"{path} lacks the lines of steps {_ranges(missing)} but {what} {resume_step}; {advice}"
        )


def _truncate_after(path: pathlib.Path, resume_step: int) -> None:
    """Atomically rewrite `path` keeping the lines with step <= resume_step (none when 0)."""
    kept = []
    if resume_step > 0 and path.exists():
        parsed = _parse_lines(path.read_text(), str(path))
        kept = [line for line, record in parsed if record["step"] <= resume_step]
    atomic.write_text(path, "".join(line + "\n" for line in kept))


def _import_tensorboardx():
    """Import tensorboardX without torch when torch is not loaded yet; ImportError naming the
    package when it is missing (it is imported only here, so the rest of rl_jax runs without it).

    tensorboardX imports torch (3-6 s here) only to recognise torch tensors; we log floats.
    Its warning on every NaN or inf value is silenced: they are logged on purpose (e.g.
    `red/temperature` is inf when adaptive RED-Weight leaves a batch unweighted), and a
    non-finite loss or gradient stops the run on its own (`rl_jax.guards`).
    """
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError inside tensorboardX
    try:
        import tensorboardX
    except ModuleNotFoundError as error:
        raise ImportError(
            f"TensorBoard events need tensorboardX ({error}): pip install 'tensorboardX>=2.6' "
            "(a requirement of rl_jax)"
        ) from error
    finally:
        if blocked:
            del sys.modules["torch"]
    return tensorboardX


class MetricsWriter:
    """Writes each step's metrics to metrics.jsonl, TensorBoard and the console.

    Args:
      out_dir: run directory; created if missing.
      total_steps: number of learner steps of the run (for the progress display).
      tensorboard: also write TensorBoard event files under `<out_dir>/tensorboard/`.
      progress: True: a tqdm bar on stdout; False: a plain line every `log_every` steps (and at
        the last step and every held-out evaluation); None: the bar when stdout is a terminal,
        else plain lines.
      log_every: plain-line interval in steps.
      label: what the console names the run by (e.g. "seed 3"), before each line or the bar.
      console: False shows nothing on the console (another writer's bar stands for this run).
      resume_step: the step of the checkpoint the run resumes from; records of later steps are
        dropped, and MetricsGapError is raised (before anything is changed) if a record of an
        earlier step is missing. 0 starts afresh: the file is emptied and older TensorBoard
        events are purged.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        total_steps: int,
        *,
        tensorboard: bool = True,
        progress: bool | None = None,
        log_every: int = 10,
        resume_step: int = 0,
        label: str = "",
        console: bool = True,
    ):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        if not 0 <= resume_step <= total_steps:
            raise ValueError(
                f"resume_step must be in [0, total_steps={total_steps}], got {resume_step}"
            )
        self.out_dir = pathlib.Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        check_complete(self.path, resume_step)
        tensorboardx = None
        if tensorboard:
            try:
                tensorboardx = _import_tensorboardx()
            except ImportError as error:  # e.g. an accelerator image without it: keep training
                print(f"warning: {error}; writing {METRICS_FILE} only", file=sys.stderr)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.log_every = log_every
        self.label = label
        self.console = console
        self._last_step = resume_step
        self._start_time = time.monotonic()
        _truncate_after(self.path, resume_step)
        self._file = open(self.path, "a")
        self._tensorboard = None
        if tensorboardx is not None:
            # TensorBoard drops the events of earlier writers at steps >= purge_step.
            self._tensorboard = tensorboardx.SummaryWriter(
                str(self.out_dir / TENSORBOARD_DIR),
                purge_step=resume_step + 1 if resume_step > 0 else 0,
                flush_secs=10,
            )
        if progress is None:
            progress = sys.stdout.isatty()
        self._bar = None
        if progress and console:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=resume_step,
                file=sys.stdout,
                unit="step",
                dynamic_ncols=True,
                desc=label or None,
            )

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log the metrics of one step (scalars: Python, numpy or JAX); steps must not decrease."""
        if step < self._last_step:
            raise ValueError(f"step {step} is before the last logged step {self._last_step}")
        values = {name: _to_float(name, value) for name, value in metrics.items()}
        self._file.write(format_line(step, values) + "\n")
        self._file.flush()
        self._last_step = step
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, step)
        self._show(step, values)

    def _show(self, step: int, values: Mapping[str, float]) -> None:
        if not self.console:
            return
        if self._bar is not None:
            self._bar.set_postfix(
                {label: f"{values[name]:.4g}" for name, label in KEY_METRICS if name in values},
                refresh=False,
            )
            self._bar.update(step - self._bar.n)
        elif step % self.log_every == 0 or step == self.total_steps or "eval/reward" in values:
            elapsed = time.monotonic() - self._start_time
            numbers = " ".join(
                f"{name}={values[name]:.4g}" for name, _ in KEY_METRICS if name in values
            )
            prefix = f"{self.label}: " if self.label else ""
            line = f"{prefix}step {step}/{self.total_steps} {numbers} ({elapsed:.1f} s)"
            print(line, flush=True)

    def close(self) -> None:
        """Flush and close the file, the TensorBoard writer and the progress bar (idempotent)."""
        if not self._file.closed:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
