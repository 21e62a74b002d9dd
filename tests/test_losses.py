"""Tests of rl_jax.losses: hand-computed values, gradient identities, numerical safety."""

import dataclasses
import functools
import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_jax import algorithms, losses
from rl_jax.losses import LossConfig

# Every policy_loss call in this module uses one shape, [6, 5], and runs eagerly: eager dispatch
# compiles each primitive once per shape and reuses it across configs, far cheaper than one XLA
# compile per config.
SHAPE = (6, 5)


def pad(x):
    """Pad a hand-made [2, 3] (or [2]) array with zeros to SHAPE: padding rows are masked out."""
    return np.pad(x, [(0, SHAPE[i] - n) for i, n in enumerate(x.shape)]).astype(np.float32)


# A hand-checkable batch: 2 sequences, 3 positions; the last position of row 1 is padding.
LOGP = pad(np.array([[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]]))
LOG_RATIO = pad(np.array([[0.0, math.log(1.5), math.log(0.5)], [math.log(2.0), 0.0, 0.0]]))
BEHAVIOUR_LOGP = LOGP - LOG_RATIO
MASK = pad(np.array([[1, 1, 1], [1, 1, 0]]))
ADV = pad(np.array([0.5, -1.0]))
# Per-token -A * logp: row 0 [0.5, 1.0, 0.25], row 1 [-0.2, -3.0]; sum -1.45 over 5 tokens.


def loss_grad(logp, behaviour_logp, adv, mask, config, temperature=None):
    """d policy_loss / d logp."""
    return jax.grad(
        lambda lp: losses.policy_loss(
            lp, behaviour_logp, adv, mask, config, temperature=temperature
        )[0]
    )(logp)


