"""Shared machinery of the RL experiments: command line, runs, metric series, figures, tables.

Every experiment module is a list of runs (`RunSpec`: a label and the `TrainConfig` fields that
make it different) over one base config. The base is a preset or JSON file (`--config`, default
the embedded task), then the experiment's defaults, then the user's `key=value` overrides (the
syntax of `python -m rl_jax.train`, `rl_jax.config.parse_overrides`), then the run's own fields,
`--steps` and `--seed`. Run i writes its metrics (JSONL + TensorBoard) and checkpoints to
`<out>/<spec.name>/`; a run whose directory already holds a checkpoint resumes from it, so a
rerun of a finished experiment only redraws its figures.

Runs in one process share compiled programs: the sampler's jit is keyed on its static shapes
and the learner's on its static settings, so runs with equal shapes (e.g. one algorithm at
several sync intervals) compile once. A persistent compilation cache (`--compilation-cache`)
extends that across processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import time
from collections.abc import Mapping, Sequence

import numpy as np

from experiments import intervals
from rl_jax import atomic, cache
from rl_jax import config as config_lib

# (metric, axis label) of the 2x2 training-dynamics figure (DESIGN.md §5 names).
DYNAMICS_PANELS = (
    ("reward/mean", "training reward"),
    ("kl/ref", "KL to initial policy (k2)"),
    ("entropy", "entropy (nats / token)"),
    ("response_length/mean", "response length (tokens)"),
)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of an experiment: `label` for figures/tables, `name` for its directory, and the
    `TrainConfig` fields it sets (they win over the base config and the user's overrides)."""

    label: str
    name: str
    fields: Mapping


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A finished run of `--seeds` seeds: its config, each seed's metrics.jsonl records (step 0
    holds the first eval) and the seconds this process spent on it (near 0 when it was already
    complete). `metrics` is the per-step mean over seeds (the records themselves for one seed)."""

    spec: RunSpec
    config: config_lib.TrainConfig
    seed_metrics: list[list[dict]]
    wall_seconds: float

    @property
    def metrics(self) -> list[dict]:
        return mean_over_seeds(self.seed_metrics)


def mean_over_seeds(seed_metrics: Sequence[Sequence[Mapping]]) -> list[dict]:
    """Records whose every value is the mean over seeds of that step's values."""
    if len(seed_metrics) == 1:
        return list(seed_metrics[0])
    by_step: dict[int, list[Mapping]] = {}
    for records in seed_metrics:
        for record in records:
            by_step.setdefault(record["step"], []).append(record)
    out = []
    for step, records in sorted(by_step.items()):
        keys = set.intersection(*(set(r) for r in records)) - {"step"}
        out.append({"step": step, **{k: float(np.mean([r[k] for r in records])) for k in keys}})
    return out


def band(outcome: Outcome, key: str, window: int = 1):
    """(steps, mean, half-width of the 95% t-interval over seeds) of each seed's `window`-step
    trailing moving average of `key`; a width of 0 for one seed."""
    rows = [series(records, key) for records in outcome.seed_metrics]
    steps = rows[0][0]
    values = np.stack([moving_average(v, window) for _, v in rows if len(v) == len(steps)])
    mean, half = intervals.mean_interval(values)
    return steps, mean, np.nan_to_num(half)


