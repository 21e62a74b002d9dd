"""`python -m rl_jax.evaluate`: the pass@k estimator, a two-seed run scored per seed and across
seeds, the training-time evaluation reproduced, read-only restores, and bad input."""

import itertools
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from rl_jax import config as config_lib
from rl_jax import evaluate, intervals, parallel, saved_run
from rl_jax.train import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
EVAL_PROMPTS = 32


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (5, 2, 1, 0.4),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3, 2) / C(5, 2) = 1 - 3/10
        (5, 2, 3, 0.9),  # 1 - C(3, 3) / C(5, 3) = 1 - 1/10
        (5, 2, 4, 1.0),  # n - c < k: every 4 of the 5 hold a correct one
        (5, 0, 3, 0.0),
        (4, 4, 4, 1.0),
        (200, 1, 100, 0.5),  # 1 - C(199, 100) / C(200, 100) = 1 - 100/200
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert evaluate.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_binomial_form():
    for n, c, k in itertools.product(range(1, 12), range(12), range(1, 12)):
        if c <= n and k <= n:
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert evaluate.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert 0 < evaluate.pass_at_k(10_000, 3, 10) < 1  # C(10000, 10) would overflow a float
    with pytest.raises(ValueError, match="pass@k"):
        evaluate.pass_at_k(3, 4, 1)


