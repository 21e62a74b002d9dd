"""Turns a validated `TrainConfig` into the run's parts: task, tokenizer and initial policy.

Everything here happens before anything is compiled, so checks that need the task or the model
(the prompt must fit the context, the tokenizer must match the model's vocabulary) fail fast.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
from flax import nnx

from rl_jax import hub, models
from rl_jax.config import TrainConfig
from rl_jax.models.hf import read_hf_config
from rl_jax.tasks import Task


@dataclasses.dataclass(frozen=True)
class Run:
    """task: prompts and rewards; tokenizer; model_config; graphdef + params: the initial policy;
    max_response_len: the generation cap (the config's, else the task's)."""

    task: Task
    tokenizer: Any
    model_config: models.ModelConfig
    graphdef: Any
    params: Any
    max_response_len: int


def make_policy(config: TrainConfig, task: Task) -> tuple[models.ModelConfig, Any, Any]:
    """(model_config, model, tokenizer) for `config.model`, in the config's memory dtypes."""
    dtypes = config.memory.dtypes
    if config.model == "warm-start":
        if config.task.name != "arithmetic":
            raise ValueError(
                "model='warm-start' is the embedded default; it needs task='arithmetic'"
            )
        from rl_jax import warm_start

        model_config, model = warm_start.load_or_train(task)
        return (*_with_dtypes(model_config, model, dtypes), task.tokenizer)
    if config.model in models.config_names():
        model_config = dataclasses.replace(
            models.get_config(config.model, **dtypes), vocab_size=task.tokenizer.vocab_size
        )
        return model_config, models.init_model(model_config, config.seed), task.tokenizer
    model_config, model = models.load_hf_checkpoint(config.model, **dtypes)  # converted on load
    return model_config, model, task.tokenizer


def _with_dtypes(model_config, model, dtypes: dict[str, str]):
    """(model_config, model) with `dtypes` (`MemoryConfig.dtypes`)."""
    if all(getattr(model_config, k) == v for k, v in dtypes.items()):
        return model_config, model
    model_config = dataclasses.replace(model_config, **dtypes)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.Decoder(model_config, rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda x: x.astype(model_config.param_dtype), nnx.state(model))
    return model_config, nnx.merge(graphdef, params)


def random_weights_note(config: TrainConfig) -> str | None:
    """The line a run that starts afresh from an architecture preset prints: random weights."""
    if config.model in models.config_names():
        return f"model={config.model!r} is an architecture preset: starting from random weights"
    return None


def check_model_dir(model: str) -> None:
    """The cheap checks of a `model` that names no preset: a directory holding config.json and a
    safetensors checkpoint (`load_hf_checkpoint` reads and checks the rest)."""
    allowed = (
        f"'warm-start', a preset {list(models.config_names())}, a Hugging Face model directory "
        "or hub id (ORG/NAME)"
    )
    path = pathlib.Path(model)
    if not path.is_dir():
        raise ValueError(f"model must be {allowed}; {model!r} is none of them (no such directory)")
    found = sorted(p.name for p in path.iterdir())
    if "config.json" not in found:
        raise ValueError(f"model directory {path} has no config.json (found {found})")
    if not {"model.safetensors", "model.safetensors.index.json"} & set(found):
        raise ValueError(
            f"model directory {path} has no model.safetensors or model.safetensors.index.json "
            f"(found {found}); pickle checkpoints (pytorch_model.bin) are never loaded: convert "
            "them with transformers' save_pretrained(..., safe_serialization=True)"
        )


def check_vocab(tokenizer, vocab_size: int, model: str) -> None:
    """Every token id must index the model's embedding: the tokenizer may not be larger."""
    if tokenizer.vocab_size > vocab_size:
        name = getattr(tokenizer, "path", type(tokenizer).__name__)
        raise ValueError(
            f"the tokenizer ({name}) has {tokenizer.vocab_size} tokens, more than the "
            f"vocab_size {vocab_size} of model {model!r}: task_options.tokenizer must be the "
            "model's own tokenizer"
        )


class InputError(ValueError):
    """A bad field, file or directory found while building the run, before anything compiles.
    The CLI prints it as one ``error:`` line and exits with code 2."""


def build_run(config: TrainConfig) -> Run:
    """The run's parts; `InputError` (a ValueError) names the field or file at fault."""
    try:
        return _build_run(config)
    except ValueError as error:
        raise InputError(*error.args) from error


def _build_run(config: TrainConfig) -> Run:
    hf_dir = config.model != "warm-start" and config.model not in models.config_names()
    if hf_dir and hub.is_hub_id(config.model):  # fetched into the cache, or one error line
        config = dataclasses.replace(config, model=hub.resolve(config.model))
    if hf_dir:  # fail on a bad model directory before the data is prepared
        check_model_dir(config.model)
    task = config.task.make()
    if hf_dir:  # before the weights are read
        check_vocab(task.tokenizer, read_hf_config(config.model).vocab_size, config.model)
    model_config, model, tokenizer = make_policy(config, task)
    check_vocab(tokenizer, model_config.vocab_size, config.model)
    max_positions = getattr(model_config, "max_position_embeddings", None)
    max_response_len = config.sampling.max_response_len or task.max_response_len
    needed = task.max_prompt_len + max_response_len
    if max_positions is not None and needed > max_positions:
        raise ValueError(
            f"max_response_len={max_response_len} plus the task's prompt length "
            f"{task.max_prompt_len} (its longest prompt) exceeds the model's context of "
            f"{max_positions} tokens (max_position_embeddings of {config.model!r}): lower "
            "max_response_len, or use a model with a longer context"
        )
    graphdef, params = nnx.split(model)
    return Run(task, tokenizer, model_config, graphdef, params, max_response_len)