def loss_of(name, adv=ADV, **overrides):
    config = algorithms.get(name, **overrides).loss
    loss, metrics = losses.policy_loss(LOGP, BEHAVIOUR_LOGP, adv, MASK, config)
    return float(loss), {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------- clip masks, by hand
RATIOS = np.array([0.3, 0.4, 0.5, 0.8, 1.0, 1.2, 1.5, 3.0, 3.5], np.float32)
# Expected in_range for A > 0, A = 0, A < 0 (eps = 0.2, ring eps' = (0.6, 2.0): 0.4 and 3.0).
CLIP_TABLE = {
    "none": ([1] * 9, [1] * 9, [1] * 9),
    "one-side": (
        [1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1] * 9,
        [0, 0, 0, 1, 1, 1, 1, 1, 1],
    ),
    "two-side": ([0, 0, 0, 1, 1, 1, 0, 0, 0],) * 3,
    "ring": (
        [1, 1, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 1, 1, 0, 1, 1],
        [0, 0, 0, 1, 1, 1, 0, 1, 1],
    ),
}


@pytest.mark.parametrize("clip", sorted(CLIP_TABLE))
def test_in_range_mask_by_hand_including_boundaries_and_zero_advantage(clip):
    ratio = np.tile(RATIOS, (3, 1))
    adv = np.array([1.0, 0.0, -1.0], np.float32)
    got = losses.in_range_mask(ratio, np.ones(3, np.float32), adv, LossConfig(clip=clip))
    np.testing.assert_array_equal(np.asarray(got), np.array(CLIP_TABLE[clip], bool))


def test_gspo_one_side_uses_the_sequence_ratio_with_its_tiny_epsilons():
    config = algorithms.get("rec-gspo-nois").loss
    seq_ratio = np.array([1 + 4e-4, 1 + 5e-4, 1 - 3e-4, 1 - 4e-4, 1.3, 1.3], np.float32)
    adv = np.array([1.0, 1.0, -1.0, -1.0, 0.0, -2.0], np.float32)
    token_ratio = np.ones((6, 2), np.float32)  # ignored by gspo-one-side
    got = losses.in_range_mask(token_ratio, seq_ratio, adv, config)
    expected = np.array([1, 0, 1, 0, 1, 1], bool)[:, None].repeat(2, axis=1)
    np.testing.assert_array_equal(np.asarray(got), expected)


# ---------------------------------------------------------------- policy_loss, by hand
@pytest.mark.parametrize(
    "name, overrides, expected_loss, expected_clipfrac",
    [
        ("reinforce", {}, -1.45 / 5, 0.0),
        # one-side: token (0, 1) has A > 0 and r = 1.5 > 1.2: clipped.
        ("rec-oneside-nois", {}, (0.75 - 3.2) / 5, 0.2),
        # IS weights A * r: row 0 [0.5, 0.75, 0.25], row 1 [-2, -1].
        ("rec-oneside-is", {}, (0.5 + 0.125 - 0.4 - 3.0) / 5, 0.2),
        ("grpo", {}, (0.5 + 0.125 - 0.4 - 3.0) / 5, 0.2),
        # two-side: r = 1.5, 0.5 and 2.0 are outside [0.8, 1.2].
        ("rec-twoside-nois", {}, (0.5 - 3.0) / 5, 0.6),
        ("rec-twoside-is", {}, (0.5 - 3.0) / 5, 0.6),
        # ring: A < 0 with r = 2 < 3 stays clipped; A > 0 with r = 0.5 > 0.4 too.
        ("rec-ring-nois", {}, (0.5 - 3.0) / 5, 0.6),
        ("rec-ring-nois", {"ring_eps_low": 0.5}, (0.5 + 0.25 - 3.0) / 5, 0.4),
        ("rec-ring-is", {"ring_eps_high": 1.0}, (0.5 - 0.4 - 3.0) / 5, 0.4),
        # RED-Weight: A * exp(A): 0.5 e^0.5 = 0.8243606, -e^-1 = -0.3678794.
        ("red-weight", {}, (0.8243606 * 3.5 - 0.3678794 * 3.2) / 5, 0.0),
        ("red-weight", {"weight_temp": 0.5}, (0.5 * math.e * 3.5 - math.exp(-2) * 3.2) / 5, 0.0),
        # AsymRE adds -0.1 * logp (sum of logp = -6.7); OPMD adds 0.1 * (log r)^2.
        ("rep-asymre", {}, (-1.45 + 0.67) / 5, 0.0),
        ("rep-opmd", {}, (-1.45 + 0.1 * (math.log(1.5) ** 2 + 2 * math.log(2) ** 2)) / 5, 0.0),
        # GSPO, seq-mean-token-mean: s = [0.75^(1/3), sqrt 2], both in range for these signs.
        ("rec-gspo-nois", {}, (1.75 / 3 - 3.2 / 2) / 2, 0.0),
        ("rec-gspo-is", {}, (0.5 * 0.75 ** (1 / 3) * 3.5 / 3 - math.sqrt(2) * 3.2 / 2) / 2, 0.0),
    ],
)
def test_policy_loss_by_hand(name, overrides, expected_loss, expected_clipfrac):
    loss, metrics = loss_of(name, **overrides)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["pg_clipfrac"], expected_clipfrac, atol=1e-7)


def test_gspo_clips_whole_sequences():
    # With A = +1 on row 1, its sequence ratio sqrt(2) > 1 + 4e-4: the whole row is clipped.
    loss, metrics = loss_of("rec-gspo-nois", adv=pad(np.array([0.5, 1.0])))
    np.testing.assert_allclose(loss, (1.75 / 3 + 0.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["pg_clipfrac"], 2 / 5, rtol=1e-6)


def test_ratio_metrics_by_hand():
    _, metrics = loss_of("reinforce")
    np.testing.assert_allclose(metrics["ratio/mean"], (1 + 1.5 + 0.5 + 2 + 1) / 5, rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio/min"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio/max"], 2.0, rtol=1e-6)
    assert metrics["num_tokens"] == 5 and metrics["num_sequences"] == 2
    assert metrics["ratio/log_clamped_frac"] == 0 and metrics["weight/exp_clamped_frac"] == 0


# ---------------------------------------------------------------- gradient identities
def _random_batch(seed, batch=SHAPE[0], seq=SHAPE[1]):
    rng = np.random.default_rng(seed)
    logp = -rng.gamma(1.0, 1.0, (batch, seq)).astype(np.float32)
    behaviour_logp = logp + rng.normal(0.0, 0.3, (batch, seq)).astype(np.float32)
    adv = rng.normal(0.0, 1.0, batch).astype(np.float32)
    lengths = rng.integers(1, seq + 1, batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.float32)
    return logp, behaviour_logp, adv, mask