def test_run_metrics_hand_computed():
    correct = np.array([[1, 0, 0], [1, 1, 1]], bool)
    rewards = np.array([[1.0, 0.0, -0.1], [1.1, 1.0, 1.0]])
    lengths = np.array([[3, 4, 5], [6, 7, 8]])
    m = evaluate.run_metrics(rewards, correct, lengths)
    assert m["reward/mean"] == pytest.approx(4.0 / 6)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["pass@1"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["pass@2"] == pytest.approx((1 - 1 / 3 + 1) / 2)  # 1 - C(2,2)/C(3,2) = 2/3
    assert m["pass@3"] == pytest.approx(1.0)
    assert m["response_length/mean"] == pytest.approx(5.5)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """A 2-step, 2-seed run of the embedded default with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("evaluate") / "run"
    config = config_lib.build(
        "embedded",
        prompts_per_step=4, group_size=4, learning_rate=3e-4, steps=2, num_seeds=2,
        eval_every=2, eval_prompts=EVAL_PROMPTS, checkpoint_every=1, out_dir=str(out),
    )  # fmt: skip
    train(config)
    return out


@pytest.fixture(scope="module")
def saved(two_seeds):
    return saved_run.load(saved_run.find(two_seeds))


def _listing(path: pathlib.Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def test_responses_are_the_training_time_evaluation(saved):
    """Response 0 of each of the first eval_prompts test prompts is the one training's held-out
    evaluation drew (`Step.evaluate`, the same key per row)."""
    task, tokenizer = saved.run.task, saved.run.tokenizer
    examples = task.eval_examples(EVAL_PROMPTS)
    tokens, mask = tokenizer.encode_batch(
        [ex.prompt for ex in examples], length=task.max_prompt_len, add_bos=True
    )
    replicated = parallel.replicated(saved.mesh)
    reference = saved.step_fn.evaluate(
        saved.state, parallel.from_host(tokens, replicated), parallel.from_host(mask, replicated)
    )
    for i in range(len(saved.seeds)):
        ours, _ = evaluate.sample(saved, i, examples, 1, saved.step_fn.sampling)
        expected = np.asarray(jax.device_get(reference.response_tokens[i]))
        # Two different programs: their logits may round apart, which flips a draw only where it
        # sits on a boundary; a wrong key or policy would differ in most rows.
        assert np.mean(np.all(ours == expected, axis=1)) >= 0.9


def test_two_seeds_scored_per_seed_with_an_interval(saved):
    doc = evaluate.evaluate(saved, samples=3, prompts=8)
    assert doc["step"] == 2 and doc["prompts"] == 8 and doc["samples"] == 3
    assert set(doc["seeds"]) == {"0", "1"}
    for m in doc["seeds"].values():
        assert set(m) == {"reward/mean", "accuracy", "pass@1", "pass@2", "pass@3",
                          "response_length/mean"}  # fmt: skip
        assert m["pass@1"] == pytest.approx(m["accuracy"])  # c / n averaged = the mean
        assert m["pass@1"] <= m["pass@2"] <= m["pass@3"]
        assert m["reward/mean"] == pytest.approx(m["accuracy"])  # format_weight = 0
    for name in doc["mean"]:
        values = [m[name] for m in doc["seeds"].values()]
        mean, half = intervals.mean_interval(values)
        assert doc["mean"][name] == pytest.approx(mean)
        assert doc["interval95"][name] == pytest.approx(half)


def test_cli_writes_json_and_one_line_per_metric(two_seeds, capsys):
    assert evaluate.main([str(two_seeds), "--samples", "2", "--prompts", "4", "--step", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    path = two_seeds / "eval" / "step_1_test_4x2_t1.json"
    assert lines[-1] == f"wrote {path}"
    doc = json.loads(path.read_text())
    assert doc["step"] == 1 and doc["temperature"] == 1.0
    names = [line.split()[0] for line in lines[1:-1]]
    assert names == list(doc["mean"]) == ["reward/mean", "accuracy", "pass@1", "pass@2",
                                          "response_length/mean"]  # fmt: skip
    assert "seed 0:" in lines[2] and "seed 1:" in lines[2]
    assert not list(path.parent.glob(".*"))  # no temporary file left

    assert evaluate.main([str(two_seeds / "seed_1"), "--prompts", "4", "--json",
                          "--temperature", "0.5", "--split", "train"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["seeds"].keys() == {"1"} and printed["split"] == "train"
    assert printed["interval95"]["accuracy"] is None  # one seed: no interval
    assert (two_seeds / "seed_1" / "eval" / "step_2_train_4x1_t0.5.json").is_file()


def test_restores_read_only(two_seeds, tmp_path):
    """A save in progress (orbax's temporary directory) and every file stay as they were."""
    run = tmp_path / "run"
    shutil.copytree(two_seeds / "seed_0", run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    (run / "checkpoints" / "3.orbax-checkpoint-tmp-0").mkdir()
    before = _listing(run)
    loaded = saved_run.load(saved_run.find(run, step=1))
    assert loaded.step == 1 and loaded.seeds == [0]
    assert int(loaded.state.learner.step[0]) == 1
    assert _listing(run) == before


def _error(capsys, argv) -> str:
    assert evaluate.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""
    return lines[0]


def test_bad_input_one_line_nothing_written(two_seeds, tmp_path, capsys):
    before = _listing(two_seeds)
    assert "has no checkpoint of step 7; it has steps [1, 2]" in _error(
        capsys, [str(two_seeds), "--step", "7"]
    )
    assert "exceeds the 512 problems of the test split" in _error(
        capsys, [str(two_seeds), "--prompts", "1000"]
    )
    assert _listing(two_seeds) == before

    no_checkpoint = tmp_path / "fresh"
    no_checkpoint.mkdir()
    shutil.copy(two_seeds / "seed_0" / "config.json", no_checkpoint / "config.json")
    assert "has no checkpoint" in _error(capsys, [str(no_checkpoint)])
    assert sorted(p.name for p in no_checkpoint.iterdir()) == ["config.json"]

    (no_checkpoint / "config.json").write_text('{"learning_rat": 1}')
    line = _error(capsys, [str(no_checkpoint)])
    assert "cannot read the run's config" in line and "learning_rat" in line
    (no_checkpoint / "config.json").write_text("{not json")
    assert "cannot read the run's config" in _error(capsys, [str(no_checkpoint)])
    assert sorted(p.name for p in no_checkpoint.iterdir()) == ["config.json"]

    assert "is not a directory" in _error(capsys, [str(tmp_path / "absent")])
    assert not (tmp_path / "absent").exists()


def test_module_cli_refuses_a_directory_without_a_run(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rl_jax.evaluate", str(tmp_path)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path} is not a run directory: it has no config.json (a run's --out "
        "directory has one, or seed_<s>/ runs that do)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_any_device_count_gives_the_same_draws(two_seeds, saved):
    """Three devices: 15 rows a call split over them (K = 3), 16 rows replicated (K = 2)."""
    script = (
        "import json, sys; from rl_jax import evaluate, saved_run; "
        "saved = saved_run.load(saved_run.find(sys.argv[1])); "
        "examples = saved.run.task.eval_examples(8); "
        "print(json.dumps([evaluate.sample(saved, i, examples, k, saved.step_fn.sampling)[0]"
        ".tolist() for k in (3, 2) for i in (0, 1)]))"
    )
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=3"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(two_seeds)], capture_output=True, text=True, env=env,
        check=True,
    )  # fmt: skip
    three_devices = iter(json.loads(result.stdout.strip().splitlines()[-1]))
    examples = saved.run.task.eval_examples(8)
    for samples in (3, 2):
        for i in (0, 1):
            ours, _ = evaluate.sample(saved, i, examples, samples, saved.step_fn.sampling)
            theirs = np.asarray(next(three_devices))
            assert ours.shape == theirs.shape == (8 * samples, ours.shape[1])
            # Different programs may round a logit apart and flip a draw on a boundary; a wrong
            # key or row order would change most rows.
            assert np.mean(np.all(ours == theirs, axis=1)) >= 0.9
