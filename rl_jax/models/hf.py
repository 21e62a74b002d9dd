"""Hugging Face checkpoints (Qwen2ForCausalLM, LlamaForCausalLM) <-> `Decoder`, safetensors only.

A HF directory holds `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json` (pickled `*.bin` files are refused). HF linear weights are
`[out, in]`; ours are `[in, out]` and stacked over layers on a leading axis.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rl_jax.models.config import ModelConfig
from rl_jax.models.decoder import Decoder

SUPPORTED_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry

# (our path inside a layer, HF name inside "model.layers.{i}.", HF stores it transposed)
_LAYER_TENSORS = (
    (("input_norm", "scale"), "input_layernorm.weight", False),
    (("q_proj", "kernel"), "self_attn.q_proj.weight", True),
    (("k_proj", "kernel"), "self_attn.k_proj.weight", True),
    (("v_proj", "kernel"), "self_attn.v_proj.weight", True),
    (("q_proj", "bias"), "self_attn.q_proj.bias", False),
    (("k_proj", "bias"), "self_attn.k_proj.bias", False),
    (("v_proj", "bias"), "self_attn.v_proj.bias", False),
    (("o_proj", "kernel"), "self_attn.o_proj.weight", True),
    (("post_attn_norm", "scale"), "post_attention_layernorm.weight", False),
    (("gate_proj", "kernel"), "mlp.gate_proj.weight", True),
    (("up_proj", "kernel"), "mlp.up_proj.weight", True),
    (("down_proj", "kernel"), "mlp.down_proj.weight", True),
)
_GLOBAL_TENSORS = (
    (("embed",), "model.embed_tokens.weight", False),
    (("final_norm", "scale"), "model.norm.weight", False),
    (("lm_head",), "lm_head.weight", True),
)


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """A `ModelConfig` from a parsed HF `config.json`; `overrides` set e.g. the compute dtype."""
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and model_type not in SUPPORTED_ARCHITECTURES.values():
        raise ValueError(
            f"unsupported architecture {architectures or model_type!r}; supported: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[arch] if arch else model_type
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu'")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("unsupported: use_sliding_window=true (sliding-window attention)")
    if family == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ValueError("unsupported: Llama attention_bias / mlp_bias (o_proj and MLP biases)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: 'default', 'llama3'")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")  # fmt: skip
    absent = [k for k in required if k not in hf]
    if absent:
        raise ValueError(f"config.json lacks the fields {absent}")
    heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=rope if rope_type == "llama3" else None,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=family == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
    )
    return ModelConfig(**{**fields, **overrides})


def config_to_hf(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The HF `config.json` dict: Qwen2 when the config has q/k/v biases, else Llama."""
    family = "qwen2" if config.qkv_bias else "llama"
    arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[family]
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {**config.rope_scaling.to_hf(), "rope_theta": config.rope_theta}
    hf = {
        "architectures": [arch],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        # Both spellings: `rope_parameters` (transformers >= 5), legacy keys for older tools.
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else config.rope_scaling.to_hf(),
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    if family == "qwen2":
        hf["use_sliding_window"] = False
    else:
        hf.update(attention_bias=False, mlp_bias=False)
    return hf


def _read_json(path: pathlib.Path) -> dict:
    """A JSON object from `path`; ValueError naming the file when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _open_safetensors(file: pathlib.Path):
    try:
        return safe_open(file, framework="numpy")
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{file} is not a readable safetensors file (truncated?): {error}"
        ) from None


class _SafetensorsReader:
    """Lazy tensor access over `model.safetensors` or the shards of its index."""

    def __init__(self, path: pathlib.Path):
        single, index = path / "model.safetensors", path / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map' object")
            self.files = {name: path / shard for name, shard in weight_map.items()}
        elif single.exists():
            with _open_safetensors(single) as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            raise ValueError(
                f"{path} has neither model.safetensors nor model.safetensors.index.json "
                f"(found {found}); only safetensors checkpoints are read, never pickle files "
                "(convert a pytorch_model.bin with transformers' save_pretrained)"
            )
        self._handles: dict[pathlib.Path, Any] = {}

    def get(self, name: str) -> np.ndarray:
        file = self.files[name]
        if file not in self._handles:
            if not file.is_file():
                raise ValueError(f"{file}, the shard of tensor {name}, does not exist")
            self._handles[file] = _open_safetensors(file)
        try:
            return self._handles[file].get_tensor(name)
        except SafetensorError as error:
            raise ValueError(f"{file}: tensor {name} cannot be read: {error}") from None


# Weights are converted to `param_dtype`; an integer or boolean tensor would be a quantised or
# corrupt checkpoint, and casting it to float would load garbage silently.
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _checked(array: np.ndarray, name: str, hf_shape: tuple[int, ...], path) -> np.ndarray:
    """`array` if it has a floating dtype and the shape config.json implies (HF layout)."""
    if array.dtype.name not in _FLOAT_DTYPES:
        raise ValueError(
            f"{path}: tensor {name} has dtype {array.dtype.name}; weights must be one of "
            f"{_FLOAT_DTYPES} (integer tensors are not cast)"
        )
    if array.shape != hf_shape:
        raise ValueError(
            f"{path}: tensor {name} has shape {array.shape}, config.json implies {hf_shape}"
        )
    return array


def _expected_names(config: ModelConfig) -> list[tuple[tuple[str, ...], str, bool, bool]]:
    """(our path, HF name or per-layer suffix, transposed, per-layer) for every parameter."""
    entries = [(("layers", *p), n, t, True) for p, n, t in _LAYER_TENSORS]
    entries += [(p, n, t, False) for p, n, t in _GLOBAL_TENSORS]
    return [
        e
        for e in entries
        if not (not config.qkv_bias and e[1].endswith("_proj.bias"))
        and not (config.tie_embeddings and e[1] == "lm_head.weight")
    ]


def _get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def read_hf_config(path, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of the HF directory `path` (its config.json), without the weights."""
    config_file = pathlib.Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file} does not exist: not a Hugging Face model directory")
    return config_from_hf(_read_json(config_file), **overrides)


