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

from rl_jax import models
from rl_jax.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Run:
    """task: prompts and rewards; tokenizer; model_config; graphdef + params: the initial policy;
    max_response_len: the generation cap (the config's, else the task's)."""

    task: Any
    tokenizer: Any
    model_config: models.ModelConfig
    graphdef: Any
    params: Any
    max_response_len: int


def make_task(config: TrainConfig):
    if config.task == "arithmetic":
        from rl_jax.tasks import ArithmeticConfig, ArithmeticTask

        return ArithmeticTask(ArithmeticConfig(**dict(config.task_options)))
    from rl_jax.tasks.gsm8k import GSM8KTask

    return GSM8KTask(**dict(config.task_options))


def make_policy(config: TrainConfig, task) -> tuple[models.ModelConfig, Any, Any]:
    """(model_config, model, tokenizer) for `config.model`."""
    if config.model == "warm-start":
        if config.task != "arithmetic":
            raise ValueError(
                "model='warm-start' is the embedded default; it needs task='arithmetic'"
            )
        from rl_jax import warm_start

        model_config, model = warm_start.load_or_train(task)
        return (*_with_dtypes(model_config, model, config), task.tokenizer)
    dtypes = {"dtype": config.compute_dtype, "param_dtype": config.param_dtype}
    if config.model in models.config_names():
        model_config = dataclasses.replace(
            models.get_config(config.model, **dtypes), vocab_size=task.tokenizer.vocab_size
        )
        return model_config, models.init_model(model_config, config.seed), task.tokenizer
    path = pathlib.Path(config.model)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model must be 'warm-start', a preset {list(models.config_names())}, or a Hugging Face "
            f"model directory with config.json; got {config.model!r}"
        )
    model_config, model = models.load_hf_checkpoint(path, **dtypes)  # converted while loading
    return model_config, model, task.tokenizer


def _with_dtypes(model_config, model, config: TrainConfig):
    """(model_config, model) with the config's compute and parameter dtypes."""
    dtypes = {"dtype": config.compute_dtype, "param_dtype": config.param_dtype}
    if all(getattr(model_config, k) == v for k, v in dtypes.items()):
        return model_config, model
    model_config = dataclasses.replace(model_config, **dtypes)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.Decoder(model_config, rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda x: x.astype(model_config.param_dtype), nnx.state(model))
    return model_config, nnx.merge(graphdef, params)


def build_run(config: TrainConfig) -> Run:
    task = make_task(config)
    model_config, model, tokenizer = make_policy(config, task)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model_config.vocab_size}"
        )
    max_positions = getattr(model_config, "max_position_embeddings", None)
    max_response_len = config.max_response_len or task.max_response_len
    needed = task.max_prompt_len + max_response_len
    if max_positions is not None and needed > max_positions:
        raise ValueError(
            f"max_response_len={max_response_len} plus the task's prompt length "
            f"{task.max_prompt_len} exceeds the model's context of {max_positions} tokens"
        )
    graphdef, params = nnx.split(model)
    return Run(task, tokenizer, model_config, graphdef, params, max_response_len)