def _expected_token_mean_grad(logp, behaviour_logp, adv, mask, config, temperature):
    """-weighted_A * in_range / num_tokens + d regulariser / d logp, computed with numpy."""
    ratio = np.exp(logp - behaviour_logp)
    seq_ratio = np.exp((np.log(ratio) * mask).sum(-1) / mask.sum(-1))
    in_range = np.asarray(losses.in_range_mask(ratio, seq_ratio, adv, config))
    weight = {
        "none": np.broadcast_to(adv[:, None], ratio.shape),
        "importance_sampling": adv[:, None] * ratio,
        "advantage": np.broadcast_to((adv * np.exp(adv / temperature))[:, None], ratio.shape),
    }[config.weight]
    reg_grad = {
        "none": 0.0,
        "forward-kl": -config.reg_coef,
        "k2": 2 * config.reg_coef * (logp - behaviour_logp),
    }[config.regularizer]
    return (-weight * in_range + reg_grad) * mask / mask.sum()


TOKEN_MEAN_PRESETS = [n for n in algorithms.names() if "gspo" not in n]


@pytest.mark.parametrize("name", TOKEN_MEAN_PRESETS)
def test_gradient_is_minus_weighted_advantage_in_range_over_num_tokens(name):
    config = algorithms.get(name).loss
    logp, behaviour_logp, adv, mask = _random_batch(seed=1)
    temps = None  # adaptive RED-Weight: per-sequence temperatures, inf = unweighted
    if config.adaptive_temp != "none":
        temps = np.array([0.9, np.inf, 2.5, 0.9, np.inf, 100.0], np.float32)
    grad = loss_grad(logp, behaviour_logp, adv, mask, config, temps)
    temperature = config.weight_temp if temps is None else temps
    expected = _expected_token_mean_grad(logp, behaviour_logp, adv, mask, config, temperature)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)


def test_gspo_gradient_is_per_sequence_token_mean():
    config = algorithms.get("rec-gspo-is", eps_low=0.2, eps_high=0.2).loss
    logp, behaviour_logp, adv, mask = _random_batch(seed=2)
    grad = loss_grad(logp, behaviour_logp, adv, mask, config)
    seq_ratio = np.exp(((logp - behaviour_logp) * mask).sum(-1) / mask.sum(-1))
    in_range = np.where(adv >= 0, seq_ratio <= 1.2, True) & np.where(
        adv <= 0, seq_ratio >= 0.8, True
    )
    expected = -(adv * seq_ratio * in_range)[:, None] * mask / mask.sum(-1, keepdims=True) / 6
    assert 0 < in_range.sum() < 6  # both branches exercised
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)


def ppo_clip_loss(logp, behaviour_logp, adv, mask, eps=0.2):
    """PPO's clipped surrogate, ratio carrying the gradient (the GRPO paper's form)."""
    ratio = jnp.exp(logp - behaviour_logp)
    surrogate = jnp.minimum(ratio * adv[:, None], jnp.clip(ratio, 1 - eps, 1 + eps) * adv[:, None])
    return -jnp.sum(surrogate * mask) / jnp.sum(mask)


@pytest.mark.parametrize("seed", [3, 4])
def test_grpo_gradient_equals_ppo_clip_gradient(seed):
    config = algorithms.get("grpo").loss
    logp, behaviour_logp, adv, mask = _random_batch(seed)
    grad = loss_grad(logp, behaviour_logp, adv, mask, config)
    ppo_grad = jax.grad(ppo_clip_loss)(logp, behaviour_logp, adv, mask)
    assert np.sum(np.asarray(grad) == 0) > np.sum(mask == 0)  # some tokens are clipped
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ppo_grad), rtol=1e-5, atol=1e-7)


def test_on_policy_oneside_is_and_nois_have_identical_gradients():
    logp, _, adv, mask = _random_batch(seed=5)

    def grad(name):
        config = algorithms.get(name).loss
        return loss_grad(logp, logp, adv, mask, config)

    np.testing.assert_array_equal(np.asarray(grad("rec-oneside-is")), grad("rec-oneside-nois"))
    assert np.abs(np.asarray(grad("rec-oneside-is"))).sum() > 0