def load_hf_checkpoint(path, **overrides: Any) -> tuple[ModelConfig, Decoder]:
    """Read a local HF Qwen2/Llama directory into `(config, model)`.

    `overrides` replace config fields (e.g. `dtype="bfloat16"` for bfloat16 compute); the
    parameters are converted to `param_dtype` (float32). Raises ValueError naming the file or
    tensor at fault: no or broken config.json, an unsupported architecture, no safetensors file
    (pickle checkpoints are refused), a truncated file, missing or unexpected tensors, a tensor
    whose shape differs from what config.json implies, a non-float tensor.
    """
    path = pathlib.Path(path)
    config = read_hf_config(path, **overrides)
    reader = _SafetensorsReader(path)
    entries = _expected_names(config)
    layer_names = [f"model.layers.{i}.{n}" for _, n, _, per in entries if per for i in
                   range(config.num_layers)]  # fmt: skip
    wanted = set(layer_names) | {n for _, n, _, per in entries if not per}
    missing = sorted(wanted - set(reader.files))
    if missing:
        raise ValueError(f"{path}: checkpoint is missing tensors {missing}")
    ignorable = {"lm_head.weight"} if config.tie_embeddings else set()
    unexpected = sorted(
        n for n in set(reader.files) - wanted - ignorable if not n.endswith(_IGNORED_SUFFIXES)
    )
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors for {config}: {unexpected}")

    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    values = nnx.to_pure_dict(state)
    param_dtype = np.dtype(config.param_dtype)
    for ours, name, transposed, per_layer in entries:
        names = [f"model.layers.{i}.{name}" for i in range(config.num_layers)]
        shape = _get_path(values, ours).shape[1 if per_layer else 0 :]  # ours: [in, out]
        hf_shape = shape[::-1] if transposed else shape
        tensor_names = names if per_layer else [name]
        arrays = [_checked(reader.get(n), n, hf_shape, path) for n in tensor_names]
        arrays = [a.T if transposed else a for a in arrays]
        value = np.stack(arrays) if per_layer else arrays[0]
        _set_path(values, ours, jnp.asarray(value.astype(param_dtype)))
    nnx.replace_by_pure_dict(state, values)
    return config, nnx.merge(graphdef, state)


def save_hf_checkpoint(path, config: ModelConfig, model: Decoder, *, dtype: str = "float32"):
    """Write `config.json` and `model.safetensors` (tensors in `dtype`) that transformers loads
    as Qwen2ForCausalLM (q/k/v biases) or LlamaForCausalLM."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    path = pathlib.Path(path)
    if (path / "model.safetensors.index.json").exists():
        raise FileExistsError(f"{path} holds a sharded checkpoint; save into an empty directory")
    path.mkdir(parents=True, exist_ok=True)
    values = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np_dtype = jnp.dtype(dtype)  # a numpy-compatible dtype (ml_dtypes for bfloat16)
    tensors = {}
    for ours, name, transposed, per_layer in _expected_names(config):
        value = np.asarray(_get_path(values, ours))
        if per_layer:
            for i in range(config.num_layers):
                layer = value[i].T if transposed else value[i]
                tensors[f"model.layers.{i}.{name}"] = np.ascontiguousarray(layer.astype(np_dtype))
        else:
            tensors[name] = np.ascontiguousarray(
                (value.T if transposed else value).astype(np_dtype)
            )
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf = config_to_hf(config, torch_dtype=dtype)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
