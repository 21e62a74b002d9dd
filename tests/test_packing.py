"""Packed sequences in the learner (issue 31): the plan, the segment mask, and packed updates
equal to padded ones for every preset family, micro-batching, data parallelism and the loop."""

import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_jax import algorithms, models, packing
from rl_jax import config as config_lib
from rl_jax.learner import Learner, TrainBatch
from rl_jax.train import train
from tests.test_learner import run_script

B, P, N, G, VOCAB = 16, 6, 16, 4, 32


def make_batch(seed=0):
    """Very unequal rows: prompts of 1..P real tokens (left padded), responses of 1..N tokens
    with one of length 1 and one at the cap."""
    rng = np.random.default_rng(seed)
    prompt_lengths = rng.integers(1, P + 1, B)
    lengths = rng.integers(1, N + 1, B)
    lengths[[2, 5]] = 1, N
    batch = TrainBatch(
        prompt_tokens=jnp.asarray(rng.integers(3, VOCAB, (B, P)), jnp.int32),
        prompt_mask=jnp.asarray(np.arange(P)[None] >= (P - prompt_lengths)[:, None], jnp.int32),
        response_tokens=jnp.asarray(rng.integers(3, VOCAB, (B, N)), jnp.int32),
        response_mask=jnp.asarray(np.arange(N)[None] < lengths[:, None], jnp.float32),
        untruncated_logp=jnp.asarray(-rng.uniform(0.5, 4, (B, N)), jnp.float32),
        rewards=jnp.asarray(rng.integers(0, 3, B), jnp.float32),
    )
    return batch, lengths


def strided_shards(batch, micro, shards):
    """The `Learner.shard_rows` layout of `micro` micro-batches of `shards` devices."""
    return np.arange(batch).reshape(-1, micro).T.reshape(micro, shards, -1)


