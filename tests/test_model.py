"""Decoder invariants: padding, KV-cache decoding, presets, config validation, in-place cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_jax.models import (
    KVCache,
    ModelConfig,
    config_names,
    decode,
    default_positions,
    forward,
    get_config,
    init_cache,
    init_model,
)
from rl_jax.models.attention import rope_inv_freq

BATCH, LEN, PAD, PROMPT, MAX_LEN = 2, 11, 3, 7, 16
CONFIG = get_config("tiny", vocab_size=40)


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(init_model(CONFIG, seed=0))


@pytest.fixture(scope="module")
def jit_forward():
    return jax.jit(forward, static_argnums=0)


@pytest.fixture(scope="module")
def run(split_model, jit_forward):
    """logits of `tokens` `[BATCH, LEN]` under `mask` (default all ones): one compiled shape."""

    def run(tokens, mask=None):
        mask = np.ones((BATCH, LEN), np.int32) if mask is None else mask
        return jit_forward(*split_model, tokens, default_positions(tokens, mask), mask)

    return run


def _tokens(seed=1):
    return np.random.default_rng(seed).integers(3, CONFIG.vocab_size, (BATCH, LEN), np.int32)


def _left_padded_mask():
    mask = np.ones((BATCH, LEN), np.int32)
    mask[0, :PAD] = 0
    return mask


def test_logits_shape_and_dtype(run):
    logits = run(_tokens())
    assert logits.shape == (BATCH, LEN, CONFIG.vocab_size) and logits.dtype == jnp.float32


def test_causal_future_tokens_do_not_change_past_logits(run):
    tokens = _tokens()
    changed = tokens.copy()
    changed[:, 5:] = changed[:, 5:] % 7 + 3
    a, b = run(tokens), run(changed)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert float(jnp.abs(a[:, 5:] - b[:, 5:]).max()) > 1e-3


def test_left_padding_gives_same_logits_and_finite_pad_rows(run):
    tokens = _tokens()
    unpadded = run(tokens)
    # Row 0 gets PAD left-pad tokens (arbitrary ids, masked); row 1 stays unpadded.
    padded = tokens.copy()
    padded[0] = np.concatenate([[7] * PAD, tokens[0, : LEN - PAD]])
    logits = run(padded, _left_padded_mask())
    assert bool(jnp.isfinite(logits).all())
    np.testing.assert_allclose(logits[0, PAD:], unpadded[0, : LEN - PAD], atol=1e-5)
    np.testing.assert_allclose(logits[1], unpadded[1], atol=1e-5)


def test_fully_masked_row_is_finite(run):
    mask = np.ones((BATCH, LEN), np.int32)
    mask[0] = 0
    assert bool(jnp.isfinite(run(_tokens(), mask)).all())


def test_default_positions():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)
    expected = [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    np.testing.assert_array_equal(default_positions(mask, mask), expected)
    np.testing.assert_array_equal(default_positions(mask, None), [[0, 1, 2, 3, 4]] * 2)


def test_prefill_then_step_decode_matches_full_forward(split_model, run):
    graphdef, params = split_model
    jit_decode = jax.jit(decode, static_argnums=0, donate_argnums=4)
    tokens, mask = _tokens(), _left_padded_mask()
    positions = np.asarray(default_positions(tokens, mask))
    full = run(tokens, mask)
    cache = init_cache(CONFIG, BATCH, MAX_LEN)
    cache_mask = np.zeros((BATCH, MAX_LEN), np.int32)
    cache_mask[:, :PROMPT] = mask[:, :PROMPT]
    logits, cache = jit_decode(
        graphdef, params, tokens[:, :PROMPT], positions[:, :PROMPT], cache, 0, cache_mask
    )
    steps = [logits]
    for i in range(PROMPT, LEN):
        cache_mask[:, i] = 1
        logits, cache = jit_decode(
            graphdef, params, tokens[:, i : i + 1], positions[:, i : i + 1], cache, i, cache_mask
        )
        steps.append(logits)
    stepped = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(stepped[0, PAD:], full[0, PAD:], atol=1e-5)
    np.testing.assert_allclose(stepped[1], full[1], atol=1e-5)
    assert isinstance(cache, KVCache) and len(cache.k) == len(cache.v) == CONFIG.num_layers
    assert cache.k[0].shape == (BATCH, 2, 32, MAX_LEN) and cache.v[0].shape == (
        BATCH,
        2,
        MAX_LEN,
        32,
    )
    # Slots past the written prefix are untouched.
    assert max(float(jnp.abs(k[..., LEN:]).max()) for k in cache.k) == 0.0
    assert max(float(jnp.abs(v[:, :, LEN:]).max()) for v in cache.v) == 0.0


def test_rope_inv_freq_default_and_llama3_scaling():
    config = get_config("tiny", head_dim=8, num_heads=2, num_kv_heads=1, rope_theta=10000.0)
    np.testing.assert_allclose(rope_inv_freq(config), [1.0, 0.1, 0.01, 0.001], rtol=1e-6)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    scaled = rope_inv_freq(dataclasses.replace(config, rope_scaling=scaling))
    # wavelengths 2*pi*[1, 10, 100, 1000] against the band [64/4, 64/1] = [16, 64]:
    # kept, interpolated (smooth = (64/62.83 - 1)/3), divided by 8, divided by 8.
    smooth = (64 / (2 * np.pi * 10) - 1) / 3
    expected = [1.0, (1 - smooth) * 0.1 / 8 + smooth * 0.1, 0.01 / 8, 0.001 / 8]
    np.testing.assert_allclose(scaled, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tiny", 402_560),
        ("qwen2.5-0.5b-instruct", 494_032_768),
        ("qwen2.5-1.5b-instruct", 1_543_714_304),
        ("llama-3.2-1b", 1_235_814_400),
        ("qwen2.5-7b-instruct", 7_615_616_512),  # the published safetensors totals
        ("llama-3.1-8b", 8_030_261_248),
    ],
)
def test_preset_parameter_counts(name, expected):
    config = get_config(name)
    assert config.num_params == expected
    abstract = nnx.eval_shape(lambda: init_model(config, 0))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract))) == expected


def test_config_names_and_validation():
    assert set(config_names()) == {
        "tiny", "qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct", "qwen2.5-7b-instruct",
        "llama-3.1-8b", "llama-3.2-1b",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown"):
        get_config("gpt2")
    with pytest.raises(ValueError, match="num_kv_heads"):
        get_config("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        get_config("tiny", dtype="int8")
    with pytest.raises(ValueError, match="hidden_size"):
        get_config("tiny", hidden_size=0)
    with pytest.raises(ValueError, match="'yarn'"):
        get_config("tiny", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert isinstance(hash(get_config("llama-3.2-1b")), int)
    assert isinstance(get_config("tiny"), ModelConfig)


def test_vmap_over_seeds_and_bfloat16_compute(split_model, jit_forward, run):
    graphdef, params = split_model
    tokens = _tokens()
    seed_params = jax.vmap(lambda s: nnx.state(init_model(CONFIG, s)))(jnp.arange(2))
    vmapped = jax.jit(jax.vmap(forward, in_axes=(None, 0, None)), static_argnums=0)
    logits = vmapped(graphdef, seed_params, tokens)  # default positions, no mask
    reference = run(tokens)
    np.testing.assert_allclose(logits[0], reference, atol=1e-5)
    assert float(jnp.abs(logits[1] - logits[0]).max()) > 1e-3
    bf16 = dataclasses.replace(CONFIG, dtype="bfloat16")
    bf16_graphdef, bf16_params = nnx.split(nnx.eval_shape(lambda: init_model(bf16, 0)))
    assert bf16_params["embed"].get_value().dtype == jnp.float32
    assert init_cache(bf16, BATCH, MAX_LEN).k[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(jit_forward(bf16_graphdef, params, tokens), reference, atol=0.05)


def test_init_distribution(split_model):
    _, params = split_model
    values = nnx.to_pure_dict(params)
    np.testing.assert_array_equal(values["final_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(values["layers"]["q_proj"]["bias"], 0.0)
    for matrix in (values["embed"], values["layers"]["down_proj"]["kernel"]):
        assert abs(float(matrix.std()) - 0.02) < 1e-3 and abs(float(matrix.mean())) < 1e-3


def test_donated_decode_step_updates_cache_in_place():
    """memory_analysis: the donated cache is aliased by the output and never copied whole."""
    config = get_config("tiny", vocab_size=40, num_layers=4)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(config, 0)))
    batch, max_len = 4, 1024
    cache = jax.eval_shape(lambda: init_cache(config, batch, max_len))
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    token = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    cache_mask = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)
    args = (graphdef, params, token, token, cache, jnp.int32(5), cache_mask)
    donated = jax.jit(decode, static_argnums=0, donate_argnums=4).lower(*args).compile()
    copied = jax.jit(decode, static_argnums=0).lower(*args).compile()
    donated_mem, copied_mem = donated.memory_analysis(), copied.memory_analysis()
    assert donated_mem.alias_size_in_bytes == cache_bytes
    assert copied_mem.alias_size_in_bytes == 0
    # Scratch holds activations, not a copy of the cache or of one layer's keys/values.
    assert donated_mem.temp_size_in_bytes < cache_bytes / 2
