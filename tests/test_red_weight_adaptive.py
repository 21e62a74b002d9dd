"""Adaptive RED-Weight: the bisection temperature by hand and against a plain-Python reference,
its sign property, the weighted advantages, the learner's wiring and the CLI."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_jax import algorithms, groups, losses, models
from rl_jax.advantages import (
    group_advantages,
    red_weight_sum,
    red_weight_temperature,
    red_weight_temperatures,
)
from rl_jax.learner import Learner
from rl_jax.metrics import read_metrics
from rl_jax.train import main

temperature = jax.jit(red_weight_temperature)
WIDTH = 99.2 / 2**11  # the bracket after the 11 halvings the stopping rule always ends at


def reference_temperature(scores, lengths):
    """Trinity-RFT cod_advantage.py's loop, transcribed in Python floats (float64)."""

    def adv_sum(temp):
        if temp is None:
            return sum(a * n for a, n in zip(scores, lengths, strict=True))
        return sum(a * math.exp(a / temp) * n for a, n in zip(scores, lengths, strict=True))

    if not adv_sum(None) < 0:
        return math.inf
    low, high = 0.8, 100.0
    for _ in range(20):
        mid = (low + high) / 2
        if adv_sum(mid) < 0:
            high = mid
        else:
            low = mid
        if high - low < 0.05:
            break
    return mid


def s64(scores, lengths, temp):
    """S(T) in float64."""
    scores, lengths = np.asarray(scores, np.float64), np.asarray(lengths, np.float64)
    return float(np.sum(scores * np.exp(scores / temp) * lengths))


def test_no_reweighting_when_the_token_weighted_sum_is_not_negative():
    assert temperature(jnp.array([1.0, -1.0]), jnp.array([2.0, 1.0])) == jnp.inf  # S = 1
    assert temperature(jnp.zeros(4), jnp.array([1.0, 5, 2, 3])) == jnp.inf  # S = 0
    assert temperature(jnp.array([0.5, -0.5]), jnp.array([4.0, 4.0])) == jnp.inf  # S = 0


def test_temperature_by_hand():
    # A = [1, -1], L = [1, L2]: S(T) = e^(1/T) - L2 e^(-1/T), root T* = 2 / ln(L2).
    # L2 = 100: T* = 0.43 < 0.8, every midpoint has S < 0 and moves hi down: 50.4, 25.6, 13.2,
    # 7.0, 3.9, 2.35, 1.575, 1.1875, 0.99375, 0.896875, 0.8484375 (width 0.0484 < 0.05: stop).
    low = temperature(jnp.array([1.0, -1.0]), jnp.array([1.0, 100.0]))
    np.testing.assert_allclose(low, 0.8 + WIDTH, rtol=1e-6)
    np.testing.assert_allclose(low, 0.8484375, rtol=1e-6)
    # L2 = 3: T* = 1.8205. Midpoints 50.4, 25.6, 13.2, 7.0, 3.9, 2.35 (S < 0: hi), 1.575 (S >= 0:
    # lo), 1.9625 (hi), 1.76875 (lo), 1.865625 (hi), 1.8171875 (lo; width 0.0484: stop).
    interior = temperature(jnp.array([1.0, -1.0]), jnp.array([1.0, 3.0]))
    np.testing.assert_allclose(interior, 1.8171875, rtol=1e-6)
    assert abs(interior - 2 / math.log(3)) < 0.05
    # S(inf) = -1.2e-7 < 0 but S >= 0 at every midpoint: lo moves up, T = 100 - width.
    high = temperature(jnp.array([1.0, -1.0]), jnp.array([1.0, 1.0 + 2**-23]))
    np.testing.assert_allclose(high, 100 - WIDTH, rtol=1e-6)
    for scores, lengths in (([1, -1], [1, 100]), ([1, -1], [1, 3])):
        np.testing.assert_allclose(
            temperature(jnp.array(scores, jnp.float32), jnp.array(lengths, jnp.float32)),
            reference_temperature(scores, lengths),
            rtol=1e-6,
        )