def make_parser(doc: str, steps: int, out: str, seeds: int = 1) -> argparse.ArgumentParser:
    """The shared command line: --steps --seed --seeds --out --config --compilation-cache
    key=value..."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n")[0],
        epilog=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="TrainConfig key=value (JSON values)")
    parser.add_argument("--steps", type=int, default=steps, help="learner steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds",
        type=int,
        default=seeds,
        help="seeds per run, trained as one program (num_seeds)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(out))
    parser.add_argument(
        "--config", default="embedded", help=f"a preset {sorted(config_lib.PRESETS)} or JSON file"
    )
    parser.add_argument(
        "--compilation-cache",
        default=str(cache.path("jax") or ""),
        help="persistent JAX compilation cache directory ('' disables; default: "
        "$RL_JAX_COMPILATION_CACHE, else $RL_JAX_CACHE/jax)",
    )
    return parser


def enable_compilation_cache(path: str) -> None:
    """Persist compiled programs under `path` (unless empty or a cache is already configured)."""
    cache.enable_compilation_cache(path)


def build_configs(
    specs: Sequence[RunSpec],
    args: argparse.Namespace,
    defaults: Mapping,
    varied: Sequence[str],
) -> list[config_lib.TrainConfig]:
    """Every run's validated config. `varied`: fields the experiment sets per run; overriding
    them from the command line would silently change the experiment, so it is an error."""
    overrides = config_lib.parse_overrides(args.overrides)
    per_run = {
        config_lib.resolve(name) for name in ("steps", "seed", "num_seeds", "out_dir", *varied)
    }
    clash = sorted(per_run & set(config_lib.merge(overrides)))
    if clash:
        raise ValueError(
            f"override(s) {clash} are set by this experiment per run; use --steps/--seed/--seeds/--out "
            f"or edit the experiment's runs"
        )
    configs = []
    for spec in specs:
        run = {
            "steps": args.steps,
            "seed": args.seed,
            "num_seeds": args.seeds,
            "out_dir": str(args.out / spec.name),
        }
        layers = config_lib.merge(defaults, overrides, spec.fields, run)
        configs.append(config_lib.build(args.config, layers))
    return configs


def run_all(specs: Sequence[RunSpec], configs: Sequence[config_lib.TrainConfig]) -> list[Outcome]:
    """Trains (or resumes) each run in turn and reads back its metrics.jsonl; in a process where
    JAX has not started, first one CPU device per core (`rl_jax.parallel.use_cpu_cores`)."""
    from rl_jax import parallel, run_dir
    from rl_jax.metrics import read_metrics
    from rl_jax.train import train

    parallel.use_cpu_cores(math.gcd(*(c.rows // c.memory.micro_batches for c in configs)))

    for config in configs:  # fail before the first run rather than after hours of training
        for single in config.runs():
            run_dir.check_resume(single)
    outcomes, begin = [], time.perf_counter()
    for index, (spec, config) in enumerate(zip(specs, configs, strict=True)):
        print(f"== [{index + 1}/{len(specs)}] {spec.label} -> {config.out_dir}{_eta(begin, index, len(specs))}",
              flush=True)  # fmt: skip
        start = time.perf_counter()
        train(config)
        wall = time.perf_counter() - start
        seed_metrics = [read_metrics(single.out_dir) for single in config.runs()]
        outcomes.append(Outcome(spec, config, seed_metrics, wall))
    return outcomes


def _eta(begin: float, done: int, total: int) -> str:
    """'; 312 s so far, about 624 s to go' after `done` of `total` runs (nothing before the first:
    runs of one experiment take about equally long, a resumed one less)."""
    if not done:
        return ""
    elapsed = time.perf_counter() - begin
    return f"; {elapsed:.0f} s so far, about {elapsed / done * (total - done):.0f} s to go"


# --- metrics -----------------------------------------------------------------------------------


def series(metrics: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that hold `key`, in step order."""
    rows = [(m["step"], m[key]) for m in metrics if key in m]
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0)
    steps, values = zip(*rows, strict=True)
    return np.asarray(steps), np.asarray(values, dtype=np.float64)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start); same length as input."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    upper = np.arange(1, values.size + 1)
    lower = np.maximum(upper - window, 0)
    return (cumsum[upper] - cumsum[lower]) / (upper - lower)


def tail_mean(metrics: Sequence[Mapping], key: str, window: int) -> float:
    """Mean of `key` over the last `window` steps that log it (NaN if none)."""
    _, values = series(metrics, key)
    return float(values[-window:].mean()) if values.size else float("nan")


def eval_stats(metrics: Sequence[Mapping], tail: int = 5) -> dict:
    """Held-out reward at step 0, at the last evaluation, the mean of the last `tail`
    evaluations (less noisy than one) and the maximum; NaN without evaluations."""
    _, values = series(metrics, "eval/reward")
    if not values.size:
        return dict.fromkeys(("eval_start", "eval_final", "eval_tail", "eval_best"), float("nan"))
    return {
        "eval_start": values[0],
        "eval_final": values[-1],
        "eval_tail": values[-tail:].mean(),
        "eval_best": values.max(),
    }


