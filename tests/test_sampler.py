"""Sampler: sampling transforms, their log-probs, KV-cache generation against the full forward."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from rl_jax import models, sampler, sampling
from rl_jax.sampler import SamplingConfig

VOCAB, CAP, GROUP = 32, 12, 2
NEVER = 10**6  # an eos_id outside the vocabulary: responses run to the cap
SAMPLED = SamplingConfig(eos_id=NEVER, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=CAP)
GREEDY = SamplingConfig(eos_id=NEVER, temperature=0.7, greedy=True, max_new_tokens=CAP)


# ---------------------------------------------------------------- config and transforms


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 0.0),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("max_new_tokens", 0),
        ("eos_id", -1),
        ("pad_id", -2),
        ("stop_sequences", ((),)),
        ("prompt_buckets", (32, 16)),
        ("generation_buckets", ()),
    ],
)
def test_config_rejects_invalid_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{"eos_id": 2, field: value})


def test_bucket_size():
    buckets = (16, 32, 64)
    assert [sampler.bucket_size(n, buckets) for n in (1, 16, 17, 64, 65, 130)] == [
        16, 16, 32, 64, 128, 192,
    ]  # fmt: skip


LOGITS = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))  # probabilities 0.1, 0.2, 0.3, 0.4
LOGITS_PROBS = np.array([0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize(
    "config, behaviour_probs",
    [
        (SamplingConfig(eos_id=0), [0.1, 0.2, 0.3, 0.4]),
        (SamplingConfig(eos_id=0, top_k=2), [0, 0, 3 / 7, 4 / 7]),
        # sorted mass before each token: 0.4 -> 0, 0.3 -> 0.4, 0.2 -> 0.7, 0.1 -> 0.9
        (SamplingConfig(eos_id=0, top_p=0.65), [0, 0, 3 / 7, 4 / 7]),
        (SamplingConfig(eos_id=0, top_p=0.75), [0, 2 / 9, 3 / 9, 4 / 9]),
        (SamplingConfig(eos_id=0, top_p=0.3), [0, 0, 0, 1]),
        # top-k first, then top-p on the renormalised top-3 (0.4/0.9, 0.3/0.9, 0.2/0.9)
        (SamplingConfig(eos_id=0, top_k=3, top_p=0.5), [0, 0, 3 / 7, 4 / 7]),
        (SamplingConfig(eos_id=0, greedy=True, top_k=2), [0, 0, 0, 1]),
    ],
)
def test_sampling_logprobs_hand_computed(config, behaviour_probs):
    logits = jnp.broadcast_to(LOGITS, (4, 4))
    tokens = jnp.arange(4)
    sampled_logp, untruncated_logp = sampling.sampling_logprobs(logits, tokens, config)
    np.testing.assert_allclose(np.exp(sampled_logp), behaviour_probs, atol=1e-6)
    np.testing.assert_allclose(np.exp(untruncated_logp), [0.1, 0.2, 0.3, 0.4], rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    # Multiples of 0.01 in [-20, 20] (ties included): no tiny values that z / T would make
    # subnormal, which XLA:CPU flushes to zero.
    logits=st.lists(st.integers(-2000, 2000).map(lambda i: i / 100), min_size=8, max_size=8),
    top_k=st.sampled_from([0, 1, 3, 9]),
    top_p=st.floats(0.01, 1.0),
    temperature=st.floats(0.25, 4.0),
)
def test_truncated_distribution_is_a_normalised_top_set(logits, top_k, top_p, temperature):
    config = SamplingConfig(eos_id=0, top_k=top_k, top_p=top_p, temperature=temperature)
    truncated = np.asarray(sampling.truncated_logits(jnp.array([logits]), config))[0]
    kept = np.isfinite(truncated)
    probs = np.exp(np.asarray(jax.nn.log_softmax(jnp.asarray(truncated))))
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)
    assert np.max(np.array(logits)[kept]) == max(logits) and kept.sum() <= (top_k or 8)
    assert np.min(np.array(logits)[kept]) >= np.max(np.array(logits)[~kept], initial=-np.inf)
    np.testing.assert_allclose(truncated[kept], np.array(logits)[kept] / temperature, rtol=1e-6)


def test_temperature_scales_before_softmax():
    config = SamplingConfig(eos_id=0, temperature=2.0)
    _, untruncated_logp = sampling.sampling_logprobs(LOGITS, jnp.array([3]), config)
    expected = 0.5 * np.log(0.4) - np.log(np.sum(np.sqrt([0.1, 0.2, 0.3, 0.4])))
    np.testing.assert_allclose(untruncated_logp, [expected], rtol=1e-6)


@pytest.mark.parametrize(
    "config, probs",
    [
        (SamplingConfig(eos_id=0), [0.1, 0.2, 0.3, 0.4]),
        (SamplingConfig(eos_id=0, top_p=0.75), [0, 2 / 9, 3 / 9, 4 / 9]),
    ],
)
def test_sample_tokens_frequencies_and_recorded_logp(config, probs):
    rows = 20_000
    keys = jax.random.split(jax.random.key(0), rows)
    logits = jnp.broadcast_to(LOGITS, (rows, 4))
    tokens, sampled_logp, untruncated_logp = jax.jit(sampling.sample_tokens, static_argnums=2)(
        logits, keys, config
    )
    frequencies = np.bincount(np.asarray(tokens), minlength=4) / rows
    np.testing.assert_allclose(frequencies, probs, atol=0.015)  # ~4 standard errors
    np.testing.assert_allclose(np.exp(sampled_logp), np.asarray(probs)[tokens], rtol=1e-5)
    np.testing.assert_allclose(np.exp(untruncated_logp), LOGITS_PROBS[tokens], rtol=1e-5)


# ---------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def policy():
    config = dataclasses.replace(models.get_config("tiny"), vocab_size=VOCAB)
    graphdef, params = nnx.split(models.init_model(config, seed=0))
    forward = jax.jit(models.forward, static_argnums=0)
    return graphdef, params, lambda tokens, mask: forward(graphdef, params, tokens, None, mask)


@pytest.fixture(scope="module")
def prompts():
    """4 left-padded prompts of lengths 5, 3, 1 and 4 (width 5)."""
    lengths = np.array([5, 3, 1, 4])
    mask = (np.arange(5)[None] >= 5 - lengths[:, None]).astype(np.int32)
    tokens = np.random.default_rng(0).integers(3, VOCAB, (4, 5)) * mask
    return tokens.astype(np.int32), mask


@pytest.fixture(scope="module")
def run(policy, prompts):
    """generate(config, key) with the module's prompts, memoised (one compile per config)."""
    cache = {}

    def go(config, seed=0, version=0):
        if (config, seed, version) not in cache:
            state = sampler.SamplerState.create(policy[1], jax.random.key(seed), version)
            cache[config, seed, version] = sampler.generate(
                policy[0], state, *prompts, config, group_size=GROUP
            )
        return cache[config, seed, version]

    return go


