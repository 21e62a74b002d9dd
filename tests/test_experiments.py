"""The RL experiment modules end to end on tiny runs, and the helpers their figures rest on.

The runs use a randomly initialised tiny policy (`model=tiny`, no warm start needed) with 2
prompts x 4 responses, 2 steps and 8 held-out prompts; the studies run one algorithm each. The
seed figure and the RED study share their RED-Weight learner program, the sampler programs are
shared by all runs (equal shapes).
"""

import json
import pathlib

import numpy as np
import pytest

from experiments import adaptive_red, common, red_study, seed_figure, study, sync_study
from rl_jax import config as config_lib
from rl_jax.metrics import read_metrics

TINY = ["model=tiny", "prompts_per_step=2", "group_size=4", "eval_prompts=8", "eval_every=1"]


def table_row(summary: str, label: str) -> list[str]:
    """The cells of the markdown row starting with `label`."""
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in\n{summary}")


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seed_figure")
    argv = ["--steps", "2", "--seed", "3", "--seeds", "1", "--out", str(out), *TINY]
    return out, argv, seed_figure.main(argv)


def test_seed_figure_writes_figure_metrics_and_summary(seed_run):
    out, _, outcomes = seed_run
    assert [o.spec.label for o in outcomes] == ["GRPO", "REC-OneSide-NoIS", "RED-Weight"]
    assert (out / "seed_figure.png").stat().st_size > 20_000
    summary = (out / "summary.md").read_text()
    assert "--seed 3" in summary and "sync_interval 20" in summary
    for name, label in (("grpo", "GRPO"), ("red-weight", "RED-Weight")):
        run_dir = out / name
        assert (run_dir / "tensorboard").is_dir()
        config = json.loads((run_dir / "config.json").read_text())
        assert (config["algorithm"]["name"], config["sync"]["interval"], config["seed"]) == (
            name,
            20,
            3,
        )
        assert config["prompts_per_step"] == 2 and config["steps"] == 2
        metrics = read_metrics(run_dir)
        assert [m["step"] for m in metrics] == [0, 1, 2]  # step 0: eval of the initial policy
        cells = table_row(summary, label)
        evals = [m["eval/reward"] for m in metrics]
        assert cells[0] == f"{evals[0]:.3f}" and cells[1] == f"{evals[-1]:.3f}"
        assert cells[2] == f"{np.mean(evals):.3f}"  # 3 evaluations: all within the last 5
        assert cells[3] == f"{max(evals):.3f}"
        assert cells[4] == f"{np.mean([m['reward/mean'] for m in metrics[1:]]):.3f}"
        assert cells[6] == f"{np.mean([m['entropy'] for m in metrics[1:]]):.3f}"
        assert cells[7] == f"{np.mean([m['response_length/mean'] for m in metrics[1:]]):.3f}"


def test_rerun_resumes_finished_runs_and_refuses_other_settings(seed_run):
    out, argv, outcomes = seed_run
    before = (out / "grpo" / "metrics.jsonl").read_text()
    again = seed_figure.main(argv)
    assert (out / "grpo" / "metrics.jsonl").read_text() == before
    assert [o.metrics for o in again] == [o.metrics for o in outcomes]
    with pytest.raises(ValueError, match="holds a different run .*learning_rate=.* -> 0.001"):
        seed_figure.main([*argv, "learning_rate=0.001"])


def test_seeds_run_as_one_program_and_figures_show_their_mean(tmp_path):
    argv = ["--steps", "2", "--seeds", "2", "--out", str(tmp_path), *TINY]
    outcomes = sync_study.main([*argv, "--algorithms", "grpo", "--syncs", "sync1"])
    (outcome,) = outcomes
    per_seed = [read_metrics(tmp_path / outcome.spec.name / f"seed_{s}") for s in (0, 1)]
    assert outcome.seed_metrics == per_seed and per_seed[0] != per_seed[1]
    mean = [np.mean([m[1]["reward/mean"] for m in per_seed])]
    assert [m["reward/mean"] for m in outcome.metrics if m["step"] == 1] == pytest.approx(mean)
    steps, centre, half = common.band(outcome, "reward/mean")
    values = np.array([[m["reward/mean"] for m in ms[1:]] for ms in per_seed])
    np.testing.assert_allclose(centre, values.mean(0))
    np.testing.assert_allclose(half, 12.706 * values.std(0, ddof=1) / np.sqrt(2))
    tails = values.mean(1)  # each seed's training reward over its last (<= 20) steps
    cell = f"{tails.mean():.3f} +- {12.706 * tails.std(ddof=1) / np.sqrt(2):.3f}"
    summary = (tmp_path / "summary.md").read_text()
    assert "2 seeds per run" in summary and cell in summary


