"""Adaptive RED-Weight vs GRPO, REC-OneSide-NoIS and RED-Weight at sync interval 20 (issue 34).

Adaptive RED-Weight (preset `red-weight-adaptive`; Chen et al., 2026, "Connect the Dots";
Trinity-RFT `cod_advantage.py`) weights each response by exp(A / T) like RED-Weight, but chooses
T each step by bisection so that the batch's token-weighted advantage sum is not negative, and
leaves the batch unweighted (T = inf) when it already is not (`rl_jax.advantages.
red_weight_temperature`). The question it answers: the seed figure (`experiments/seed_figure.py`)
found fixed-temperature RED-Weight level with GRPO in KL to the initial policy, against the
paper's claim that RED-Weight keeps KL lowest off-policy; does the adaptive rule keep KL lowest
without losing held-out reward?

Each algorithm trains for 400 learner steps from the same warm-started policy with the sampler
synced every 20 steps, 5 seeds as one compiled program, held-out evaluation every 20 steps: the
seed figure's setting with a fourth curve. The summary gives mean +- 95% t-interval over seeds
of held-out reward, training reward, KL (k2), entropy and length; the paired intervals of
adaptive RED-Weight minus each other algorithm over the last 50 steps (held-out: the last 3
evaluations) with the two verdicts; and adaptive RED-Weight's temperature per 100-step block
(the fraction of steps reweighted, the median finite T, the fraction at the range's top).

Run (embedded default, CPU):
    python -m experiments.adaptive_red [--steps 400] [--seeds 5] [--out runs/adaptive_red]
Options: as `experiments.seed_figure` (--steps, --seed, --seeds, --out, --config, key=value).
Output: `<out>/<algorithm>/seed_<s>/`, `<out>/adaptive_red.png` (the seed figure's 2x2 panels),
`<out>/temperature.png` (T per step of every seed; the fraction of seeds reweighted) and
`<out>/summary.md` (also printed). Committed results: experiments/results/adaptive_red/.

Time (committed results, 2026-12-04, a shared 2-core Intel Xeon VM at load 8-15 from other
jobs): 5370 s for 4 algorithms x 5 seeds x 400 steps, in three invocations that resume each
other's checkpoints: `--steps 400` stopped by hand after the adaptive runs' step 200 (976 s),
`--steps 200` for the other three (2243 s; `git show a4c8d3c:experiments/results/adaptive_red/summary_200_steps.md`), then
`python -m experiments.adaptive_red --steps 400` extended all four (2151 s). About 9 min per
algorithm per 200 steps on that machine when its load is lower.
Result (experiments/results/adaptive_red/summary.md; held-out 0.173 at step 0): adaptive
RED-Weight does not keep KL lowest: over the last 50 steps all four end at KL 0.092-0.093, paired
differences to GRPO, REC-OneSide-NoIS, RED-Weight -0.001 +- 0.003, 0.001 +- 0.002, 0.001 +- 0.002
(at step 200 its KL was the highest, 0.003 +- 0.002 above GRPO's). Held-out reward over the last
3 evaluations: 0.891 against 0.900 (GRPO), 0.901 (REC-OneSide-NoIS), 0.883 (RED-Weight); paired
-0.009 +- 0.009 (every seed below GRPO: "without losing reward" not supported, by a margin of
6e-5), -0.010 +- 0.019, +0.008 +- 0.008. Entropy lies between (0.068 against 0.063 / 0.063 /
0.076, every paired interval excludes 0). It learns as fast as RED-Weight early (held-out 0.787
at step 100 against GRPO's 0.759). T is finite on 92%, 71%, 66%, 60% of the steps of each 100-step
block, median 3.5, 6.4, 8.7, 7.1 (weights exp(A / T) within e^(+-0.3) for |A| <= 1, milder than
RED-Weight's T = 1); 1-4% of steps end at the range's top (99.95).
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np

from experiments import common, intervals, seed_figure
from rl_jax import host_memory

ADAPTIVE = "RED-Weight-Adaptive"
# Adaptive first: it is the point of the study and trains first.
ALGORITHMS = ((ADAPTIVE, "red-weight-adaptive"), *seed_figure.ALGORITHMS)
DEFAULTS = seed_figure.DEFAULTS
FIGURE, T_FIGURE = "adaptive_red.png", "temperature.png"
BLOCK = 100  # steps per row of the temperature table
# (metric, label, tail): paired differences over the last `tail` records of each seed.
PAIRED = (
    ("kl/ref", "KL (k2)", 50),
    ("eval/reward", "held-out reward", 3),
    ("entropy", "entropy", 50),
    ("response_length/mean", "length", 50),
)


def specs() -> list[common.RunSpec]:
    return [common.RunSpec(label, name, {"algorithm": name}) for label, name in ALGORITHMS]


def paired(outcomes, key: str, tail: int) -> list[tuple[str, float, float]]:
    """(other label, mean, 95% half-width) over seeds of adaptive minus each other algorithm in
    the mean of `key` over the last `tail` records."""
    by_label = {o.spec.label: o for o in outcomes}
    ours = intervals.per_seed(by_label[ADAPTIVE].seed_metrics, key, tail=tail)
    rows = []
    for label, _ in ALGORITHMS[1:]:
        theirs = intervals.per_seed(by_label[label].seed_metrics, key, tail=tail)
        mean, half = intervals.mean_interval(ours - theirs)
        rows.append((label, float(mean), float(half)))
    return rows


def paired_table(outcomes) -> str:
    header = ("metric", *(f"{ADAPTIVE} - {label}" for label, _ in ALGORITHMS[1:]))
    rows = [
        (f"{label} (last {tail} {'evals' if key == 'eval/reward' else 'steps'})",
         *(intervals.describe(m, h) for _, m, h in paired(outcomes, key, tail)))
        for key, label, tail in PAIRED
    ]  # fmt: skip
    return common.markdown_table(header, rows)


def claims(outcomes) -> str:
    """Lowest KL: every paired KL interval lies below 0. Without losing reward: no paired
    held-out interval lies below 0 (an interval that holds 0 is no loss)."""
    kl = paired(outcomes, *PAIRED[0][::2])
    held = paired(outcomes, *PAIRED[1][::2])
    if any(np.isnan(h) for _, _, h in kl + held):
        return "- undecided (one seed)"

    def word(ok):
        return "supported" if ok else "not supported"

    describe = lambda rows: "; ".join(f"vs {o} {intervals.describe(m, h)}" for o, m, h in rows)
    return (
        f"- {ADAPTIVE} has the lowest KL to the initial policy: "
        f"**{word(all(m + h < 0 for _, m, h in kl))}** (paired KL differences {describe(kl)}; "
        "supported if every interval lies below 0)\n"
        f"- ... without losing held-out reward: "
        f"**{word(all(m + h >= 0 for _, m, h in held))}** (paired held-out differences "
        f"{describe(held)}; supported if no interval lies below 0)"
    )


def temperature_table(outcome) -> str:
    """Per block of BLOCK steps, each as mean +- 95% interval over seeds: the fraction of steps
    whose T is finite (reweighted), the median of the finite T, and the fraction of steps at
    the top of the bisection range (T > 99: S(100) >= 0, the root of S lies above 100)."""
    last = outcome.config.steps
    rows = []
    for lo in range(0, last, BLOCK):
        hi = min(lo + BLOCK, last)
        fracs, medians, tops = [], [], []
        for records in outcome.seed_metrics:
            temps = np.array([m["red/temperature"] for m in records
                              if "red/temperature" in m and lo < m["step"] <= hi])  # fmt: skip
            finite = temps[np.isfinite(temps)]
            fracs.append(finite.size / max(temps.size, 1))
            medians.append(np.median(finite) if finite.size else np.nan)
            tops.append(np.sum(finite > 99) / max(temps.size, 1))
        rows.append((
            f"{lo + 1}-{hi}",
            *(intervals.describe(*intervals.mean_interval(v)) for v in (fracs, medians, tops)),
        ))  # fmt: skip
    header = ("steps", "fraction of steps reweighted (T finite)", "median finite T",
              "fraction of steps at T = 99.95")  # fmt: skip
    return common.markdown_table(header, rows)


def plot_temperature(outcome, title: str, path: pathlib.Path) -> None:
    """Top: T of every step and seed (finite values; inf = not reweighted is not drawn).
    Bottom: the fraction of seeds reweighted per step, with its 20-step moving average."""
    plt = common._pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    finite_by_step = {}
    for index, records in enumerate(outcome.seed_metrics):
        steps, temps = common.series(records, "red/temperature")
        finite = np.isfinite(temps)
        top.plot(steps[finite], temps[finite], ".", color=f"C{index}", markersize=3,
                 label=f"seed {outcome.config.seed + index}")  # fmt: skip
        for step, ok in zip(steps, finite, strict=True):
            finite_by_step.setdefault(int(step), []).append(ok)
    top.set_yscale("log")
    top.set_ylabel("T (finite steps only)")
    top.axhline(0.8, color="gray", linewidth=0.8, linestyle=":")
    top.legend(fontsize=8, ncol=5)
    top.grid(alpha=0.3)
    steps = np.array(sorted(finite_by_step))
    frac = np.array([np.mean(finite_by_step[s]) for s in steps])
    bottom.plot(steps, frac, color="C0", alpha=0.25, linewidth=0.8)
    bottom.plot(steps, common.moving_average(frac, 20), color="C0")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_ylabel("fraction of seeds reweighted")
    bottom.set_xlabel("learner step")
    bottom.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser():
    return common.make_parser(__doc__, steps=400, out="runs/adaptive_red", seeds=5)


def main(argv=None) -> list[common.Outcome]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    common.enable_compilation_cache(args.compilation_cache)
    start = time.perf_counter()
    run_specs = specs()
    configs = common.build_configs(run_specs, args, DEFAULTS, varied=("algorithm",))
    outcomes = common.run_all(run_specs, configs)
    cfg = configs[0]
    title = seed_figure.run_title(cfg)
    out = pathlib.Path(args.out)
    common.plot_dynamics(outcomes, title, out / FIGURE)
    plot_temperature(outcomes[0], f"{ADAPTIVE}: temperature per step\n{title}", out / T_FIGURE)
    table = seed_figure.summarize(outcomes)
    if args.seeds > 1:
        table = (
            f"{args.seeds} seeds per algorithm (seed {args.seed} on), mean +- 95% t-interval:\n\n"
            f"{seed_figure.summarize_seeds(outcomes)}\n\n"
            f"Paired differences over seeds:\n\n{paired_table(outcomes)}\n\n"
            f"The question:\n\n{claims(outcomes)}\n\n"
            f"Per-step means over seeds:\n\n{table}"
        )
    table += f"\n\n{ADAPTIVE}'s temperature:\n\n{temperature_table(outcomes[0])}"
    elapsed = time.perf_counter() - start
    text = common.write_summary(
        out, "Adaptive RED-Weight vs GRPO, REC-OneSide-NoIS and RED-Weight",
        common.command_line("experiments.adaptive_red", argv), table,
        f"Settings: {title.replace(chr(10), '; ')}.\nWall time of this invocation: {elapsed:.0f} s.",
    )  # fmt: skip
    print(text)
    print(f"wrote {out / FIGURE}, {out / T_FIGURE} and {out / 'summary.md'}")
    return outcomes


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    main()
