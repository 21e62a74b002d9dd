"""Issue 12's memory options compute today's function: token_stats, remat, attention, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_jax import algorithms, config, logprobs, losses, models
from rl_jax.learner import Learner
from rl_jax.models import MemoryOptions
from rl_jax.models.attention import (
    attend,
    attend_chunked,
    attend_dot_product,
    with_own_position,
)
from rl_jax.models.memory import LOOP_MAX_LAYERS
from rl_jax.optimizer import float32_moments, state_shardings
from tests.test_learner import VOCAB, G, make_batch, response_logits

RTOL = 1e-5


def _close(a, b, name=""):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("layout", ["vd", "dv"])
@pytest.mark.parametrize("chunk", [0, 3, 8])
def test_token_stats_equal_full_logits(layout, chunk):
    """logp, entropy, ref logp and exact KL from hidden states and the head, in blocks of
    `chunk` positions (3 pads 7 positions to 9), equal the full-logit definitions; so do the
    gradients of sum(w * logp) w.r.t. hidden and head."""
    rows, length, d, vocab, temp = 3, 7, 16, 40, 0.7
    keys = jax.random.split(jax.random.key(0), 5)
    hidden = jax.random.normal(keys[0], (rows, length, d))
    ref_hidden = jax.random.normal(keys[1], (rows, length, d))
    shape = (vocab, d) if layout == "vd" else (d, vocab)
    head, ref_head = (jax.random.normal(k, shape) for k in keys[2:4])
    targets = jax.random.randint(keys[4], (rows, length), 0, vocab)
    spec = "rtd,vd->rtv" if layout == "vd" else "rtd,dv->rtv"
    weights = jnp.linspace(-1.0, 2.0, rows * length).reshape(rows, length)

    def expected(h, w):
        logits, ref_logits = jnp.einsum(spec, h, w), jnp.einsum(spec, ref_hidden, ref_head)
        logp, entropy = logprobs.token_logprobs(logits, targets, temp)
        ref_logp, _ = logprobs.token_logprobs(ref_logits, targets, temp)
        kl = logprobs.full_kl_from_logits(logits, ref_logits, temp)
        return {"logp": logp, "entropy": entropy, "ref_logp": ref_logp, "full_kl": kl}

    def chunked(h, w):
        ref = (ref_hidden, ref_head)
        return logprobs.token_stats(h, w, layout, targets, temp, ref=ref, chunk=chunk)

    want, got = expected(hidden, head), jax.jit(chunked)(hidden, head)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == (rows, length)
        _close(got[name], want[name], name)
    objective = lambda fn: lambda h, w: jnp.sum(weights * fn(h, w)["logp"])
    grads = jax.grad(objective(expected), argnums=(0, 1))(hidden, head)
    chunk_grads = jax.jit(jax.grad(objective(chunked), argnums=(0, 1)))(hidden, head)
    for g, want_g in zip(chunk_grads, grads, strict=True):
        _close(g, want_g, "grad")


def test_token_stats_without_ref_and_bad_values():
    hidden, head = jnp.ones((2, 4, 8)), jnp.ones((10, 8))
    out = logprobs.token_stats(hidden, head, "vd", jnp.zeros((2, 4), jnp.int32), chunk=2)
    assert set(out) == {"logp", "entropy"}
    with pytest.raises(ValueError, match="head_layout"):
        logprobs.token_stats(hidden, head, "dd", jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="chunk"):
        logprobs.token_stats(hidden, head, "vd", jnp.zeros((2, 4), jnp.int32), chunk=-1)


def test_attention_variants_equal_xla():
    """Chunked (with query padding: 10 queries in blocks of 4) and dot_product attention equal
    `attend`, values and gradients, under grouped KV heads and left padding."""
    batch, length, heads, kv_heads, dim = 2, 10, 4, 2, 8
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, dim))
    k, v = (jax.random.normal(kk, (batch, length, kv_heads, dim)) for kk in keys[1:])
    mask = jnp.arange(length)[None] >= jnp.array([[0], [3]])
    allowed = jnp.tril(jnp.ones((length, length), bool))[None] & mask[:, None, :]
    fns = {
        "chunked": lambda q, k, v: attend_chunked(q, k, v, allowed, 4),
        "dot_product": lambda q, k, v: attend_dot_product(q, k, v, allowed),
    }
    want = attend(q, k, v, allowed)
    want_grads = jax.grad(lambda *a: jnp.sum(jnp.sin(attend(*a, allowed))), (0, 1, 2))(q, k, v)
    real = np.asarray(mask)[:, :, None, None]  # padded query rows are meaningless
    for name, fn in fns.items():
        _close(np.where(real, fn(q, k, v), 0), np.where(real, want, 0), name)
        grads = jax.grad(lambda *a, fn=fn: jnp.sum(jnp.sin(fn(*a))), (0, 1, 2))(q, k, v)
        for g, want_g in zip(grads, want_grads, strict=True):
            _close(g, want_g, name)


def test_rows_with_nothing_to_attend_to_attend_to_themselves_on_the_cudnn_path():
    """cuDNN's backward is NaN for an all-masked query row, so its mask gets the row's own
    position; rows with something to attend to keep theirs (square and cache-shaped masks)."""
    for q_len, kv_len in ((6, 6), (2, 6)):
        pad = np.arange(kv_len)[None] >= np.array([[0], [5]])  # row 1: 5 padded positions
        causal = np.arange(q_len)[:, None] + (kv_len - q_len) >= np.arange(kv_len)[None]
        allowed = causal[None] & pad[:, None, :]
        guarded = np.asarray(with_own_position(jnp.asarray(allowed)))
        empty = ~allowed.any(-1)
        np.testing.assert_array_equal(guarded[~empty], allowed[~empty])
        for b, i in zip(*np.nonzero(empty), strict=True):
            assert list(np.nonzero(guarded[b, i])[0]) == [i + kv_len - q_len]
    assert empty.sum() == 1  # the cache-shaped case has one empty row (batch 1, query 0)


@pytest.fixture(scope="module")
def tiny():
    tiny_config = dataclasses.replace(models.get_config("tiny"), vocab_size=VOCAB)
    graphdef, params = nnx.split(models.init_model(tiny_config, 0))
    _, ref_params = nnx.split(models.init_model(tiny_config, 1))  # KL metrics are not 0
    return graphdef, params, ref_params


def _loss_and_grads(learner, params, ref_params):
    batch = make_batch()
    adv = jnp.linspace(-1.0, 1.0, batch.rewards.shape[0])
    mask = batch.response_mask
    denominator = losses.loss_denominator(mask, learner.algorithm.loss)
    fn = jax.jit(jax.value_and_grad(learner._loss, has_aux=True))
    (loss, (policy_metrics, sums)), grads = fn(params, batch, adv, None, denominator, ref_params)
    return loss, {**policy_metrics, **sums}, grads


@pytest.mark.parametrize(
    ("memory", "chunk"),
    [
        (MemoryOptions(remat="full", attention="chunked", attention_chunk=4), 3),
        (MemoryOptions(remat="save-dots", attention="dot_product"), 8),
    ],
)
def test_learner_options_equal_default(tiny, memory, chunk):
    """Loss, every metric (entropy, kl/ref, kl/ref_k3, kl/ref_full included) and every
    gradient leaf agree with the default path (no remat, XLA attention, one block) and with
    the full-logit definitions of test_learner."""
    graphdef, params, ref_params = tiny
    grpo = algorithms.get("grpo")
    base = _loss_and_grads(Learner(graphdef, grpo, group_size=G), params, ref_params)
    learner = Learner(graphdef, grpo, group_size=G, memory=memory, logprob_chunk=chunk)
    loss, metrics, grads = _loss_and_grads(learner, params, ref_params)
    _close(loss, base[0], "loss")
    assert set(metrics) == set(base[1])
    for name in metrics:
        _close(metrics[name], base[1][name], name)
    for g, want in zip(jax.tree.leaves(grads), jax.tree.leaves(base[2]), strict=True):
        np.testing.assert_allclose(g, want, rtol=RTOL, atol=1e-7)
    batch = make_batch()
    logits = response_logits(graphdef, params, batch)
    entropy = logprobs.entropy_from_logits(logits)
    mask = batch.response_mask
    _close(metrics["entropy"], (entropy * mask).sum(), "entropy vs full logits")
    # Scored by the reference itself: 0 (exactly on the default path, test_train; up to
    # rounding where recomputation lets XLA fuse the two forwards differently: 1e-13 seen).
    _, at_ref, _ = _loss_and_grads(learner, params, params)
    for name in ("kl/ref", "kl/ref_k3", "kl/ref_full"):
        assert abs(float(at_ref[name])) < 1e-9, name


@pytest.mark.parametrize("remat", ["none", "full"])
def test_layer_loop_equals_layer_scan(tiny, remat):
    """The tiny model's layers as a Python loop (the default up to LOOP_MAX_LAYERS) and as a
    `lax.scan`: the same loss, metrics and gradients to float rounding. They are two programs
    (the loop is unrolled, the scan compiles one body), which XLA may fuse and vectorise
    differently on another CPU, so equality is to 1e-6 relative (2e-7 covers float32 rounding of
    one op; the sums over the batch add a few), not bit for bit."""
    graphdef, params, ref_params = tiny
    results = [
        _loss_and_grads(
            Learner(
                graphdef,
                algorithms.get("grpo"),
                group_size=G,
                memory=MemoryOptions(remat=remat, scan_layers=scan),
            ),
            params,
            ref_params,
        )  # fmt: skip
        for scan in (False, True)
    ]
    (loss, metrics, grads), (scan_loss, scan_metrics, scan_grads) = results
    assert float(loss) == pytest.approx(float(scan_loss), rel=1e-6, abs=1e-9)
    assert metrics.keys() == scan_metrics.keys()
    for name, value in metrics.items():
        assert float(value) == pytest.approx(float(scan_metrics[name]), rel=1e-6, abs=1e-9), name
    for g, want in zip(jax.tree.leaves(grads), jax.tree.leaves(scan_grads), strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-8)
    assert not MemoryOptions().scans(LOOP_MAX_LAYERS) and MemoryOptions().scans(LOOP_MAX_LAYERS + 1)
    assert MemoryOptions(scan_layers=True).scans(2) and not MemoryOptions(scan_layers=False).scans(
        28
    )


def test_bfloat16_steps_finite_with_float32_moments(tiny):
    graphdef, _, _ = tiny
    bf16 = dataclasses.replace(
        models.get_config("tiny"), vocab_size=VOCAB, dtype="bfloat16", param_dtype="bfloat16"
    )
    graphdef, params = nnx.split(models.init_model(bf16, 0))
    memory = MemoryOptions(remat="full", attention="chunked", attention_chunk=8)
    learner = Learner(graphdef, algorithms.get("grpo"), group_size=G, memory=memory,
                      logprob_chunk=4)  # fmt: skip
    state = learner.init(jax.tree.map(jnp.copy, params))
    moments = jax.tree.leaves(state.opt_state)
    assert {x.dtype for x in moments if x.ndim} == {jnp.dtype(jnp.float32)}
    for step in range(3):
        state, metrics = learner.update(state, make_batch(step), params, jax.random.key(step))
        assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    assert float(metrics["grad_norm"]) > 0


def test_float32_moments_is_adamw_for_float32_params():
    learner_tx = Learner(None, algorithms.get("grpo")).optimizer.build(steps=0)
    tx = float32_moments(learner_tx)
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    grads = {"w": jnp.ones((2, 3)) * 0.3}
    a, _ = tx.update(grads, tx.init(params), params)
    b, _ = learner_tx.update(grads, learner_tx.init(params), params)
    np.testing.assert_array_equal(a["w"], b["w"])
    assert state_shardings(tx, params) is None  # not on a mesh: XLA places the state


def test_bad_values_fail_before_compiling():
    with pytest.raises(ValueError, match="remat"):
        MemoryOptions(remat="everything")
    with pytest.raises(ValueError, match="attention"):
        MemoryOptions(attention="flash")
    with pytest.raises(ValueError, match="attention_chunk"):
        MemoryOptions(attention="chunked", attention_chunk=0)
    with pytest.raises(ValueError, match="scan_layers must be True, False or None"):
        MemoryOptions(scan_layers="yes")
    with pytest.raises(ValueError, match="logprob_chunk"):
        Learner(None, algorithms.get("grpo"), logprob_chunk=-2)
    for field, value in [
        ("remat", "all"), ("attention", "cudnn"), ("compute_dtype", "float16"),
        ("param_dtype", "int8"), ("logprob_chunk", -1),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            config.build(None, **{field: value})


def test_dtypes_reach_the_model_from_hf_and_warm_start(tmp_path):
    """HF loading converts to param_dtype while reading; build's warm-start path recasts."""
    from rl_jax import build

    tiny_config = dataclasses.replace(models.get_config("tiny"), vocab_size=VOCAB)
    model = models.init_model(tiny_config, 0)
    models.save_hf_checkpoint(tmp_path, tiny_config, model)
    loaded_config, loaded = models.load_hf_checkpoint(
        tmp_path, dtype="bfloat16", param_dtype="bfloat16"
    )
    assert (loaded_config.dtype, loaded_config.param_dtype) == ("bfloat16", "bfloat16")
    leaves = jax.tree.leaves(nnx.state(loaded))
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    run_config = config.build(None, compute_dtype="bfloat16", param_dtype="bfloat16")
    new_config, recast = build._with_dtypes(tiny_config, model, run_config.memory.dtypes)
    assert new_config.dtype == "bfloat16" and recast.config.param_dtype == "bfloat16"
    want = [x.astype(jnp.bfloat16) for x in jax.tree.leaves(nnx.state(model))]
    for a, b in zip(jax.tree.leaves(nnx.state(recast)), want, strict=True):
        np.testing.assert_array_equal(a, b)
    tokens = jnp.ones((1, 4), jnp.int32)
    assert recast(tokens).dtype == jnp.float32  # logits stay float32