def _rescored(policy, rollout):
    """Full-forward logits [B, N, vocab] at the positions that predicted each response token."""
    tokens = jnp.concatenate([rollout.prompt_tokens, rollout.response_tokens], axis=1)
    mask = jnp.concatenate([rollout.prompt_mask, jnp.ones_like(rollout.response_tokens)], axis=1)
    width = rollout.prompt_tokens.shape[1]
    return policy[2](tokens, mask)[:, width - 1 : -1]


def test_rollout_layout_groups_and_version(run, prompts):
    rollout, new_state = run(SAMPLED, version=3)
    num_prompts = prompts[0].shape[0]
    batch, width = num_prompts * GROUP, 16  # prompt width 5 and cap 12 both bucket to 16
    chex.assert_shape([rollout.prompt_tokens, rollout.prompt_mask], (batch, width))
    chex.assert_shape(
        [rollout.response_tokens, rollout.response_mask, rollout.sampled_logp], (batch, width)
    )
    grouped = np.asarray(rollout.prompt_tokens).reshape(num_prompts, GROUP, width)[..., -5:]
    np.testing.assert_array_equal(grouped, np.repeat(prompts[0][:, None], GROUP, axis=1))
    assert not np.array_equal(rollout.response_tokens[0], rollout.response_tokens[1])
    np.testing.assert_array_equal(rollout.policy_version, np.full(batch, 3))
    assert new_state.policy_version == 3
    assert not np.array_equal(
        jax.random.key_data(new_state.key), jax.random.key_data(jax.random.key(0))
    )
    # eos_id is never produced: every row runs to the cap (12 of 16 columns) and is truncated.
    np.testing.assert_array_equal(rollout.response_length, np.full(batch, CAP))
    np.testing.assert_array_equal(rollout.response_mask[:, CAP:], 0)
    assert np.all(rollout.truncated)


def test_fixed_key_is_deterministic(run, policy, prompts):
    first, _ = run(SAMPLED)
    state = sampler.SamplerState.create(policy[1], jax.random.key(0))
    again, _ = sampler.generate(policy[0], state, *prompts, SAMPLED, group_size=GROUP)
    chex.assert_trees_all_equal(first, again)
    other, _ = run(SAMPLED, seed=1)
    assert not np.array_equal(first.response_tokens, other.response_tokens)