# ---------------------------------------------------------------- shards, vmap, jit
@pytest.mark.parametrize("name", ["rec-ring-is", "rec-gspo-nois"])
def test_micro_batches_with_global_denominator_are_exact(name):
    config = algorithms.get(name, eps_low=0.2, eps_high=0.2).loss
    logp, behaviour_logp, adv, mask = _random_batch(seed=6)
    mask[2] = 0.0  # an empty sequence: excluded from both aggregations
    full_loss, full_metrics = losses.policy_loss(logp, behaviour_logp, adv, mask, config)
    # Two micro-batches: rows 0-1 and rows 2-5, each kept at SHAPE by masking the other rows.
    shard_masks = [mask * (np.arange(6) < 2)[:, None], mask * (np.arange(6) >= 2)[:, None]]
    denominator = sum(losses.loss_denominator(m, config) for m in shard_masks)
    parts = [
        losses.policy_loss(logp, behaviour_logp, adv, m, config, denominator=denominator)
        for m in shard_masks
    ]
    np.testing.assert_allclose(sum(float(p[0]) for p in parts), full_loss, rtol=1e-6)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[p[1] for p in parts])
    chex.assert_trees_all_close(losses.aggregate_metrics(stacked), full_metrics, rtol=1e-6)


def test_policy_loss_vmaps_over_micro_batches():
    config = algorithms.get("rec-oneside-is").loss
    batches = [_random_batch(seed) for seed in (7, 8)]
    stacked = [np.stack(xs) for xs in zip(*batches, strict=True)]
    vmapped, _ = jax.jit(jax.vmap(functools.partial(losses.policy_loss, config=config)))(*stacked)
    np.testing.assert_allclose(
        vmapped, [losses.policy_loss(*b, config)[0] for b in batches], rtol=1e-6
    )


class PolicyLossVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        logp, behaviour_logp, adv, mask = _random_batch(seed=9)
        for name in ("grpo", "rec-gspo-is"):
            config = algorithms.get(name).loss
            fn = self.variant(functools.partial(losses.policy_loss, config=config))
            loss, metrics = fn(logp, behaviour_logp, adv, mask)
            ref_loss, ref_metrics = losses.policy_loss(logp, behaviour_logp, adv, mask, config)
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
            chex.assert_trees_all_close(metrics, ref_metrics, rtol=1e-6)


# ---------------------------------------------------------------- numerical safety
SAFETY_CONFIGS = {  # every clip mode, weight, regulariser and aggregation
    name: algorithms.get(name).loss
    for name in ("reinforce", "grpo", "rec-twoside-is", "rec-ring-is", "rec-gspo-is")
    + ("rep-asymre", "rep-opmd", "red-weight")
}
SAFETY_CONFIGS["red-weight-temp-1e-6"] = algorithms.get("red-weight", weight_temp=1e-6).loss


@pytest.fixture(scope="module")
def value_and_grads():
    """value_and_grad of every SAFETY_CONFIGS loss, compiled once as a single program."""

    @jax.jit
    def run(logp, behaviour_logp, adv, mask):
        def fn(lp, config):
            return losses.policy_loss(lp, behaviour_logp, adv, mask, config)

        return {
            name: jax.value_and_grad(fn, has_aux=True)(logp, config)
            for name, config in SAFETY_CONFIGS.items()
        }

    return run


finite_floats = functools.partial(st.floats, allow_nan=False, allow_infinity=False, width=32)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    logp=st.lists(finite_floats(-100, 0), min_size=30, max_size=30),
    log_ratio=st.lists(finite_floats(-100, 100), min_size=30, max_size=30),
    adv=st.lists(finite_floats(-1e3, 1e3), min_size=6, max_size=6),
    lengths=st.lists(st.integers(0, 5), min_size=6, max_size=6),
)
def test_loss_and_gradient_finite_for_extreme_inputs(
    value_and_grads, logp, log_ratio, adv, lengths
):
    logp = np.array(logp, np.float32).reshape(SHAPE)
    behaviour_logp = logp - np.array(log_ratio, np.float32).reshape(SHAPE)
    mask = (np.arange(5)[None, :] < np.array(lengths)[:, None]).astype(np.float32)
    adv = np.array(adv, np.float32)
    for name, ((loss, metrics), grad) in value_and_grads(logp, behaviour_logp, adv, mask).items():
        assert np.isfinite(loss) and np.all(np.isfinite(grad)), name
        assert all(np.isfinite(v) for v in metrics.values()), name
        assert np.all(np.asarray(grad)[mask == 0] == 0), name
        if not mask.any():
            assert loss == 0, name


