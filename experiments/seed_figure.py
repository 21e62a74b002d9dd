"""The main job: GRPO vs REC-OneSide-NoIS vs RED-Weight at sync interval 20 (arXiv 2509.24203 §5).

Each algorithm trains for 400 learner steps from the same warm-started policy, with the sampler
synced every 20 steps (DESIGN.md §4): within each block of 20 steps the data comes from one,
increasingly stale policy (staleness 0..19), so the training-batch reward moves in a staircase.
The learner itself is evaluated every 20 steps (and at step 0) on a fixed held-out prompt set.

Run (embedded default, a laptop/CPU; 5 seeds per algorithm):
    python -m experiments.seed_figure
Real setup (GSM8K + a Hugging Face Qwen2.5 directory, a TPU/GPU host):
    python -m experiments.seed_figure --config gsm8k-qwen2.5-1.5b --out runs/seed_figure_gsm8k \
        --seeds 1 eval_prompts=256 [task_options.data_dir=data/gsm8k model=checkpoints/...]
Options: --steps N, --seed S, --seeds N (default 5: seeds S .. S+4 of each algorithm trained as
one compiled program), --out DIR, key=value TrainConfig overrides (as `rl_jax.train`). With
--seeds N > 1 the figure draws the mean over seeds with a 95% band, and the summary gives mean
+- 95% t-interval at steps 100, 200, the last step and over the last 50 steps, and one line per
claim of the paper's figure (GRPO ~ REC-OneSide-NoIS in reward; RED-Weight lowest KL;
REC-OneSide-NoIS lowest entropy and shortest responses; all three improving) saying whether the
runs support it, with the paired interval that decides it (`experiments/intervals.py`).

The recipe (docs/DESIGN.md §7): the warm start mostly rambles into the 25-token cap (held-out
reward ~0.2), lr 2e-5, 8 prompts x 8. GRPO's held-out reward reaches 90% of its final gain near
step 160 and still rises over steps 200-400; responses shorten as capped rambles give way to
worked chains, entropy falls and KL to the initial policy rises gradually.

Time: about 20 minutes on a 2-core x86 host with the warm start cached (6-7 minutes per
algorithm: 360-395 s of training, the rest evaluation and compilation).
Expected (5 seeds; experiments/results/seed_figure/summary.md): held-out reward 0.186 at step 0;
at steps 100 / 200 / 400 GRPO 0.773 / 0.872 / 0.914, REC-OneSide-NoIS 0.781 / 0.873 / 0.911,
RED-Weight 0.803 / 0.869 / 0.908 (+- 0.02-0.03); response length ~21 -> 16.4 tokens, entropy
0.62 -> 0.06 nats/token (RED-Weight 0.07), KL (k2) 0 -> 0.09 for all three. The intervals
support GRPO ~ REC-OneSide-NoIS (training-reward difference over the last 50 steps 0.001 +-
0.003) and all three improving in both halves; they do not support RED-Weight having the lowest
KL (-0.000 +- 0.001 against GRPO), REC-OneSide-NoIS the lowest entropy (equal to GRPO's, both
below RED-Weight's) or the shortest responses. Reruns on one host are bit-identical; another
CPU host rounds differently (its warm start too), so its digits differ; BENCHMARKS.md keeps
every host's run and which verdicts moved.
Output: `<out>/<algorithm>/seed_<s>/` (metrics.jsonl, tensorboard/, checkpoints/; `<out>/
<algorithm>/` itself for one seed), `<out>/seed_figure.png` (2x2: training reward with held-out
eval, KL, entropy, response length; one line per algorithm, raw per-step means faint, moving
average solid with its 95% band over seeds) and `<out>/summary.md` (also printed).
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np

from experiments import common, intervals
from rl_jax import host_memory

ALGORITHMS = (
    ("GRPO", "grpo"),
    ("REC-OneSide-NoIS", "rec-oneside-nois"),
    ("RED-Weight", "red-weight"),
)
DEFAULTS = {"sync_interval": 20, "sync_offset": 0, "eval_every": 20, "checkpoint_every": 100}
FIGURE = "seed_figure.png"


def specs() -> list[common.RunSpec]:
    return [common.RunSpec(label, name, {"algorithm": name}) for label, name in ALGORITHMS]


def summarize(outcomes) -> str:
    """Per algorithm: held-out reward (start, final, mean of the last 5 evaluations, best), the
    last-20-step means of training reward, KL, entropy and response length, and train seconds."""
    header = (
        "algorithm", "held-out @0", "held-out final", "held-out (last 5 evals)", "held-out best",
        "train reward (last 20)",
        "KL (last 20)", "entropy (last 20)", "length (last 20)", "train s",
    )  # fmt: skip
    rows = []
    for o in outcomes:
        evals = common.eval_stats(o.metrics)
        rows.append((
            o.spec.label, evals["eval_start"], evals["eval_final"], evals["eval_tail"],
            evals["eval_best"],
            *(common.tail_mean(o.metrics, key, 20) for key, _ in common.DYNAMICS_PANELS),
            f"{common.train_seconds(o.metrics):.0f}",
        ))  # fmt: skip
    return common.markdown_table(header, rows)


# (metric, label) of the multi-seed table: held-out reward at the evaluation steps, the rest
# per step; each at steps 100, 200, the last, and over the last 50 steps.
SEED_TABLE = (
    ("eval/reward", "held-out reward"),
    ("reward/mean", "training reward"),
    ("kl/ref", "KL (k2)"),
    ("entropy", "entropy"),
    ("response_length/mean", "length"),
)


def summarize_seeds(outcomes) -> str:
    """Mean +- 95% interval over seeds of each SEED_TABLE metric at steps 100, 200, the last step
    and over the last 50 steps, one row per (algorithm, metric)."""
    last = outcomes[0].config.steps
    points = [s for s in (100, 200) if s < last] + [last]
    header = ("algorithm", "metric", *(f"step {s}" for s in points), f"last {min(50, last)} steps")
    rows = []
    for o in outcomes:
        for key, label in SEED_TABLE:
            cells = [intervals.mean_interval(intervals.per_seed(o.seed_metrics, key, step=s))
                     for s in points]  # fmt: skip
            tail = 3 if key == "eval/reward" else 50  # held-out: every 20 steps
            cells.append(
                intervals.mean_interval(intervals.per_seed(o.seed_metrics, key, tail=tail))
            )
            rows.append((o.spec.label, label, *(intervals.describe(m, h) for m, h in cells)))
    return common.markdown_table(header, rows)


def _paired(outcomes, a: str, b: str, key: str, tail: int = 50):
    """Mean and 95% half-width over seeds of (a - b) in `key` over the last `tail` steps."""
    by_label = {o.spec.label: o for o in outcomes}
    values = [intervals.per_seed(by_label[x].seed_metrics, key, tail=tail) for x in (a, b)]
    return intervals.mean_interval(values[0] - values[1])


def claims(outcomes) -> str:
    """For each qualitative claim of the paper's figure, whether the runs support it, with the
    interval that decides it (paired over seeds, last 50 steps unless said otherwise). A claim
    is undecided when an interval is undefined: one seed, or no held-out evaluation at a step
    it needs (a run shorter than 2 x eval_every)."""
    lines = []
    seeds = len(outcomes[0].seed_metrics)
    undecided = "undecided (one seed)" if seeds < 2 else "undecided (an interval is undefined)"

    def verdict(name, supported, evidence):
        word = undecided if supported is None else (
            "supported" if supported else "not supported")  # fmt: skip
        lines.append(f"- {name}: **{word}**; {evidence}")

    mean, half = _paired(outcomes, "GRPO", "REC-OneSide-NoIS", "reward/mean")
    verdict(
        "GRPO ~ REC-OneSide-NoIS in training reward",
        None if np.isnan(half) else abs(mean) <= half,
        f"GRPO - REC-OneSide-NoIS = {intervals.describe(mean, half)} (supported if the interval "
        "holds 0)",
    )
    for key, label, best in (
        ("kl/ref", "RED-Weight has the lowest KL", "RED-Weight"),
        ("entropy", "REC-OneSide-NoIS has the lowest entropy", "REC-OneSide-NoIS"),
        ("response_length/mean", "REC-OneSide-NoIS has the shortest responses", "REC-OneSide-NoIS"),
    ):
        others = [lab for lab, _ in ALGORITHMS if lab != best]
        diffs = [_paired(outcomes, best, other, key) for other in others]
        decided = not any(np.isnan(h) for _, h in diffs)
        verdict(
            label,
            all(m + h < 0 for m, h in diffs) if decided else None,
            "; ".join(
                f"{best} - {o} = {intervals.describe(m, h)}"
                for o, (m, h) in zip(others, diffs, strict=True)
            )  # fmt: skip
            + " (supported if every interval lies below 0)",
        )
    last = outcomes[0].config.steps
    gains = []
    for o in outcomes:
        halves = [s for s in (last // 2, last) if s > 0]
        start = intervals.per_seed(o.seed_metrics, "eval/reward", step=0)
        values = [intervals.per_seed(o.seed_metrics, "eval/reward", step=s) for s in halves]
        gains.append((o.spec.label, [intervals.mean_interval(v - w) for v, w in
                                     zip(values, [start, *values[:-1]], strict=True)]))  # fmt: skip
    decided = not any(np.isnan(h) for _, g in gains for _, h in g)
    verdict(
        "all three improve steadily (held-out reward rises in each half of the run)",
        all(m - h > 0 for _, g in gains for m, h in g) if decided else None,
        "; ".join(
            f"{lab}: " + ", ".join(intervals.describe(m, h) for m, h in g) for lab, g in gains
        )
        + f" (gains over steps 0-{last // 2} and {last // 2}-{last}; supported if every interval "
        "lies above 0)",
    )
    return "\n".join(lines)


def run_title(cfg) -> str:
    """The figure's title: the recipe, the sync setting, the length and the evaluation."""
    return (
        f"{common.settings_line(cfg)}\nsync_interval {cfg.sync.interval}, offset "
        f"{cfg.sync.offset}, {cfg.steps} steps, held-out eval every {cfg.eval_every} steps "
        f"on {cfg.eval_prompts} prompts"
    )


