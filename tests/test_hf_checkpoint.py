"""Parity with the transformers reference (Qwen2ForCausalLM, LlamaForCausalLM) and HF checkpoint I/O.

Tiny random HF models are built here, saved as safetensors (the Llama one sharded) and read back
through `load_hf_checkpoint`; logits must match the PyTorch reference to < 1e-4 in float32.
"""

import dataclasses
import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from rl_jax.models import (
    decode,
    default_positions,
    forward,
    get_config,
    init_cache,
    init_model,
    load_hf_checkpoint,
    save_hf_checkpoint,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_QWEN2 = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / "tiny-qwen2"
ATOL = 1e-4
BATCH, SEQ, PAD, PROMPT, MAX_LEN = 2, 10, 3, 6, 16
VOCAB = 96


def _hf_config(family):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, attn_implementation="eager")  # fmt: skip
    if family == "qwen2":
        return transformers.Qwen2Config(
            intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False,
            rope_theta=10000.0, rms_norm_eps=1e-6, **common,
        )  # fmt: skip
    # One KV head (multi-query), tied head, and Llama-3 scaling whose band [64/4, 64/1] puts the
    # wavelengths 2*pi*10000^(i/8) into all three regimes (kept, interpolated, divided).
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    return transformers.LlamaConfig(
        intermediate_size=96, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=10000.0,
        rope_scaling=scaling, rms_norm_eps=1e-5, **common,
    )  # fmt: skip


