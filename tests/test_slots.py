"""Slot decoding (`rl_jax.slots`): every row gives what the lock-step decode gives it.

Slots and lock-step are different programs (other batch shapes, refills prefilled one row at a
time, attention over fewer cache positions), so log-probs are compared within 1e-5 plus 1e-5 of
the value (the rounding of different matmul shapes; tests/test_step.py measured 1.07e-5 on a
log-prob of -1.4 between two such programs) and tokens exactly (a flip would need two logits
within that rounding of each other).
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from rl_jax import models, sampler, slots
from rl_jax.sampler import SamplingConfig

VOCAB, CAP, GROUP = 32, 14, 2
NEVER = 10**6  # an eos_id outside the vocabulary
SAMPLED = SamplingConfig(eos_id=NEVER, temperature=0.8, top_k=6, top_p=0.9, max_new_tokens=CAP)
GREEDY = SamplingConfig(eos_id=NEVER, temperature=0.8, greedy=True, max_new_tokens=CAP)
PLAIN = SamplingConfig(eos_id=NEVER, max_new_tokens=CAP)


@pytest.fixture(scope="module")
def policy():
    config = dataclasses.replace(models.get_config("tiny"), vocab_size=VOCAB)
    return nnx.split(models.init_model(config, seed=1))


@pytest.fixture(scope="module")
def prompts():
    """6 left-padded prompts of very different lengths (1 to 20 tokens, width 20): 12 rows."""
    lengths = np.array([20, 1, 7, 3, 16, 2])
    width = lengths.max()
    mask = (np.arange(width)[None] >= width - lengths[:, None]).astype(np.int32)
    tokens = np.random.default_rng(0).integers(3, VOCAB, (6, width)) * mask
    return tokens.astype(np.int32), mask


@pytest.fixture(scope="module")
def run(policy, prompts):
    """generate(config) with the module's prompts and key 0, memoised."""
    cache = {}

    def go(config):
        if config not in cache:
            state = sampler.SamplerState.create(policy[1], jax.random.key(0))
            cache[config] = sampler.generate(policy[0], state, *prompts, config, GROUP)[0]
        return cache[config]

    return go