def parser():
    """The command line: 400 steps and 5 seeds per algorithm unless told otherwise."""
    return common.make_parser(__doc__, steps=400, out="runs/seed_figure", seeds=5)


def main(argv=None) -> list[common.Outcome]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    common.enable_compilation_cache(args.compilation_cache)
    start = time.perf_counter()
    run_specs = specs()
    configs = common.build_configs(run_specs, args, DEFAULTS, varied=("algorithm",))
    outcomes = common.run_all(run_specs, configs)
    cfg = configs[0]
    title = run_title(cfg)
    out = pathlib.Path(args.out)
    common.plot_dynamics(outcomes, title, out / FIGURE)
    table = summarize(outcomes)
    if args.seeds > 1:
        table = (
            f"{args.seeds} seeds per algorithm (seed {args.seed} on), mean +- 95% t-interval:\n\n"
            f"{summarize_seeds(outcomes)}\n\nThe figure's claims:\n\n{claims(outcomes)}\n\n"
            f"Per-step means over seeds:\n\n{table}"
        )
    elapsed = time.perf_counter() - start
    text = common.write_summary(
        out, "Seed figure: GRPO vs REC-OneSide-NoIS vs RED-Weight",
        common.command_line("experiments.seed_figure", argv), table,
        f"Settings: {title.replace(chr(10), '; ')}.\nWall time of this invocation: {elapsed:.0f} s.",
    )  # fmt: skip
    print(text)
    print(f"wrote {out / FIGURE} and {out / 'summary.md'}")
    return outcomes


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    main()
