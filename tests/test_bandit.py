"""The 3-arm bandit experiment reproduces its qualitative outcome (experiments/bandit.py)."""

import numpy as np
import pytest

from experiments import bandit

STEPS = 600


@pytest.fixture(scope="module")
def results():
    return bandit.run_all(STEPS, seed=1)


def test_stale_reinforce_converges_to_the_second_arm(results):
    for label in ("REINFORCE, fixed behaviour", "REINFORCE, sync every 50"):
        assert results[label][-1, 1] > 0.99, label


def test_regularised_updates_and_fresh_data_reach_the_best_arm(results):
    for label in (
        "REC-OneSide-NoIS, sync every 50",
        "OPMD, sync every 50",
        "REINFORCE, sync every 10",
    ):
        probs = results[label]
        assert probs.shape == (STEPS + 1, 3)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
        assert probs[-1, 2] > 0.9, label


def test_main_writes_plot_and_summary(results, tmp_path, capsys):
    bandit.main(["--steps", str(STEPS), "--seed", "1", "--out", str(tmp_path)])
    assert (tmp_path / "bandit.png").stat().st_size > 10_000
    summary = (tmp_path / "summary.md").read_text()
    assert "| OPMD, sync every 50 |" in summary and "never" in summary
    assert (
        "| REINFORCE, fixed behaviour | 0.000 | 1.000 | 0.000 | 0.800 | never |"
        in capsys.readouterr().out
    )
