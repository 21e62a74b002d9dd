"""Tasks with verifiable rewards, found through one table (`TASKS`).

Each entry names the module of a task, its options dataclass (the fields of a run's
`task.options`) and its task class, built as `task_class(options_class(**options))`. A module is
imported when its task is first used: GSM8K's data pipeline needs the optional
tensorflow-datasets extra.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping

from rl_jax.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from rl_jax.tasks.base import Example, Seed, Task

__all__ = ["TASKS", "ArithmeticConfig", "ArithmeticTask", "Example", "Seed", "Task", "make"]


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    """Where a task lives: `module`, its options dataclass `options` and its class `task`."""

    module: str
    options: str
    task: str


TASKS = {
    "arithmetic": TaskEntry("rl_jax.tasks.arithmetic", "ArithmeticConfig", "ArithmeticTask"),
    "gsm8k": TaskEntry("rl_jax.tasks.gsm8k", "GSM8KConfig", "GSM8KTask"),
}


def _entry(name: str) -> TaskEntry:
    if name not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]


def options_class(name: str) -> type:
    """The options dataclass of task `name`."""
    entry = _entry(name)
    return getattr(importlib.import_module(entry.module), entry.options)


def make(name: str, options: Mapping) -> Task:
    """Task `name` built from its `options` (keyword fields of its options class)."""
    entry = _entry(name)
    module = importlib.import_module(entry.module)
    return getattr(module, entry.task)(getattr(module, entry.options)(**dict(options)))
