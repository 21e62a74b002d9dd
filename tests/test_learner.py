"""The learner's update on a tiny random model: exact micro-batching, metrics, multi-device."""

import dataclasses
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_jax import algorithms, logprobs, models
from rl_jax.learner import Learner, TrainBatch
from rl_jax.sampler import Rollout

B, P, N, G, VOCAB = 16, 6, 8, 4, 32


def response_logits(graphdef, params, batch):
    """The full-vocabulary logits predicting each response token: the reference computation."""
    tokens = jnp.concatenate([batch.prompt_tokens, batch.response_tokens], axis=1)
    mask = jnp.concatenate([batch.prompt_mask, jnp.ones_like(batch.response_tokens)], axis=1)
    logits = models.forward(graphdef, params, tokens, attention_mask=mask)
    return logits[:, batch.prompt_tokens.shape[1] - 1 : -1]


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, N + 1, (B, 1))
    return TrainBatch(
        prompt_tokens=jnp.asarray(rng.integers(3, VOCAB, (B, P)), jnp.int32),
        prompt_mask=jnp.asarray(np.arange(P)[None] >= rng.integers(0, 3, (B, 1)), jnp.int32),
        response_tokens=jnp.asarray(rng.integers(3, VOCAB, (B, N)), jnp.int32),
        response_mask=jnp.asarray(np.arange(N)[None] < lengths, jnp.float32),
        untruncated_logp=jnp.asarray(-rng.uniform(0.5, 4, (B, N)), jnp.float32),
        rewards=jnp.asarray(rng.integers(0, 2, B), jnp.float32),
    )