def assert_same_rows(got, want):
    for name in ("response_tokens", "response_mask", "response_length", "truncated"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    for name in ("sampled_logp", "untruncated_logp"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got.prompt_tokens, want.prompt_tokens)


def test_kv_widths_cover_the_cache_in_at_most_eight_chunks():
    assert slots.kv_widths(32) == (16, 32)
    assert slots.kv_widths(512) == (64, 128, 192, 256, 320, 384, 448, 512)
    assert slots.kv_widths(1100) == (144, 288, 432, 576, 720, 864, 1008, 1100)
    assert slots.kv_widths(10) == (10,)


@pytest.mark.parametrize("config", [GREEDY, SAMPLED], ids=["greedy", "top_k_top_p"])
@pytest.mark.parametrize("num_slots", [3, 16], ids=["fewer_slots", "more_slots"])
def test_slots_give_each_row_its_lockstep_tokens(run, config, num_slots):
    lockstep = run(config)
    assert np.all(lockstep.truncated)  # every row at the cap
    assert_same_rows(run(dataclasses.replace(config, decode_slots=num_slots)), lockstep)


def test_rows_that_end_early_eos_first_and_stop_sequences(run):
    """Rows end at EOS (one as its first token, in a row loaded by a refill), at a stop
    sequence or at the cap; the slots refill from the queue as they free."""
    free = np.asarray(run(PLAIN).response_tokens)
    eos = int(free[7, 0])  # row 7 is not among the first 3 slots' rows
    stop = tuple(int(t) for t in free[2, 4:6])
    config = dataclasses.replace(PLAIN, eos_id=eos, stop_sequences=(stop, (VOCAB + 1, eos)))
    lockstep = run(config)
    lengths = np.asarray(lockstep.response_length)
    assert lengths[7] == 1 and lengths[2] <= 6 and lengths.max() == CAP and lengths.min() < CAP
    assert np.any(lockstep.truncated) and not np.all(lockstep.truncated)
    for num_slots in (1, 3):
        assert_same_rows(run(dataclasses.replace(config, decode_slots=num_slots)), lockstep)


def test_slots_in_cache_groups(policy, prompts, run, monkeypatch):
    """6 slots in 3 cache groups of 2 (each group reads up to its own furthest live slot), rows
    ending at EOS and at the cap: each row still gives its lock-step tokens."""
    free = np.asarray(run(PLAIN).response_tokens)
    config = dataclasses.replace(PLAIN, eos_id=int(free[7, 0]))
    lockstep = run(config)
    assert np.any(lockstep.truncated) and not np.all(lockstep.truncated)
    monkeypatch.setattr(slots, "GROUP_SLOTS", 2)  # read while tracing the program below
    graphdef, params = policy
    bucket = ((0, 0), (32 - prompts[0].shape[1], 0))  # `generate` pads prompts to 32
    tokens, mask = (np.pad(np.repeat(x, GROUP, axis=0), bucket) for x in prompts)
    keys = sampler.row_keys(jax.random.key(0), tokens.shape[0])[1]
    grouped, _ = jax.jit(
        lambda keys: sampler.generate_rows(
            graphdef, params, 0, keys, tokens, mask, dataclasses.replace(config, decode_slots=6)
        )
    )(keys)
    assert_same_rows(grouped, lockstep)


def test_a_window_of_steps_through_the_slots(policy, prompts):
    """The rows of 3 steps stacked into one queue (as `rl_jax.step` does for a sync window),
    each row keeping its step's key: each step's rows equal that step's own lock-step call."""
    graphdef, params = policy
    rows = prompts[0].shape[0] * GROUP
    bucket = ((0, 0), (32 - prompts[0].shape[1], 0))  # `generate` pads prompts to 32
    tokens, mask = (np.pad(np.repeat(x, GROUP, axis=0), bucket) for x in prompts)
    step_keys = [jax.random.key(k) for k in range(3)]
    keys = np.concatenate([jax.random.key_data(sampler.row_keys(k, rows)[1]) for k in step_keys])
    config = dataclasses.replace(SAMPLED, decode_slots=4)
    window, slot_steps = jax.jit(
        lambda keys: sampler.generate_rows(
            graphdef,
            params,
            0,
            jax.random.wrap_key_data(keys),
            np.tile(tokens, (3, 1)),
            np.tile(mask, (3, 1)),
            config,
        )  # fmt: skip
    )(keys)
    for i, key in enumerate(step_keys):
        state = sampler.SamplerState.create(params, key)
        lockstep, _ = sampler.generate(graphdef, state, *prompts, SAMPLED, GROUP)
        assert_same_rows(
            jax.tree.map(lambda x, i=i: x[i * rows : (i + 1) * rows], window), lockstep
        )
    kept = int(np.sum(window.response_length))
    assert kept == 3 * rows * CAP
    # 4 slots x CAP steps per 4 rows, plus the 32 refills' first tokens: every slot-step kept.
    assert int(slot_steps) == kept


def test_utilization_counts_idle_slot_steps(policy, prompts, run):
    """Lock-step: rows x the longest row's steps; slots: fewer idle slot-steps."""
    free = np.asarray(run(PLAIN).response_tokens)
    config = dataclasses.replace(PLAIN, eos_id=int(free[7, 0]))
    graphdef, params = policy
    tokens, mask = (np.repeat(x, GROUP, axis=0) for x in prompts)
    keys = sampler.row_keys(jax.random.key(0), tokens.shape[0])[1]
    spent = {}
    for num_slots in (0, 2):
        rollout, spent[num_slots] = sampler.generate_rows(
            graphdef, params, 0, keys, tokens, mask,
            dataclasses.replace(config, decode_slots=num_slots),
        )  # fmt: skip
        lengths = np.asarray(rollout.response_length)
    assert lengths.min() < lengths.max() == CAP
    assert int(spent[0]) == tokens.shape[0] * CAP
    assert lengths.sum() <= int(spent[2]) < int(spent[0])


def test_decode_slots_is_validated(policy, prompts):
    with pytest.raises(ValueError, match="decode_slots"):
        SamplingConfig(eos_id=1, decode_slots=-1)
    with pytest.raises(ValueError, match="decode_slots"):
        sampler.check_slots(3, 12, 2)