def test_seed_figure_with_seeds_reports_intervals_and_claims(tmp_path):
    argv = ["--steps", "2", "--seeds", "2", "--out", str(tmp_path), *TINY]
    seed_figure.main(argv)
    summary = (tmp_path / "summary.md").read_text()
    lengths = [
        [
            m["response_length/mean"]
            for m in read_metrics(tmp_path / "grpo" / f"seed_{s}")
            if m["step"] == 2
        ]  # fmt: skip
        for s in (0, 1)
    ]
    values = np.ravel(lengths)
    half = 12.706 * values.std(ddof=1) / np.sqrt(2)
    rows = [line for line in summary.splitlines() if line.startswith("| GRPO | length |")]
    assert rows and f"{values.mean():.3f} +- {half:.3f}" in rows[0]
    assert "| last 2 steps |" in summary  # the tail a 2-step run has, not "last 50"
    for claim in ("GRPO ~ REC-OneSide-NoIS", "RED-Weight has the lowest KL",
                  "REC-OneSide-NoIS has the lowest entropy", "shortest responses",
                  "improve steadily"):  # fmt: skip
        line = next(x for x in summary.splitlines() if claim in x)
        assert "**supported**" in line or "**not supported**" in line, line


def test_seed_figure_defaults_to_five_seeds_of_400_steps_and_studies_to_one():
    args = seed_figure.parser().parse_args([])
    assert (args.seeds, args.steps) == (5, 400)
    assert common.make_parser("doc", steps=400, out="x").parse_args([]).seeds == 1
    assert (
        study.seed_cell(  # no value (evaluation off) reads '-', not 'nan'
            common.Outcome(None, None, [[{"step": 1}]], 0.0), lambda m: float("nan")
        )
        == "-"
    )


def test_overriding_a_field_the_experiment_varies_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"\['algorithm.name'\]"):
        seed_figure.main(["--out", str(tmp_path), "algorithm=reinforce"])
    with pytest.raises(ValueError, match=r"\['sync.interval'\]"):
        sync_study.main(["--out", str(tmp_path), "sync_interval=5"])
    with pytest.raises(ValueError, match="unknown syncs"):
        red_study.main(["--out", str(tmp_path), "--syncs", "sync7"])


def test_sync_study_offline_run_never_syncs(tmp_path):
    argv = ["--steps", "2", "--out", str(tmp_path), "--algorithms", "grpo"]
    outcomes = sync_study.main([*argv, "--syncs", "sync1,offline", *TINY])
    assert [o.spec.name for o in outcomes] == ["sync1/grpo", "offline/grpo"]
    offline = outcomes[1]
    assert offline.config.sync.interval == 3  # longer than the run: data of version 0 only
    assert [m["policy_version"] for m in offline.metrics[1:]] == [0, 0]
    assert [m["staleness/max"] for m in offline.metrics[1:]] == [0, 1]
    assert (tmp_path / "sync_study.png").stat().st_size > 20_000
    summary = (tmp_path / "summary.md").read_text()
    assert "| algorithm | on-policy (1, 0) | offline |" in summary
    finals = [f"{o.metrics[-1]['eval/reward']:.3f}" for o in outcomes]
    assert table_row(summary, "GRPO") == finals  # first table: final held-out reward


def test_red_study_runs_red_weight_at_sync_20(tmp_path):
    argv = ["--steps", "2", "--out", str(tmp_path), "--algorithms", "red-weight"]
    outcomes = red_study.main([*argv, "--syncs", "sync20", *TINY])
    (outcome,) = outcomes
    assert outcome.config.algorithm.name == "red-weight" and outcome.config.sync.interval == 20
    assert (tmp_path / "sync20" / "red-weight" / "metrics.jsonl").is_file()
    assert (tmp_path / "red_study.png").stat().st_size > 10_000
    summary = (tmp_path / "summary.md").read_text()
    assert "| RED-Weight |" in summary and "sync interval 20 (20, 0)" in summary


def adaptive_outcomes(kl_gap):
    """Synthetic 3-seed runs of adaptive_red's algorithms over 200 steps: adaptive RED-Weight's
    KL is `kl_gap` above the others', held-out rewards equal, T = 2 on odd steps, inf on even."""
    outcomes = []
    for label, name in adaptive_red.ALGORITHMS:
        ours = label == adaptive_red.ADAPTIVE
        seed_metrics = []
        for seed in range(3):
            records = [{"step": 0, "eval/reward": 0.2}]
            for step in range(1, 201):
                m = {"step": step, "kl/ref": 0.05 + 0.01 * seed + kl_gap * ours, "entropy": 0.1,
                     "response_length/mean": 16.0}  # fmt: skip
                if ours:
                    m["red/temperature"] = 2.0 + seed if step % 2 else float("inf")
                if step % 20 == 0:
                    m["eval/reward"] = 0.8 + 0.01 * seed
                records.append(m)
            seed_metrics.append(records)
        config = config_lib.build("embedded", steps=200, algorithm=name)
        outcomes.append(common.Outcome(common.RunSpec(label, name, {}), config, seed_metrics, 0.0))
    return outcomes


