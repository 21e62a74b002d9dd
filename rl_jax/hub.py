"""Models named by their Hugging Face hub id (`model=Qwen/Qwen2.5-1.5B-Instruct`).

A `model` (or GSM8K's `task_options.tokenizer`) of the form ORG/NAME that is not an existing
directory is fetched with `huggingface_hub.snapshot_download` into the cache root
(`rl_jax.cache`, part "hub"): only the files a run reads (config and generation config,
safetensors weights and their index, tokenizer files and chat template), never pickle
checkpoints. A model already in the cache is used without the network, so the hub client's
offline mode (`HF_HUB_OFFLINE=1`) runs from the cache; without a network and without a cached
copy the run stops with one line saying how to point `model=` at a local directory.
"""

from __future__ import annotations

import pathlib
import re

from rl_jax import cache

# ORG/NAME as the hub spells repository ids: letters, digits, '-', '_', '.'; no '..' or '--'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# What a run reads from a model repository.
FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as ORG/NAME and names no existing local path."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not pathlib.Path(name).exists()


def resolve(name: str, field: str = "model") -> str:
    """The local directory of hub model `name`, fetched into the cache when not there yet.

    `field` names the config field in the error: one line, ValueError, for a missing client, no
    network (or offline mode) without a cached copy, or a repository that does not exist.
    """
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ValueError(
            f"{field}={name!r} is a Hugging Face hub id, which needs `pip install huggingface_hub`;"
            f" or download the model yourself and pass {field}=<its local directory>"
        ) from None
    try:
        return huggingface_hub.snapshot_download(
            repo_id=name, cache_dir=cache.path("hub"), allow_patterns=list(FILES)
        )
    except errors.RepositoryNotFoundError:
        raise ValueError(
            f"{field}={name!r} is not a local directory, and no model of that id is on the "
            "Hugging Face hub (or it is private: log in with `hf auth login`)"
        ) from None
    except (errors.LocalEntryNotFoundError, OSError) as error:
        reason = "the hub client is in offline mode" if _offline() else "the hub cannot be reached"
        raise ValueError(
            f"{field}={name!r} is not a local directory; as a Hugging Face hub id it is not in "
            f"the cache ({cache.path('hub')}) and {reason} "
            f"({type(error).__name__}): on a machine with a network run `hf download {name} "
            f"--local-dir DIR`, copy DIR here and pass {field}=DIR"
        ) from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