@pytest.mark.parametrize("length", [0, 1])
def test_empty_masks_and_single_token_sequences(value_and_grads, length):
    logp, behaviour_logp, adv, _ = _random_batch(seed=12)
    mask = (np.arange(5) < length)[None, :].repeat(6, axis=0).astype(np.float32)
    for name, ((loss, metrics), grad) in value_and_grads(logp, behaviour_logp, adv, mask).items():
        assert np.isfinite(loss) and np.all(np.isfinite(grad)), name
        assert metrics["num_tokens"] == 6 * length and np.all(np.asarray(grad)[:, 1:] == 0)
        if length == 0:
            assert loss == 0 and np.all(np.asarray(grad) == 0), name
    if length == 1:  # one token per sequence: both aggregations reduce to the same mean
        results = value_and_grads(logp, behaviour_logp, adv, mask)
        config = dataclasses.replace(SAFETY_CONFIGS["rec-gspo-is"], aggregation="token-mean")
        gspo_as_token_mean = losses.policy_loss(logp, behaviour_logp, adv, mask, config)[0]
        np.testing.assert_allclose(results["rec-gspo-is"][0][0], gspo_as_token_mean, rtol=1e-6)


def test_clamp_hits_are_counted(value_and_grads):
    logp = np.full(SHAPE, -1.0, np.float32)
    behaviour_logp = logp.copy()
    behaviour_logp[0, :2] = -101.0  # log-ratio +100 on two tokens of five
    adv = pad(np.array([500.0]))
    mask = pad(np.ones((1, 5)))
    results = value_and_grads(logp, behaviour_logp, adv, mask)
    metrics = results["grpo"][0][1]
    np.testing.assert_allclose(metrics["ratio/log_clamped_frac"], 0.4)
    np.testing.assert_allclose(metrics["ratio/max"], math.exp(20.0), rtol=1e-6)
    assert results["red-weight"][0][1]["weight/exp_clamped_frac"] == 1.0  # 500 / 1 > 20
    assert results["rec-gspo-is"][0][1]["ratio/seq_log_clamped_frac"] == 1.0  # mean 40 > 20


def test_padding_garbage_never_reaches_loss_or_gradient(value_and_grads):
    logp, behaviour_logp, adv, mask = _random_batch(seed=11)
    garbage = np.where(mask == 0, np.nan, logp).astype(np.float32)
    results = value_and_grads(garbage, np.where(mask == 0, np.inf, behaviour_logp), adv, mask)
    clean = value_and_grads(logp, behaviour_logp, adv, mask)
    chex.assert_trees_all_equal(results, clean)


# ---------------------------------------------------------------- KL estimators, by hand
def test_kl_estimators_by_hand():
    np.testing.assert_allclose(losses.kl_k1(-1.0, -2.0), 1.0)
    np.testing.assert_allclose(losses.kl_k2(-1.0, -2.0), 0.5)
    np.testing.assert_allclose(losses.kl_k3(-1.0, -2.0), math.exp(-1) - 1 + 1, rtol=1e-6)
    np.testing.assert_allclose(losses.kl_k3(-2.0, -1.0), math.e - 2, rtol=1e-6)
    assert np.isfinite(losses.kl_k3(jnp.float32(-200.0), jnp.float32(0.0)))


# ---------------------------------------------------------------- config validation
@pytest.mark.parametrize(
    "field, value",
    [
        ("clip", "three-side"),
        ("weight", "is"),
        ("regularizer", "kl"),
        ("aggregation", "sum"),
        ("eps_low", 1.5),
        ("eps_high", 0.0),
        ("ring_eps_low", -0.1),
        ("weight_temp", 0.0),
        ("reg_coef", -1.0),
        ("log_ratio_bound", 1.0),
        ("eps_high", "0.2"),
    ],
)
def test_invalid_loss_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LossConfig(**{field: value})