def test_train_batch_from_rollout_scores_the_untruncated_distribution():
    """The behaviour side is the rollout's untruncated_logp (what the learner recomputes), not the
    truncated top-k / top-p sampled_logp; every other field is passed through."""
    batch = make_batch()
    rollout = Rollout(
        prompt_tokens=batch.prompt_tokens,
        prompt_mask=batch.prompt_mask,
        response_tokens=batch.response_tokens,
        response_mask=batch.response_mask,
        sampled_logp=batch.untruncated_logp + 0.5,  # truncated: differs from untruncated_logp
        untruncated_logp=batch.untruncated_logp,
        response_length=jnp.sum(batch.response_mask, 1).astype(jnp.int32),
        truncated=jnp.zeros((B,), bool),
        policy_version=jnp.zeros((B,), jnp.int32),
    )
    converted = TrainBatch.from_rollout(rollout, batch.rewards)
    for got, want in zip(jax.tree.leaves(converted), jax.tree.leaves(batch), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def policy():
    config = dataclasses.replace(models.get_config("tiny"), vocab_size=VOCAB)
    return nnx.split(models.init_model(config, 0))


@pytest.fixture(scope="module")
def updates(policy):
    """One GRPO update of the same batch, whole and in 4 micro-batches."""
    graphdef, params = policy
    out = {}
    for micro_batches in (1, 4):
        learner = Learner(
            graphdef, algorithms.get("grpo"), group_size=G, micro_batches=micro_batches
        )
        state = learner.init(jax.tree.map(jnp.copy, params))
        out[micro_batches] = learner.update(state, make_batch(), params, jax.random.key(0))
    return out


def test_micro_batches_equal_one_batch(updates):
    (state1, metrics1), (state4, metrics4) = updates[1], updates[4]
    assert int(state1.step) == int(state4.step) == 1
    # Adam's first step is lr * g / |g| per element: summation-order noise in a near-zero
    # gradient element can move it by up to lr (1e-4); all but a few elements agree to 1e-7.
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state4.params), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
        assert np.mean(np.abs(np.asarray(a) - np.asarray(b)) > 1e-7) < 0.02
    for name in metrics1:
        np.testing.assert_allclose(
            metrics1[name], metrics4[name], rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_metrics_before_update(policy, updates):
    graphdef, params = policy
    batch = make_batch()
    _, metrics = updates[1]
    logits = response_logits(graphdef, params, batch)
    mask = batch.response_mask
    entropy = -(jax.nn.softmax(logits) * jax.nn.log_softmax(logits)).sum(-1)
    np.testing.assert_allclose(metrics["entropy"], (entropy * mask).sum() / mask.sum(), rtol=1e-5)
    # The learner starts at the reference policy: every KL to it is 0 at the first step.
    for name in ("kl/ref", "kl/ref_k3", "kl/ref_full"):
        assert abs(float(metrics[name])) < 1e-6, name
    logp, _ = logprobs.token_logprobs(logits, batch.response_tokens)
    expected = (0.5 * (logp - batch.untruncated_logp) ** 2 * mask).sum() / mask.sum()
    np.testing.assert_allclose(metrics["kl/behaviour"], expected, rtol=1e-5)
    assert metrics["num_tokens"] == mask.sum()


def test_on_policy_ratio_is_one(policy, updates):
    graphdef, params = policy
    batch = make_batch()
    logits = response_logits(graphdef, params, batch)
    logp, _ = logprobs.token_logprobs(logits, batch.response_tokens)
    batch = batch.replace(untruncated_logp=logp)
    learner = Learner(graphdef, algorithms.get("grpo"), group_size=G)  # compiled by `updates`
    state = learner.init(jax.tree.map(jnp.copy, params))
    _, metrics = learner.update(state, batch, params, jax.random.key(0))
    for name in ("ratio/min", "ratio/max", "ratio/mean"):
        np.testing.assert_allclose(metrics[name], 1.0, atol=1e-5)
    assert float(metrics["pg_clipfrac"]) == 0.0


def test_non_finite_update_is_not_applied(policy, updates):
    """Issue 17: one NaN reward makes the grpo gradient NaN while its logged loss can read 0.0;
    the update must return the state it was given, bit for bit, and report the NaN."""
    graphdef, params = policy
    batch = make_batch()
    batch = batch.replace(rewards=batch.rewards.at[3].set(jnp.nan))
    learner = Learner(graphdef, algorithms.get("grpo"), group_size=G)  # compiled by `updates`
    state = learner.init(jax.tree.map(jnp.copy, params))
    before = jax.tree.map(np.asarray, state)  # `state` is donated to the update
    new_state, metrics = learner.update(state, batch, params, jax.random.key(0))
    assert not np.isfinite(float(metrics["grad_norm"]))
    for got, want in zip(jax.tree.leaves(new_state), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    # A finite batch through the same compiled update still moves the parameters.
    moved, metrics = learner.update(new_state, make_batch(), params, jax.random.key(0))
    assert np.isfinite(float(metrics["grad_norm"])) and int(moved.step) == 1
    moved_leaves = zip(jax.tree.leaves(moved.params), jax.tree.leaves(before.params), strict=True)
    assert any(not np.array_equal(np.asarray(a), b) for a, b in moved_leaves)


MULTI_DEVICE = textwrap.dedent(
    """
    import dataclasses, jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from rl_jax import algorithms, models, parallel
    from rl_jax.learner import Learner, _jitted_update
    from tests.test_learner import G, VOCAB, make_batch
    assert jax.device_count() == 4
    config = dataclasses.replace(models.get_config("tiny"), vocab_size=VOCAB)
    graphdef, params = nnx.split(models.init_model(config, 0))
    plain = Learner(graphdef, algorithms.get("grpo"), group_size=G, micro_batches=2)
    results, gradient_reduces = [], []
    # One device; four as XLA places the reductions; four with the mesh: one all-reduce.
    for devices, with_mesh in ((jax.devices()[:1], False), (jax.devices(), False), (jax.devices(), True)):
        mesh = parallel.make_mesh(devices=devices)
        learner = dataclasses.replace(plain, mesh=mesh if with_mesh else None)
        p = jax.device_put(params, parallel.param_shardings(params, mesh))
        batch = parallel.shard_batch(jax.device_get(make_batch()), mesh)
        state = learner.init(jax.tree.map(jnp.copy, p))
        hlo = _jitted_update.lower(learner, state, batch, p, jax.random.key(0)).compile().as_text()
        embedding, where, found = "f32[%d,%d]" % params["embed"].shape, None, []
        for line in hlo.splitlines():  # (computation, line) of the embedding gradient's all-reduces
            if line and not line[0].isspace():
                where = "entry" if line.startswith("ENTRY") else "loop"
            elif " all-reduce(" in line and embedding in line.split("=", 1)[1].split("all-reduce(")[0]:
                found.append(where)
        gradient_reduces.append(found)
        state, metrics = learner.update(state, batch, p, jax.random.key(0))
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    # XLA all-reduces in the micro-batch loop; with the mesh, once after it.
    assert "loop" in gradient_reduces[1] and gradient_reduces[2] == ["entry"], gradient_reduces
    (p1, m1), *rest = results
    for p4, m4 in rest:
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
            np.testing.assert_allclose(a, b, atol=2e-5)
            assert np.mean(np.abs(a - b) > 1e-7) < 0.02
        for k in m1:
            np.testing.assert_allclose(m1[k], m4[k], rtol=1e-5, atol=1e-6, err_msg=k)
    print("OK", len(jax.tree.leaves(p1)))
    """
)


def run_script(code: str, xla_flags: str) -> str:
    """Runs `code` in a fresh Python with `XLA_FLAGS` (read when JAX starts); returns stdout."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS=xla_flags, PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_four_devices_equal_one_device():
    out = run_script(MULTI_DEVICE, "--xla_force_host_platform_device_count=4")
    assert out.startswith("OK")


EVERY_PRESET = textwrap.dedent(
    """
    import dataclasses, jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from rl_jax import algorithms, models
    from rl_jax.learner import Learner
    from tests.test_learner import G, VOCAB, make_batch
    config = dataclasses.replace(models.get_config("tiny"), vocab_size=VOCAB)
    graphdef, params = nnx.split(models.init_model(config, 0))
    for name in algorithms.names():
        learner = Learner(graphdef, algorithms.get(name), group_size=G, ref_metrics=False)
        state = learner.init(jax.tree.map(jnp.copy, params))
        for step in range(2):
            state, metrics = learner.update(state, make_batch(step), None, jax.random.key(step))
        values = {k: float(v) for k, v in metrics.items()}
        # red/temperature is inf where adaptive RED-Weight leaves the batch unweighted.
        assert all(np.isfinite(v) for k, v in values.items() if k != "red/temperature"), values
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params)), name
        assert int(state.step) == 2 and values["grad_norm"] > 0, (name, values)
        print(name, "ok")
    """
)


def test_every_preset_trains_without_nan():
    """Two updates of every preset on the tiny model, from stale behaviour log-probs. In a
    subprocess with XLA's backend optimisations off: 15 compiles at half the compile time."""
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    assert run_script(EVERY_PRESET, flags).count(" ok") == len(algorithms.names())