def test_greedy_is_argmax_of_full_forward(run, policy):
    rollout, _ = run(GREEDY)
    logits = _rescored(policy, rollout)[:, :CAP]
    np.testing.assert_array_equal(rollout.response_tokens[:, :CAP], jnp.argmax(logits, -1))
    np.testing.assert_array_equal(rollout.sampled_logp, 0.0)
    full_logp = jax.nn.log_softmax(logits / GREEDY.temperature, -1)
    expected = jnp.take_along_axis(full_logp, rollout.response_tokens[:, :CAP, None], -1)[..., 0]
    np.testing.assert_allclose(rollout.untruncated_logp[:, :CAP], expected, atol=1e-5)


def test_top_k_one_equals_greedy(run):
    greedy, _ = run(GREEDY)
    top1, _ = run(dataclasses.replace(SAMPLED, top_k=1), seed=5)  # SAMPLED's program
    chex.assert_trees_all_close(greedy, top1, atol=1e-6)


def test_recorded_logps_equal_a_full_forward_recompute(run, policy):
    rollout, _ = run(SAMPLED)
    logits = _rescored(policy, rollout)
    sampled_logp, untruncated_logp = sampling.sampling_logprobs(
        logits, rollout.response_tokens, SAMPLED
    )
    mask = rollout.response_mask > 0
    assert np.max(np.abs(np.where(mask, sampled_logp - rollout.sampled_logp, 0))) < 1e-5
    assert np.max(np.abs(np.where(mask, untruncated_logp - rollout.untruncated_logp, 0))) < 1e-5
    assert np.all(np.isfinite(rollout.sampled_logp))
    # truncation renormalises: the behaviour distribution puts more mass on every kept token
    assert np.all(
        np.asarray(rollout.sampled_logp)[mask] >= np.asarray(rollout.untruncated_logp)[mask]
    )
    assert np.any(
        np.asarray(rollout.sampled_logp)[mask] > np.asarray(rollout.untruncated_logp)[mask]
    )


def test_eos_and_stop_sequences_end_and_mask(run):
    """Before a row ends, its tokens equal the free-running ones (keys are per row and step)."""
    free, _ = run(SAMPLED)
    free_tokens = np.asarray(free.response_tokens)
    eos, stop = int(free_tokens[0, 3]), tuple(int(t) for t in free_tokens[1, 5:7])
    never = (VOCAB + 1, VOCAB + 1, eos)  # a longer stop sequence that cannot match
    config = dataclasses.replace(SAMPLED, eos_id=eos, stop_sequences=(stop, never))
    ended, _ = run(config)
    lengths, truncated = [], []
    for row in free_tokens[:, :CAP].tolist():
        ends = [t + 1 for t in range(CAP) if row[t] == eos]
        ends += [t + 1 for t in range(1, CAP) if tuple(row[t - 1 : t + 1]) == stop]
        lengths.append(min(ends, default=CAP))
        truncated.append(not ends)
    lengths = np.array(lengths)
    assert lengths[0] <= 4 and lengths[1] <= 7 and np.any(lengths == CAP)
    live = np.arange(16)[None] < lengths[:, None]
    np.testing.assert_array_equal(ended.response_length, lengths)
    np.testing.assert_array_equal(ended.response_mask, live.astype(np.float32))
    np.testing.assert_array_equal(ended.response_tokens, np.where(live, free_tokens, 0))
    np.testing.assert_array_equal(ended.sampled_logp, np.where(live, free.sampled_logp, 0))
    np.testing.assert_array_equal(ended.untruncated_logp, np.where(live, free.untruncated_logp, 0))
    np.testing.assert_array_equal(ended.truncated, truncated)


def test_same_bucket_and_traced_knobs_do_not_recompile(run, policy, prompts):
    run(GREEDY)  # compiled for prompt bucket 16, response bucket 16
    before = sampler.compile_count()
    state = sampler.SamplerState.create(policy[1], jax.random.key(0))
    shorter = dataclasses.replace(GREEDY, max_new_tokens=CAP - 4, temperature=1.3, eos_id=7)
    rollout, _ = sampler.generate(
        policy[0], state, prompts[0][:, 2:], prompts[1][:, 2:], shorter, group_size=GROUP
    )
    assert sampler.compile_count() == before
    assert int(np.max(rollout.response_length)) <= CAP - 4
    longer = np.concatenate([np.zeros((4, 9), np.int32), prompts[0]], axis=1)  # width 14
    wide_mask = np.concatenate([np.zeros((4, 9), np.int32), prompts[1]], axis=1)
    rollout, _ = sampler.generate(policy[0], state, longer, wide_mask, GREEDY, group_size=GROUP)
    assert sampler.compile_count() == before
    np.testing.assert_array_equal(rollout.response_tokens, run(GREEDY)[0].response_tokens)


def test_generate_rejects_right_padding(policy, prompts):
    state = sampler.SamplerState.create(policy[1], jax.random.key(0))
    with pytest.raises(ValueError, match="left-padded"):
        sampler.generate(policy[0], state, prompts[0], prompts[1][:, ::-1], GREEDY)
