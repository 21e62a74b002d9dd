"""Tests of rl_jax.advantages: hand-computed baselines, std normalisation and RED-Drop."""

import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_jax.advantages import AdvantageConfig, balance_drop_mask, group_advantages

SHAPE = (2, 6)  # [num_groups, group_size] used by every jitted call below
PLAIN, GRPO, DROP = (
    AdvantageConfig(),
    AdvantageConfig(std_normalize=True),
    AdvantageConfig(drop="balance"),
)
DROP_STD = AdvantageConfig(std_normalize=True, drop="balance")


@functools.partial(jax.jit, static_argnames="config")
def advantages(rewards, config, key=None):
    return group_advantages(rewards, config, key)


def test_mean_baseline_by_hand():
    rewards = np.array([[1, 0, 0, 0, 0, 1], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]], np.float32)
    expected = [[2 / 3, -1 / 3, -1 / 3, -1 / 3, -1 / 3, 2 / 3], [0] * 6]
    np.testing.assert_allclose(advantages(rewards, PLAIN), expected, rtol=1e-6)


def test_std_normalisation_uses_population_std_plus_eps():
    rewards = np.array([[1, 0, 0, 0, 0, 0], [3, 1, 3, 1, 3, 1]], np.float32)
    std0 = np.sqrt(5) / 6  # population std of [1, 0, 0, 0, 0, 0]
    expected = [
        np.array([5, -1, -1, -1, -1, -1]) / 6 / (std0 + 1e-6),
        np.array([1, -1, 1, -1, 1, -1]) / (1 + 1e-6),
    ]
    np.testing.assert_allclose(advantages(rewards, GRPO), expected, rtol=1e-6)


def test_constant_groups_get_exactly_zero_even_with_std_normalisation():
    rewards = np.full(SHAPE, 0.1, np.float32)  # a plain mean of six 0.1f is off by an ulp
    assert np.all(np.asarray(advantages(rewards, GRPO)) == 0)
    assert np.all(np.asarray(advantages(rewards, DROP_STD, jax.random.key(0))) == 0)


def test_red_drop_by_hand():
    # Group 0: 1 positive, 5 negatives -> 4 negatives dropped; kept [1, 0]: mean 0.5.
    # Group 1: 4 positives (R >= 0.5), 2 negatives: nothing dropped.
    rewards = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0.5, 0.5]], np.float32)
    adv = np.asarray(advantages(rewards, DROP, jax.random.key(0)))
    assert adv[0, 0] == 0.5 and sorted(adv[0, 1:]) == [-0.5, 0, 0, 0, 0]
    np.testing.assert_allclose(adv[1], [0.5, 0.5, -0.5, -0.5, 0, 0], atol=1e-7)
    adv_std = np.asarray(advantages(rewards, DROP_STD, jax.random.key(0)))
    np.testing.assert_allclose(adv_std[0], adv[0] / (0.5 + 1e-6), rtol=1e-6)  # kept std 0.5


def test_red_drop_is_deterministic_given_the_key_and_uniform_over_negatives():
    rewards = jnp.array([[1, 0, 0, 0, 0, 0]] * 2, jnp.float32)
    drop = jax.jit(jax.vmap(balance_drop_mask, in_axes=(None, 0)))
    keys = jax.random.split(jax.random.key(1), 600)
    dropped = np.asarray(drop(rewards, keys))
    np.testing.assert_array_equal(dropped, np.asarray(drop(rewards, keys)))
    assert np.all(dropped.sum(-1) == 4) and not dropped[..., 0].any()
    kept_negative = np.argmin(dropped[:, 0, 1:], axis=-1)  # the one negative left, per key
    counts = np.bincount(kept_negative, minlength=5)
    assert counts.min() > 80, counts  # 600 / 5 = 120 expected per negative


def test_group_size_one_and_missing_key_are_rejected():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(jnp.zeros((4, 1)), PLAIN)
    with pytest.raises(ValueError, match="key"):
        group_advantages(jnp.zeros(SHAPE), DROP)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"drop": "random"}, "drop"),
        ({"std_normalize": 1}, "std_normalize"),
        ({"std_eps": 0.0}, "std_eps"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdvantageConfig(**kwargs)


class AdvantagesVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        rewards = jnp.array([[1, 0, 0, 0, 0, 0.3], [1, 1, 0, 0.2, 0.5, 0.5]], jnp.float32)
        for config in (PLAIN, DROP_STD):
            fn = self.variant(functools.partial(group_advantages, config=config))
            chex.assert_trees_all_close(
                fn(rewards, key=jax.random.key(3)),
                advantages(rewards, config, jax.random.key(3)),
                atol=1e-6,
            )


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    rewards=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, -3.0]), min_size=12, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_red_drop_properties(rewards, seed):
    rewards = np.array(rewards, np.float32).reshape(SHAPE)
    key = jax.random.key(seed)
    adv = np.asarray(advantages(rewards, DROP, key))
    dropped = np.asarray(jax.jit(balance_drop_mask)(rewards, key))
    mean = rewards.mean(-1, keepdims=True)
    is_pos = rewards >= mean - 1e-6
    num_pos, num_neg = is_pos.sum(-1), (~is_pos).sum(-1)
    assert np.isfinite(adv).all()
    np.testing.assert_array_equal(dropped.sum(-1), np.maximum(num_neg - num_pos, 0))
    assert not (dropped & is_pos).any()  # positives are never dropped
    assert np.all(adv[dropped] == 0)
    kept = ~dropped
    np.testing.assert_allclose((adv * kept).sum(-1), 0, atol=1e-5)  # zero-mean over kept
    kept_mean = (rewards * kept).sum(-1, keepdims=True) / kept.sum(-1, keepdims=True)
    np.testing.assert_allclose(adv[kept], (rewards - kept_mean)[kept], atol=1e-5)