@pytest.mark.parametrize("micro,shards", [(1, 1), (2, 2), (4, 1)])
def test_plan_places_every_real_token_once_in_its_own_shard(micro, shards):
    batch, lengths = make_batch()
    masks = np.stack([np.asarray(batch.prompt_mask)] * 2)  # two runs share one shape
    lengths = np.stack([lengths, np.minimum(lengths, 3)])
    rows = strided_shards(B, micro, shards)
    pack = packing.plan(masks, lengths, N, rows)
    full = P + N
    _, _, packed_rows, width = pack.source.shape
    r = B // (micro * shards)
    assert pack.source.shape[:2] == (2, micro) and packed_rows % shards == 0
    assert width in packing.widths(full) and packed_rows // shards <= r
    tokens = np.concatenate([batch.prompt_tokens, batch.response_tokens], 1)
    for run in range(2):
        for m in range(micro):
            for s in range(shards):
                ids = rows[m, s]
                block = slice(s * packed_rows // shards, (s + 1) * packed_rows // shards)
                source = pack.source[run, m, block]
                segment = pack.segment[run, m, block]
                position = pack.position[run, m, block]
                packed = tokens[ids].reshape(-1)[source]
                for i, row in enumerate(ids):
                    where = segment == i + 1
                    real = np.concatenate([
                        np.asarray(batch.prompt_tokens[row])[masks[run, row] != 0],
                        np.asarray(batch.response_tokens[row, : lengths[run, row]]),
                    ])  # fmt: skip
                    np.testing.assert_array_equal(packed[where], real)
                    np.testing.assert_array_equal(position[where], np.arange(len(real)))
                    # Each response token is read from the position just before it.
                    n = lengths[run, row]
                    before = pack.target[run, row, :n]
                    np.testing.assert_array_equal(packed.reshape(-1)[before + 1], real[-n:])
                    assert np.all(segment.reshape(-1)[before] == i + 1)
                assert set(np.unique(segment)) <= set(range(len(ids) + 1))


def test_shapes_are_bounded():
    assert packing.widths(544) == (544, 272, 136, 68)
    assert [packing.row_bucket(n, 64) for n in (1, 2, 3, 17, 18, 64)] == [2, 2, 4, 18, 18, 64]
    assert {packing.row_bucket(n, 64) for n in range(1, 65)} == set(range(2, 65, 2))
    bins = packing.first_fit_decreasing(np.array([5, 1, 4, 3, 3, 2]), 6)
    assert bins == [[0, 1], [2, 5], [3, 4]]


def test_bad_plans_are_refused():
    batch, lengths = make_batch()
    mask, rows = np.asarray(batch.prompt_mask), strided_shards(B, 1, 1)
    with pytest.raises(ValueError, match="at least one prompt token"):
        packing.plan(np.zeros_like(mask), lengths, N, rows)
    with pytest.raises(ValueError, match=r"lie in \[0, 16\]"):
        packing.plan(mask, lengths + N, N, rows)
    with pytest.raises(ValueError, match="packing must be true or false"):
        Learner(None, algorithms.get("grpo"), packing="yes")
    with pytest.raises(ValueError, match="packing must be of type bool"):
        config_lib.build("embedded", packing="yes")


@pytest.fixture(scope="module")
def policy():
    config = dataclasses.replace(models.get_config("tiny"), vocab_size=VOCAB)
    graphdef, params = nnx.split(models.init_model(config, 0))
    # A policy away from its reference, so that every KL metric is non-zero.
    moved = jax.tree.map(lambda x: x * 1.05 + 0.01, params)
    return graphdef, params, moved


def _gradients(learner, params, ref_params, batch, lengths):
    pack = learner.pack(np.asarray(batch.prompt_mask), lengths, N) if learner.packing else None
    step = jax.jit(lambda p, b, r, k, pk: learner.gradients(p, b, r, k, pk))
    return jax.device_get(step(params, batch, ref_params, jax.random.key(3), pack))


def assert_same_update(padded, packed):
    """Two programs that sum in different orders (the softmax over W keys, the matmuls over
    packed rows): float32 rounding, 1e-5 relative; a gradient leaf to 1e-5 of its largest."""
    (grads, metrics), (packed_grads, packed_metrics) = padded, packed
    assert set(metrics) == set(packed_metrics)
    for name, value in metrics.items():
        np.testing.assert_allclose(packed_metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(packed_grads), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


# Every family, each preset whole or in 4 micro-batches (GRPO both).
CASES = [("grpo", 1), ("grpo", 4), ("rec-oneside-is", 1), ("rec-gspo-is", 4), ("rep-opmd", 1),
         ("rep-asymre", 4), ("red-drop", 4), ("red-weight", 1)]  # fmt: skip


@pytest.mark.parametrize("name,micro_batches", CASES)
def test_packed_update_equals_padded(policy, name, micro_batches):
    """Loss, every metric and the gradient: GRPO, REC (token and GSPO sequence ratios with the
    sequence-mean aggregation), REP, RED (drop and weight), whole and in 4 micro-batches."""
    graphdef, ref_params, params = policy
    batch, lengths = make_batch(1)
    learner = Learner(
        graphdef, algorithms.get(name), group_size=G, micro_batches=micro_batches
    )  # fmt: skip
    padded = _gradients(learner, params, ref_params, batch, lengths)
    packed = _gradients(
        dataclasses.replace(learner, packing=True), params, ref_params, batch, lengths
    )
    assert all(padded[1][k] != 0 for k in ("kl/ref", "kl/ref_full", "loss", "grad_norm"))
    assert_same_update(padded, packed)


@pytest.mark.parametrize("attention", ["xla", "chunked", "dot_product"])
def test_a_row_never_sees_another(policy, attention):
    """Every attention implementation masks by segment: changing one row's tokens leaves every
    other row's statistics bit for bit (the same compiled program), and packed statistics are
    the padded ones (float32 rounding, as in `assert_same_update`)."""
    graphdef, ref_params, params = policy
    batch, lengths = make_batch(2)
    memory = models.MemoryOptions(attention=attention, attention_chunk=4)
    learner = Learner(graphdef, algorithms.get("grpo"), group_size=G, memory=memory)
    packed = dataclasses.replace(learner, packing=True)
    pack = packed.pack(np.asarray(batch.prompt_mask), lengths, N)
    pack = pack.replace(source=pack.source[0], segment=pack.segment[0], position=pack.position[0])
    stats = jax.jit(
        lambda lrn, b, pk: lrn.response_stats(params, b, ref_params, pk), static_argnums=0
    )
    before = jax.device_get(stats(packed, batch, pack))
    changed = batch.replace(
        prompt_tokens=batch.prompt_tokens.at[7].set((batch.prompt_tokens[7] + 1) % VOCAB),
        response_tokens=batch.response_tokens.at[7].set((batch.response_tokens[7] + 5) % VOCAB),
    )
    after = jax.device_get(stats(packed, changed, pack))
    others = np.arange(B) != 7
    mask = np.asarray(batch.response_mask) > 0
    for name in before:
        np.testing.assert_array_equal(after[name][others], before[name][others], err_msg=name)
        assert not np.array_equal(after[name][7][mask[7]], before[name][7][mask[7]]), name
    padded = jax.device_get(stats(learner, batch, None))
    for name in before:
        np.testing.assert_allclose(
            before[name][mask], padded[name][mask], rtol=1e-5, atol=1e-6, err_msg=name
        )


MULTI_DEVICE = textwrap.dedent(
    """
    import dataclasses, jax, numpy as np
    from flax import nnx
    from rl_jax import algorithms, models, parallel
    from tests.test_packing import G, N, VOCAB, make_batch, assert_same_update, _gradients
    from rl_jax.learner import Learner
    assert jax.device_count() == 4
    config = dataclasses.replace(models.get_config("tiny"), vocab_size=VOCAB)
    graphdef, ref = nnx.split(models.init_model(config, 0))
    params = jax.tree.map(lambda x: x * 1.05 + 0.01, ref)
    batch, lengths = make_batch(1)
    for name, micro, fsdp in (("grpo", 1, 1), ("grpo", 4, 1), ("rec-gspo-is", 4, 1), ("grpo", 2, 2)):
        mesh = parallel.make_mesh(fsdp)
        learner = Learner(graphdef, algorithms.get(name), group_size=G, micro_batches=micro, mesh=mesh)
        assert learner.shard_rows(len(lengths)).shape[1] == 4  # each device packs its rows
        put = lambda tree: jax.device_put(tree, parallel.param_shardings(tree, mesh))
        sharded = parallel.shard_batch(jax.device_get(batch), mesh)
        padded = _gradients(learner, put(params), put(ref), sharded, lengths)
        packed = _gradients(dataclasses.replace(learner, packing=True), put(params), put(ref), sharded, lengths)
        assert_same_update(padded, packed)
        print("OK", name, micro, fsdp)
    """
)


def test_packed_equals_padded_on_four_devices():
    """Data parallelism (each device packs its own rows of each micro-batch) and fsdp."""
    out = run_script(MULTI_DEVICE, "--xla_force_host_platform_device_count=4")
    assert out.count("OK") == 4, out


def test_embedded_default_trains_the_same_packed(tmp_path):
    """The embedded default for 5 steps with packing on and off: the same rewards (the same
    tokens sampled), every metric within 1e-5 (two programs: float32 rounding)."""
    runs = {}
    for flag in (False, True):
        config = config_lib.build(
            "embedded", steps=5, eval_every=0, checkpoint_every=0, packing=flag,
            out_dir=str(tmp_path / str(flag)),
        )  # fmt: skip
        runs[flag] = train(config).metrics
    for padded, packed in zip(runs[False], runs[True], strict=True):
        assert padded["reward/mean"] == packed["reward/mean"]
        for name, value in padded.items():
            if not name.startswith(("time/", "throughput/")):
                np.testing.assert_allclose(packed[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_runs_of_several_seeds_pack_to_one_shape(tmp_path):
    """num_seeds = 2 (the runs looped in one program, each with its own rows packed into the
    shape of the larger): the same rewards and metrics as the padded runs."""
    runs = {}
    for flag in (False, True):
        config = config_lib.build(
            "embedded", steps=2, num_seeds=2, prompts_per_step=4, group_size=4, eval_every=0,
            checkpoint_every=0, learning_rate=3e-4, packing=flag, out_dir=str(tmp_path / str(flag)),
        )  # fmt: skip
        runs[flag] = train(config).run_metrics
    for padded_run, packed_run in zip(runs[False], runs[True], strict=True):
        for padded, packed in zip(padded_run, packed_run, strict=True):
            assert padded["reward/mean"] == packed["reward/mean"]
            for name, value in padded.items():
                if not name.startswith(("time/", "throughput/")):
                    np.testing.assert_allclose(
                        packed[name], value, rtol=1e-5, atol=1e-7, err_msg=name
                    )