def random_batches(count, size=16, seed=0):
    """Group-relative scores of binary rewards (groups of 4) and lengths 1..25, as the embedded
    task gives them."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        rewards = rng.integers(0, 2, (size // 4, 4)).astype(np.float32)
        scores = (rewards - rewards.mean(-1, keepdims=True)).ravel()
        yield scores, rng.integers(1, 26, size).astype(np.float32)


def test_matches_the_reference_and_brackets_the_root_of_the_sum():
    checked = 0
    for scores, lengths in random_batches(60):
        got = float(temperature(jnp.asarray(scores), jnp.asarray(lengths)))
        want = reference_temperature(scores.tolist(), lengths.tolist())
        # Different programs (float32 here, float64 there): a sign decision could differ only
        # where |S(mid)| is at rounding level, which none of these batches reaches.
        np.testing.assert_allclose(got, want, rtol=1e-5)
        if math.isinf(got):
            assert s64(scores, lengths, math.inf) >= -1e-5
            continue
        checked += 1
        assert s64(scores, lengths, math.inf) < 0
        # S decreases in T; the root lies in the final bracket [T - WIDTH, T] or [T, T + WIDTH].
        if got - WIDTH > 0.8 + 1e-4:
            assert s64(scores, lengths, got - WIDTH - 1e-4) >= 0
        else:  # the root is below the range: S < 0 at the answer itself
            assert s64(scores, lengths, got) < 0
        if got + WIDTH < 100 - 1e-4:
            assert s64(scores, lengths, got + WIDTH + 1e-4) < 0
    assert checked >= 20  # most of these batches are reweighted


def test_batch_and_group_levels():
    scores = jnp.array([[1.0, -1.0], [1.0, -1.0]])
    lengths = jnp.array([[1.0, 3.0], [2.0, 1.0]])
    by_group = red_weight_temperatures(scores, lengths, "group")
    np.testing.assert_allclose(by_group[0], 1.8171875, rtol=1e-6)
    assert by_group[1] == jnp.inf  # S = 2 - 1 >= 0
    (whole,) = red_weight_temperatures(scores, lengths, "batch")
    # S(T) = 3 e^(1/T) - 4 e^(-1/T): root 2 / ln(4/3) = 6.95
    np.testing.assert_allclose(whole, reference_temperature([1, -1, 1, -1], [1, 3, 2, 1]))
    assert abs(whole - 2 / math.log(4 / 3)) < 0.05
    with pytest.raises(ValueError, match="level must be one of"):
        red_weight_temperatures(scores, lengths, "task")


class TemperatureVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        fn = self.variant(red_weight_temperatures, static_argnames="level")
        scores = jnp.array([[1.0, -1.0, 0.5, -0.5], [0.25, -0.75, 0.25, 0.25]])
        lengths = jnp.array([[3.0, 9.0, 4.0, 4.0], [2.0, 7.0, 5.0, 1.0]])
        for level in ("batch", "group"):
            chex.assert_trees_all_close(
                fn(scores, lengths, level=level),
                red_weight_temperatures(scores, lengths, level),
                rtol=1e-6,
            )


def test_weighted_advantages_are_a_exp_a_over_t():
    config = algorithms.get("red-weight-adaptive").loss
    adv = jnp.array([0.75, -0.25, -0.25, -0.25, 0.5, -0.5])
    temps = jnp.array([1.5, 1.5, 1.5, 1.5, jnp.inf, jnp.inf])
    ratio = jnp.ones((6, 3))
    weighted, hits = losses.weighted_advantages(adv, ratio, jnp.ones(6), config, temps)
    np.testing.assert_allclose(weighted[:, 0], adv * np.exp(adv / temps), rtol=1e-6)
    assert np.all(weighted[4:, 0] == adv[4:]) and not hits.any()  # T = inf: A itself
    assert red_weight_sum(adv[:4], jnp.ones(4), jnp.inf) == 0
    mask = jnp.ones((6, 3))
    with pytest.raises(ValueError, match="adaptive_temp='batch' and temperature None"):
        losses.policy_loss(ratio, ratio, adv, mask, config)


def test_learner_uses_the_batch_temperature_of_its_advantages_and_lengths():
    from tests.test_learner import VOCAB, G, make_batch

    model = dataclasses.replace(models.get_config("tiny"), vocab_size=VOCAB)
    graphdef, params = nnx.split(models.init_model(model, 0))
    algo = algorithms.get("red-weight-adaptive")
    learner = Learner(graphdef, algo, group_size=G, ref_metrics=False, micro_batches=2)
    state = learner.init(params)
    seen = []
    for step in range(3):
        batch = make_batch(step)
        state, metrics = learner.update(state, batch, None, jax.random.key(step))
        adv = group_advantages(groups.to_groups(batch.rewards, G), algo.advantage)
        lengths = groups.to_groups(batch.response_mask.sum(-1), G)
        want = red_weight_temperature(adv.ravel(), lengths.ravel())
        np.testing.assert_allclose(metrics["red/temperature"], want, rtol=1e-6)
        assert metrics["red/reweighted_frac"] == float(jnp.isfinite(want))
        assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
        seen.append(float(want))
    assert any(math.isfinite(t) for t in seen), seen


SMALL = ["prompts_per_step=4", "group_size=4", "eval_every=0", "checkpoint_every=0"]


def test_cli_trains_group_level_for_three_finite_steps(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["embedded", *SMALL, "steps=3", "learning_rate=3e-4", "algorithm=red-weight-adaptive"]
    assert main([*args, "algorithm_overrides.adaptive_temp=group", "--out", str(out)]) == 0
    logged = read_metrics(out)
    assert [m["step"] for m in logged] == [1, 2, 3]
    for m in logged:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
        assert 0 <= m["red/reweighted_frac"] <= 1
        temp = m["red/temperature"]  # mean of the finite group temperatures; inf if none
        assert (m["red/reweighted_frac"] > 0) == math.isfinite(temp)
        assert math.isinf(temp) or 0.8 < temp < 100
    assert any(m["red/reweighted_frac"] > 0 for m in logged)


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm_overrides.adaptive_temp=task", "adaptive_temp must be one of"),
        ("algorithm_overrides.weight=none", "needs weight='advantage', got weight='none'"),
    ],
)
def test_bad_options_are_one_error_line(tmp_path, capsys, override, message):
    args = ["embedded", "algorithm=red-weight-adaptive", override, "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "r").exists()
