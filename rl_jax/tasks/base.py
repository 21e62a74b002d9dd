"""What the RL loop needs from a task: prompts, a held-out set, a tokenizer and a reward."""

from __future__ import annotations

import dataclasses
from typing import Protocol, TypeAlias

import numpy as np

# What `Task.sample_prompts` draws from: a numpy Generator, or a seed `np.random.default_rng`
# takes (the training loop passes `(seed, step)`, so each step's prompts are fixed by both).
Seed: TypeAlias = np.random.Generator | int | tuple[int, ...]
# Set (by the CLI's -v) to show a task's one-off data preparation with its progress bars and logs.
VERBOSE_ENV = "RL_JAX_VERBOSE"


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt and the gold answer its reward is checked against (task-specific text)."""

    prompt: str
    answer: str


class Task(Protocol):
    """A verifiable-reward task (arXiv 2509.24203 §4 trains on such rewards).

    `sample_prompts` draws training prompts only; `eval_examples` is a fixed held-out set,
    disjoint from every training prompt. `max_prompt_len` counts BOS; `max_response_len` is the
    generation cap in tokens (EOS included).
    """

    name: str
    tokenizer: object
    max_prompt_len: int
    max_response_len: int

    def sample_prompts(self, rng: Seed, n: int) -> list[Example]: ...

    def eval_examples(self, n: int | None = None) -> list[Example]: ...

    def correct(self, completion: str, example: Example) -> bool:
        """Whether the completion's answer is right: the reward without format terms."""
        ...

    def reward(self, completion: str, example: Example) -> float: ...