def _randomize(hf_model):
    """Weights far from the N(0, 0.02) init, so that a wrong layout cannot hide in tiny logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return hf_model.eval()


def _hf_logits(hf_model, tokens, attention_mask=None, position_ids=None):
    as_torch = lambda x: None if x is None else torch.tensor(np.asarray(x), dtype=torch.long)
    with torch.no_grad():
        out = hf_model(
            input_ids=as_torch(tokens),
            attention_mask=as_torch(attention_mask),
            position_ids=as_torch(position_ids),
        )
    return out.logits.float().numpy()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request, tmp_path_factory):
    """(family, HF reference model, its directory, our config, our model)."""
    family = request.param
    config = _hf_config(family)
    model_class = (
        transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM
    )
    hf_model = _randomize(model_class(config))
    path = tmp_path_factory.mktemp(family)
    hf_model.save_pretrained(path, max_shard_size="40KB" if family == "llama" else "1GB")
    sharded = (path / "model.safetensors.index.json").exists()
    assert sharded == (family == "llama")
    ours_config, ours = load_hf_checkpoint(path)
    return family, hf_model, path, ours_config, ours


@pytest.fixture(scope="module")
def batch():
    tokens = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.int32)
    mask[0, :PAD] = 0
    return tokens, mask


jit_forward = jax.jit(forward, static_argnums=0)
jit_decode = jax.jit(decode, static_argnums=0, donate_argnums=4)


def test_config_is_read(pair):
    family, _, _, config, _ = pair
    assert config.qkv_bias == (family == "qwen2")
    assert config.tie_embeddings == (family == "llama")
    assert config.num_kv_heads == (2 if family == "qwen2" else 1)
    assert (config.rope_scaling is not None) == (family == "llama")


def _ours(model, tokens, mask):
    """Our logits through the one compiled signature (tokens, positions, mask) per model."""
    return np.asarray(jit_forward(*nnx.split(model), tokens, default_positions(tokens, mask), mask))


def test_logits_parity_unpadded(pair, batch):
    _, hf_model, _, _, model = pair
    tokens, _ = batch
    ours = _ours(model, tokens, np.ones_like(tokens))
    ref = _hf_logits(hf_model, tokens)
    assert ours.shape == ref.shape == (BATCH, SEQ, VOCAB)
    assert np.abs(ref).max() > 1.0  # not trivially small
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_logits_parity_left_padded(pair, batch):
    _, hf_model, _, _, model = pair
    tokens, mask = batch
    ours = _ours(model, tokens, mask)
    ref = _hf_logits(hf_model, tokens, mask, default_positions(tokens, mask))
    assert np.isfinite(ours).all()
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)
    # The padded row's real tokens match the reference run without padding.
    unpadded = _hf_logits(hf_model, tokens[:1, PAD:])
    np.testing.assert_allclose(ours[0, PAD:], unpadded[0], atol=ATOL, rtol=0)


def test_kv_cache_decode_parity(pair, batch):
    _, hf_model, _, config, model = pair
    tokens, mask = batch
    graphdef, params = nnx.split(model)
    positions = np.asarray(default_positions(tokens, mask))
    cache = init_cache(config, BATCH, MAX_LEN)
    cache_mask = np.zeros((BATCH, MAX_LEN), np.int32)
    cache_mask[:, :PROMPT] = mask[:, :PROMPT]
    logits, cache = jit_decode(
        graphdef, params, tokens[:, :PROMPT], positions[:, :PROMPT], cache, 0, cache_mask
    )
    steps = [logits]
    for i in range(PROMPT, SEQ):
        cache_mask[:, i] = 1
        logits, cache = jit_decode(
            graphdef, params, tokens[:, i : i + 1], positions[:, i : i + 1], cache, i, cache_mask
        )
        steps.append(logits)
    stepped = np.concatenate([np.asarray(s) for s in steps], axis=1)
    ref = _hf_logits(hf_model, tokens, mask, positions)
    real = mask.astype(bool)
    np.testing.assert_allclose(stepped[real], ref[real], atol=ATOL, rtol=0)


def test_load_save_load_round_trip(pair, batch, tmp_path):
    _, hf_model, _, config, model = pair
    save_hf_checkpoint(tmp_path / "saved", config, model)
    config2, model2 = load_hf_checkpoint(tmp_path / "saved")
    assert config2 == config
    before, after = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(model2))
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    # transformers serves what we saved, with the same logits as the original reference.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "saved", attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(hf_model)
    tokens, _ = batch
    np.testing.assert_allclose(
        _hf_logits(reloaded, tokens), _hf_logits(hf_model, tokens), atol=1e-6
    )


def test_bfloat16_save_rounds_parameters(pair, tmp_path):
    _, _, _, config, model = pair
    save_hf_checkpoint(tmp_path / "bf16", config, model, dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, model2 = load_hf_checkpoint(tmp_path / "bf16")
    embed, embed2 = nnx.state(model)["embed"][...], nnx.state(model2)["embed"][...]
    assert embed2.dtype == jnp.float32
    np.testing.assert_array_equal(embed2, embed.astype(jnp.bfloat16).astype(jnp.float32))


def _copy(path, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(path, target)
    return target


def test_unsupported_architecture_is_named(pair, tmp_path):
    path = _copy(pair[2], tmp_path)
    hf = json.loads((path / "config.json").read_text())
    hf.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_hf_checkpoint(path)


def test_missing_tensor_is_named(pair, tmp_path):
    family, _, source, _, _ = pair
    if family != "qwen2":
        pytest.skip("the single-file checkpoint is the qwen2 one")
    path = _copy(source, tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"
    ):
        load_hf_checkpoint(path)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 8}))  # fmt: skip
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="only safetensors checkpoints are read, never pickle"):
        load_hf_checkpoint(tmp_path)


@pytest.mark.skipif(not TINY_QWEN2.exists(), reason=f"{TINY_QWEN2} is not present")
def test_shared_tiny_qwen2_matches_transformers():
    config, model = load_hf_checkpoint(TINY_QWEN2)
    assert (config.num_layers, config.hidden_size, config.vocab_size) == (4, 256, 512)
    assert config.qkv_bias and not config.tie_embeddings
    tokens = np.array([[272, 260, 466, 13, 23, 26, 33, 273, 28]] * 2, np.int32)
    tokens[1] = tokens[1, ::-1]
    logits = model(jnp.asarray(tokens))  # the plain call other tools rely on
    assert logits.shape == (2, 9, 512) and logits.dtype == jnp.float32
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        TINY_QWEN2, attn_implementation="eager"
    ).eval()
    np.testing.assert_allclose(logits, _hf_logits(hf_model, tokens), atol=ATOL, rtol=0)


# --- bad checkpoints: a ValueError naming the file or tensor, never a bare library error -----


@pytest.fixture
def small_checkpoint(tmp_path):
    """A 2-layer Qwen2-layout checkpoint written by `save_hf_checkpoint` (no transformers)."""
    config = dataclasses.replace(get_config("tiny"), vocab_size=64, tie_embeddings=False)
    save_hf_checkpoint(tmp_path / "ckpt", config, init_model(config, 0))
    return tmp_path / "ckpt"


def _rewrite_tensor(path, name, value):
    tensors = load_file(path / "model.safetensors")
    tensors[name] = value(tensors[name])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_or_broken_config_json_names_the_file(small_checkpoint):
    config_file = small_checkpoint / "config.json"
    config_file.write_text('{"architectures": ["Qwen2ForCausalLM"],')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(config_file))} is not valid JSON"):
        load_hf_checkpoint(small_checkpoint)
    config_file.unlink()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(config_file))} does not exist"):
        load_hf_checkpoint(small_checkpoint)


def test_truncated_safetensors_names_the_file(small_checkpoint):
    weights = small_checkpoint / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(weights))} is not a readable safetensors"
    ):
        load_hf_checkpoint(small_checkpoint)


def test_wrong_shaped_layer_tensor_is_named_with_both_shapes(small_checkpoint):
    name = "model.layers.1.mlp.up_proj.weight"  # HF layout [out, in] = [384, 128]
    _rewrite_tensor(small_checkpoint, name, lambda w: w[:-1])
    with pytest.raises(
        ValueError,
        match=re.escape(f"tensor {name} has shape (383, 128), config.json implies (384, 128)"),
    ):
        load_hf_checkpoint(small_checkpoint)


def test_integer_tensor_is_refused_not_cast(small_checkpoint):
    name = "model.layers.0.input_layernorm.weight"
    _rewrite_tensor(small_checkpoint, name, lambda w: w.astype(np.int64))
    with pytest.raises(ValueError, match=re.escape(f"tensor {name} has dtype int64")):
        load_hf_checkpoint(small_checkpoint)
    _rewrite_tensor(small_checkpoint, name, lambda w: w.astype(np.float16))  # floats are cast
    config, _ = load_hf_checkpoint(small_checkpoint)
    assert config.num_layers == 2