def test_adaptive_red_claims_and_temperature_table():
    lower = adaptive_red.claims(adaptive_outcomes(-0.01)).splitlines()
    assert "lowest KL" in lower[0] and "**supported**" in lower[0], lower
    assert "vs RED-Weight -0.010 +- 0.000" in lower[0]
    assert "without losing held-out reward: **supported**" in lower[1], lower
    higher = adaptive_red.claims(adaptive_outcomes(0.002)).splitlines()
    assert "**not supported**" in higher[0] and "**supported**" in higher[1], higher
    table = adaptive_red.temperature_table(adaptive_outcomes(0.0)[0])
    assert table_row(table, "1-100") == ["0.500 +- 0.000", "3.000 +- 2.484", "0.000 +- 0.000"]
    assert table_row(table, "101-200")[0] == "0.500 +- 0.000"


def test_moving_average_is_a_trailing_mean():
    np.testing.assert_allclose(
        common.moving_average(np.array([1.0, 2.0, 3.0, 4.0, 10.0]), 2), [1, 1.5, 2.5, 3.5, 7]
    )
    np.testing.assert_allclose(common.moving_average(np.array([2.0, 4.0]), 5), [2, 3])


def test_series_tail_mean_and_eval_stats_read_only_the_steps_that_log_a_key():
    metrics = [
        {"step": 0, "eval/reward": 0.25},
        {"step": 1, "reward/mean": 0.5},
        {"step": 2, "reward/mean": 1.0, "eval/reward": 0.75},
        {"step": 3, "reward/mean": 0.0, "eval/reward": 0.5},
    ]
    steps, values = common.series(metrics, "eval/reward")
    assert steps.tolist() == [0, 2, 3] and values.tolist() == [0.25, 0.75, 0.5]
    assert common.tail_mean(metrics, "reward/mean", 2) == 0.5
    assert common.eval_stats(metrics, tail=2) == {
        "eval_start": 0.25,
        "eval_final": 0.5,
        "eval_tail": 0.625,
        "eval_best": 0.75,
    }
    assert np.isnan(common.tail_mean(metrics, "entropy", 2))


def test_the_gsm8k_preset_gives_every_run_the_real_setup(tmp_path):
    parser = common.make_parser("doc", steps=400, out=str(tmp_path))
    args = parser.parse_args(["--config", "gsm8k-qwen2.5-1.5b", "eval_prompts=256"])
    configs = common.build_configs(seed_figure.specs(), args, seed_figure.DEFAULTS, ("algorithm",))
    assert [c.algorithm.name for c in configs] == ["grpo", "rec-oneside-nois", "red-weight"]
    for c in configs:
        assert (c.task.name, c.prompts_per_step, c.optimizer.learning_rate) == ("gsm8k", 96, 1e-6)
        assert (c.sync.interval, c.eval_prompts, c.steps) == (20, 256, 400)
    specs = study.study_specs(sync_study.ALGORITHMS, sync_study.SYNCS, steps=400)
    configs = common.build_configs(specs, args, sync_study.DEFAULTS, study.STUDY_VARIED)
    assert len(configs) == 24 and len({c.out_dir for c in configs}) == 24
    wide = [c for c in configs if c.out_dir.endswith("offset10/rec-oneside-nois-wide")]
    assert wide[0].algorithm.preset().loss.eps_high == 2.0 and wide[0].sync.offset == 10
    assert wide[0].task.name == "gsm8k"


def test_command_line_algorithm_overrides_apply_under_each_runs_own(tmp_path):
    parser = common.make_parser("doc", steps=10, out=str(tmp_path))
    args = parser.parse_args(
        ["algorithm_overrides.clip=one-side", "algorithm_overrides.eps_high=0.5"]
    )
    specs = study.study_specs(sync_study.ALGORITHMS, sync_study.SYNCS[:1], steps=10)
    configs = common.build_configs(specs, args, sync_study.DEFAULTS, study.STUDY_VARIED)
    losses = {pathlib.Path(c.out_dir).name: c.algorithm.preset().loss for c in configs}
    assert losses["reinforce"].clip == "one-side" and losses["reinforce"].eps_high == 0.5
    assert losses["rec-ring-nois"].clip == "one-side"
    wide = losses["rec-oneside-nois-wide"]
    assert (wide.clip, wide.eps_low, wide.eps_high) == ("one-side", 0.6, 2.0)
