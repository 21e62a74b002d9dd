"""Flax decoder of the Qwen2 / Llama family, its presets and Hugging Face checkpoint I/O."""

from rl_jax.models.config import Llama3RopeScaling, ModelConfig, config_names, get_config
from rl_jax.models.decoder import (
    Decoder,
    KVCache,
    decode,
    default_positions,
    forward,
    forward_hidden,
    init_cache,
    init_model,
)
from rl_jax.models.hf import load_hf_checkpoint, save_hf_checkpoint
from rl_jax.models.memory import MemoryOptions

__all__ = [
    "Decoder",
    "KVCache",
    "MemoryOptions",
    "Llama3RopeScaling",
    "ModelConfig",
    "config_names",
    "decode",
    "default_positions",
    "forward",
    "forward_hidden",
    "get_config",
    "init_cache",
    "init_model",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
]
