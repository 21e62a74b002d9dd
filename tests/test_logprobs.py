"""Tests of rl_jax.logprobs: log-probs, entropy and exact KL of softmax(z / T), by hand."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_jax import logprobs


class LogprobsVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_token_logprobs_and_kl(self):
        rng = np.random.default_rng(10)
        logits = jnp.asarray(-rng.gamma(1.0, 1.0, (6, 5)).astype(np.float32))  # [positions, vocab]
        logp, entropy = self.variant(logprobs.token_logprobs)(logits, jnp.arange(6) % 5, 0.7)
        chex.assert_trees_all_close(
            (logp, entropy), logprobs.token_logprobs(logits, jnp.arange(6) % 5, 0.7), rtol=1e-6
        )
        kl = self.variant(logprobs.full_kl_from_logits)(logits, logits[::-1], 0.7)
        chex.assert_trees_all_close(kl, logprobs.full_kl_from_logits(logits, logits[::-1], 0.7))


# ---------------------------------------------------------------- entropy and KL, by hand
def test_entropy_and_full_kl_by_hand():
    logits = jnp.array([0.0, 2 * math.log(3.0)])
    # At temperature 2 the distribution is [1/4, 3/4].
    logp, entropy = logprobs.token_logprobs(logits, jnp.array(1), temperature=2.0)
    np.testing.assert_allclose(logp, math.log(0.75), rtol=1e-6)
    np.testing.assert_allclose(entropy, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rtol=1e-6)
    np.testing.assert_allclose(logprobs.entropy_from_logits(jnp.zeros(2)), math.log(2), rtol=1e-6)
    kl = logprobs.full_kl_from_logits(jnp.zeros(2), logits, temperature=2.0)
    np.testing.assert_allclose(kl, 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), rtol=1e-6)


def test_masked_vocabulary_and_tiny_temperatures_are_finite():
    logits = jnp.array([[0.3, 0.1, -jnp.inf, 2.0], [1.0, 1.0, 1.0, -jnp.inf]])

    @jax.jit
    def values_and_grads(x, temperature):  # temperature traced: one compile for all
        fn = lambda x: jnp.sum(sum(logprobs.token_logprobs(x, jnp.array([0, 1]), temperature)))
        kl = lambda x: jnp.sum(logprobs.full_kl_from_logits(x, 0.5 * x, temperature))
        return jax.value_and_grad(fn)(x), jax.value_and_grad(kl)(x)

    for temperature in (1.0, 1e-3, 1e-6):
        for value, grad in values_and_grads(logits, temperature):
            assert np.isfinite(value) and np.all(np.isfinite(grad)), temperature
    np.testing.assert_allclose(logprobs.entropy_from_logits(logits)[1], math.log(3), rtol=1e-6)


def test_invalid_temperature_raises():
    with pytest.raises(ValueError, match="temperature"):
        logprobs.entropy_from_logits(jnp.zeros(3), temperature=0.0)
