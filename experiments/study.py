"""Studies: a grid of algorithms x sync settings over the embedded default (DESIGN.md §4).

`sync_study` and `red_study` are lists of `Algo` curves and `Sync` settings handed to
`run_study`, which adds `--algorithms` / `--syncs` to the common command line, runs every pair
in `<out>/<sync.name>/<algo.name>/`, draws one reward panel per sync setting and writes a summary
with a table per metric (rows: algorithms, columns: sync settings).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Mapping, Sequence

from experiments import common, intervals


@dataclasses.dataclass(frozen=True)
class Sync:
    """A sync setting (DESIGN.md §4); interval None = offline (all data from the initial policy)."""

    label: str
    name: str
    interval: int | None
    offset: int = 0

    def fields(self, steps: int) -> dict:
        interval = steps + 1 if self.interval is None else self.interval
        return {"sync_interval": interval, "sync_offset": self.offset}


@dataclasses.dataclass(frozen=True)
class Algo:
    """A curve: a preset of `rl_jax.algorithms` with optional kernel-field overrides."""

    label: str
    name: str
    preset: str
    overrides: Mapping = dataclasses.field(default_factory=dict)


# `algorithm_overrides` from the command line stay allowed: they apply to every algorithm of the
# study (e.g. `algorithm_overrides.clip=one-side`), under each run's own overrides.
STUDY_VARIED = ("algorithm", "sync_interval", "sync_offset")


def study_specs(algos: Sequence[Algo], syncs: Sequence[Sync], steps: int) -> list[common.RunSpec]:
    """Runs of every (sync, algorithm) pair, in `<out>/<sync.name>/<algo.name>/`."""
    return [
        common.RunSpec(
            a.label,
            f"{s.name}/{a.name}",
            {"algorithm": a.preset, "algorithm_overrides": dict(a.overrides), **s.fields(steps)},
        )
        for s in syncs
        for a in algos
    ]


def select(items: Sequence, names: str | None, what: str) -> list:
    """The items whose `.name` is in the comma list `names` (all when None)."""
    if not names:
        return list(items)
    wanted = names.split(",")
    known = [item.name for item in items]
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; allowed: {known}")
    return [item for item in items if item.name in wanted]


def seed_cell(outcome: common.Outcome, value) -> str:
    """`value(records)` of each seed's metrics as mean +- 95% t-interval over seeds (the value
    alone for one seed; `experiments/intervals.py`)."""
    mean, half = intervals.mean_interval([value(records) for records in outcome.seed_metrics])
    return intervals.describe(float(mean), float(half))


def study_table(outcomes: Sequence[common.Outcome], algos, syncs, value) -> str:
    """Rows: algorithms; columns: sync settings; cells: `seed_cell(outcome, value)`."""
    by_name = {o.spec.name: o for o in outcomes}
    rows = [
        [a.label] + [seed_cell(by_name[f"{s.name}/{a.name}"], value) for s in syncs] for a in algos
    ]
    return common.markdown_table(["algorithm", *(s.label for s in syncs)], rows)


def run_study(module: str, doc: str, argv, algos, syncs, defaults, figure: str, title: str):
    """Command line, runs, reward-grid figure and summary of an algorithms x syncs study."""
    argv = list(argv)
    parser = common.make_parser(doc, steps=400, out=f"runs/{module.rsplit('.', 1)[-1]}")
    parser.add_argument("--algorithms", help=f"comma list of {[a.name for a in algos]}")
    parser.add_argument("--syncs", help=f"comma list of {[s.name for s in syncs]}")
    args = parser.parse_args(argv)
    common.enable_compilation_cache(args.compilation_cache)
    start = time.perf_counter()
    algos = select(algos, args.algorithms, "algorithms")
    syncs = select(syncs, args.syncs, "syncs")
    specs = study_specs(algos, syncs, args.steps)
    configs = common.build_configs(specs, args, defaults, varied=STUDY_VARIED)
    outcomes = common.run_all(specs, configs)
    by_sync = {
        s.label: [o for o in outcomes if o.spec.name.startswith(f"{s.name}/")] for s in syncs
    }
    cfg = configs[0]
    full_title = f"{title}\n{common.settings_line(cfg)}, {cfg.steps} steps"
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.plot_reward_grid(by_sync, full_title, out / figure)
    start_eval = common.eval_stats(outcomes[0].metrics)["eval_start"]
    cells = (
        (f"Held-out reward at the last evaluation (step 0: {start_eval:.3f})",
         lambda m: common.eval_stats(m)["eval_final"]),
        ("Best held-out reward over the run", lambda m: common.eval_stats(m)["eval_best"]),
        ("Training reward, mean of the last 20 steps",
         lambda m: common.tail_mean(m, "reward/mean", 20)),
        ("KL to the initial policy (k2), mean of the last 20 steps",
         lambda m: common.tail_mean(m, "kl/ref", 20)),
    )  # fmt: skip
    tables = "\n\n".join(
        f"{caption}:\n\n{study_table(outcomes, algos, syncs, value)}" for caption, value in cells
    )
    if args.seeds > 1:
        tables = (
            f"{args.seeds} seeds per run (seed {args.seed} on); each cell is the mean +- the 95% "
            f"t-interval over seeds.\n\n{tables}"
        )
    elapsed = time.perf_counter() - start
    text = common.write_summary(
        out, title, common.command_line(module, argv), tables,
        f"Settings: {full_title.replace(chr(10), ': ')}.\n"
        f"Wall time of this invocation: {elapsed:.0f} s.",
    )  # fmt: skip
    print(text)
    print(f"wrote {out / figure} and {out / 'summary.md'}")
    return outcomes