def train_seconds(metrics: Sequence[Mapping]) -> float:
    """Sampling + learning time logged by the run (survives resumes; excludes eval/compiles)."""
    return float(sum(m.get("time/sample", 0.0) + m.get("time/learn", 0.0) for m in metrics))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table; floats with 3 decimals (NaN as '-')."""

    def cell(value):
        if isinstance(value, float | np.floating):
            return "-" if np.isnan(value) else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def settings_line(config: config_lib.TrainConfig) -> str:
    """The settings a figure title names: task, model, batch, learning rate, sampling."""
    model = config.model if len(config.model) < 32 else pathlib.Path(config.model).name
    return (
        f"{config.task.name}, {model}, {config.prompts_per_step} prompts x {config.group_size}, "
        f"lr {config.optimizer.learning_rate:g}, T {config.sampling.temperature:g}, "
        f"{seeds_label(config)}"
    )


def seeds_label(config: config_lib.TrainConfig) -> str:
    """'seed 3', or 'seeds 0-4 (mean, 95% band)' for a run of several seeds."""
    if config.num_seeds == 1:
        return f"seed {config.seed}"
    return f"seeds {config.seed}-{config.seed + config.num_seeds - 1} (mean, 95% band)"


def command_line(module: str, argv: Sequence[str]) -> str:
    return " ".join(["python -m", module, *argv])


def write_summary(out: pathlib.Path, title: str, command: str, table: str, notes: str = "") -> str:
    """Writes `<out>/summary.md` (title, exact command, table, notes) and returns its text."""
    text = f"# {title}\n\nCommand: `{command}`\n\n{table}\n"
    if notes:
        text += f"\n{notes.strip()}\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "summary.md", text)
    return text


# --- figures -----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smoothing_window(num_steps: int) -> int:
    return max(1, min(20, num_steps // 10))


# Each run's mean line gets its own style as well as its own colour, so that curves lying on top
# of each other (the seed figure's three algorithms often do) stay told apart.
LINE_STYLES = ("-", "--", "-.", ":")


def plot_dynamics(outcomes: Sequence[Outcome], title: str, path: pathlib.Path) -> None:
    """2x2 panels of DYNAMICS_PANELS vs learner step, one colour and line style per run.

    Drawn in layers so that no run hides another: first every run's raw per-step values (faint)
    and its 95% band over seeds of the moving average (shaded), then every run's moving
    average on top; held-out `eval/reward` as markers on the reward panel. One legend for the
    whole figure names the runs and explains each element."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    window = _smoothing_window(max(len(o.metrics) for o in outcomes))
    styles = [(f"C{i}", LINE_STYLES[i % len(LINE_STYLES)]) for i in range(len(outcomes))]
    banded = False
    for outcome, (color, _) in zip(outcomes, styles, strict=True):
        for ax, (key, _) in zip(axes.flat, DYNAMICS_PANELS, strict=True):
            steps, values = series(outcome.metrics, key)
            ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
            steps, mean, half = band(outcome, key, window)
            if half.any():  # 95% interval over seeds of the moving average
                ax.fill_between(steps, mean - half, mean + half, color=color, alpha=0.12)
                banded = True
    for outcome, (color, style) in zip(outcomes, styles, strict=True):
        for ax, (key, ylabel) in zip(axes.flat, DYNAMICS_PANELS, strict=True):
            steps, mean, _ = band(outcome, key, window)
            ax.plot(steps, mean, color=color, linestyle=style, linewidth=1.6)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("learner step")
            ax.grid(alpha=0.3)
        steps, values = series(outcome.metrics, "eval/reward")
        axes[0, 0].plot(steps, values, color=color, linestyle="none", marker="o", markersize=3.5,
                        markeredgecolor="white", markeredgewidth=0.5)  # fmt: skip
    axes[0, 0].set_ylim(-0.02, 1.02)
    handles = [
        Line2D([], [], color=color, linestyle=style, linewidth=1.6, label=outcome.spec.label)
        for outcome, (color, style) in zip(outcomes, styles, strict=True)
    ]
    handles.append(Line2D([], [], color="0.3", label=f"line: {window}-step moving average"))
    handles.append(Line2D([], [], color="0.3", alpha=0.3, label="faint: per-step value"))
    if banded:
        handles.append(Patch(color="0.3", alpha=0.2, label="band: 95% interval over seeds"))
    handles.append(Line2D([], [], color="0.3", linestyle="none", marker="o", markersize=3.5,
                          label="dots: held-out reward"))  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic.replacing(path) as tmp:  # whole, even with another process on --out
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def plot_reward_grid(
    outcomes: Mapping[str, Sequence[Outcome]], title: str, path: pathlib.Path
) -> None:
    """One column per group (e.g. a sync setting), one line per run: training reward (moving
    average, raw faint) on the top row, held-out eval reward on the bottom row; with several
    seeds the lines are means over seeds with a shaded 95% interval."""
    plt = _pyplot()
    ncols = len(outcomes)
    fig, axes = plt.subplots(2, ncols, figsize=(4.2 * ncols, 6.5), squeeze=False, sharey=True)
    longest = max(len(o.metrics) for group in outcomes.values() for o in group)
    window = _smoothing_window(longest)
    for col, (group, runs) in enumerate(outcomes.items()):
        top, bottom = axes[0, col], axes[1, col]
        for index, outcome in enumerate(runs):
            color = f"C{index}"
            steps, values = series(outcome.metrics, "reward/mean")
            top.plot(steps, values, color=color, alpha=0.15, linewidth=0.7)
            for ax, key, smooth in ((top, "reward/mean", window), (bottom, "eval/reward", 1)):
                steps, mean, half = band(outcome, key, smooth)
                marker = {"marker": "o", "markersize": 2.5} if key == "eval/reward" else {}
                ax.plot(steps, mean, color=color, label=outcome.spec.label, **marker)
                if half.any():  # 95% interval over seeds
                    ax.fill_between(steps, mean - half, mean + half, color=color, alpha=0.15)
        top.set_title(group, fontsize=10)
        bottom.set_xlabel("learner step")
        for ax in (top, bottom):
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(f"training reward ({window}-step avg)")
    axes[1, 0].set_ylabel("held-out reward")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    with atomic.replacing(path) as tmp:  # whole, even with another process on --out
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
