"""Decoder configuration for the Qwen2 / Llama family and the named presets.

The presets carry the real shapes of the models the paper trains (arXiv 2509.24203 §5:
Qwen2.5-Instruct and Llama-3) plus a tiny CPU model for tests and the embedded tasks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3 RoPE frequency scaling (the `rope_type: "llama3"` entry of a HF config).

    Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are divided
    by `factor`, those shorter than `original_max_position_embeddings / high_freq_factor` are
    kept, and the band between interpolates linearly in `original / wavelength`.
    """

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor}, {self.high_freq_factor}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError("rope_scaling.original_max_position_embeddings must be > 0")

    def to_hf(self) -> dict[str, Any]:
        return {"rope_type": "llama3", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a decoder-only transformer (Qwen2 / Llama layout).

    `rope_scaling` is None or Llama-3 scaling, given as a `Llama3RopeScaling` or as its HF
    dict (`{"rope_type": "llama3", "factor": ..., ...}`), stored as a `Llama3RopeScaling` so
    the config stays hashable (it is static under jit). `dtype` is the compute dtype
    (activations, matmul inputs, KV cache); parameters are stored in `param_dtype`.
    Logits are always float32.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    max_position_embeddings: int = 32768

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _rope_scaling_from_dict(self.rope_scaling))
        elif self.rope_scaling is not None and not isinstance(self.rope_scaling, Llama3RopeScaling):
            raise ValueError(
                "rope_scaling must be None, a Llama3RopeScaling or a llama3 dict, got "
                f"{self.rope_scaling!r}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")

    @property
    def num_params(self) -> int:
        """Number of parameters, counted from the shapes."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
        layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * layer + d


def _rope_scaling_from_dict(scaling: dict[str, Any]) -> Llama3RopeScaling:
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; only 'llama3' is")
    fields = {f.name for f in dataclasses.fields(Llama3RopeScaling)}
    return Llama3RopeScaling(**{k: v for k, v in scaling.items() if k in fields})


_PRESETS: dict[str, ModelConfig] = {
    # ~0.4M parameters at vocab 64: the embedded tasks' policy and the test model. Callers set
    # the vocabulary with dataclasses.replace(config, vocab_size=tokenizer.vocab_size).
    "tiny": ModelConfig(
        vocab_size=64,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=384,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        tie_embeddings=True,
        max_position_embeddings=2048,
    ),
    "qwen2.5-0.5b-instruct": ModelConfig(
        vocab_size=151936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=4864,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        tie_embeddings=True,
        max_position_embeddings=32768,
    ),
    "qwen2.5-1.5b-instruct": ModelConfig(
        vocab_size=151936,
        hidden_size=1536,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        intermediate_size=8960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        tie_embeddings=True,
        max_position_embeddings=32768,
    ),
    # Qwen/Qwen2.5-7B-Instruct config.json: hidden_size 3584, intermediate_size 18944,
    # num_hidden_layers 28, num_attention_heads 28, num_key_value_heads 4 (head_dim 128),
    # vocab_size 152064, rope_theta 1e6, rms_norm_eps 1e-6, tie_word_embeddings false, q/k/v
    # bias (Qwen2), max_position_embeddings 32768.
    "qwen2.5-7b-instruct": ModelConfig(
        vocab_size=152064,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=18944,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        tie_embeddings=False,
        max_position_embeddings=32768,
    ),
    # meta-llama/Llama-3.1-8B(-Instruct) config.json: hidden_size 4096, intermediate_size 14336,
    # num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 8 (head_dim 128),
    # vocab_size 128256, rope_theta 500000, rope_scaling {rope_type llama3, factor 8.0,
    # low_freq_factor 1.0, high_freq_factor 4.0, original_max_position_embeddings 8192},
    # rms_norm_eps 1e-5, no attention bias, tie_word_embeddings false,
    # max_position_embeddings 131072.
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        rope_theta=500000.0,
        rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 8192),
        rms_norm_eps=1e-5,
        qkv_bias=False,
        tie_embeddings=False,
        max_position_embeddings=131072,
    ),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
        rope_theta=500000.0,
        rope_scaling=Llama3RopeScaling(32.0, 1.0, 4.0, 8192),
        rms_norm_eps=1e-5,
        qkv_bias=False,
        tie_embeddings=True,
        max_position_embeddings=131072,
    ),
}


def config_names() -> tuple[str, ...]:
    """Names accepted by `get_config`."""
    return tuple(_PRESETS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name`, with optional field overrides (e.g. `dtype="bfloat16"`)."""
    if name not in _PRESETS:
        raise ValueError(f"model config {name!r} is unknown; choose one of {config_names()}")
    return dataclasses.replace(_PRESETS[name], **overrides)
