"""GSM8K for the RL loop: the prompt of the paper's GSM8K experiments (arXiv 2509.24203) and
`GSM8KTask`, which serves the dataset with the reward of `rl_jax.tasks.gsm8k_reward`.

The prompt is the DeepSeek-R1 system prompt: reason inside ``<think>...</think>``, then give the
final answer inside ``<answer>...</answer>``, in the chat layout of the policy. The dataset is read
through the TFDS builder of `rl_jax.tasks.gsm8k_builder` (the optional 'data' extra), imported
only when a task is built. Imports run one way: gsm8k -> gsm8k_builder -> gsm8k_reward.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from rl_jax import cache
from rl_jax.tasks.base import Example, Seed
from rl_jax.tasks.gsm8k_reward import (
    TIMEOUT_SECONDS,
    RewardConfig,
    accuracy,
    import_math_verify,
    reward,
)

if TYPE_CHECKING:
    from rl_jax.tasks.gsm8k_builder import GSM8KExample

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e.,\n"
    "<think> reasoning process here </think>\n<answer> answer here </answer>.\n"
)

# Chat layouts for the models of rl_jax.models: "chatml" is Qwen2.5's, "llama3" is Llama 3's
# header layout (without the date lines its template adds; the tokenizer adds the BOS token),
# "plain" is for base models.
CHAT_TEMPLATES = {
    "chatml": (
        "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama3": (
        "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "plain": "{system}\nUser: {question}\nAssistant:",
}


def chat_messages(question: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The prompt as chat messages (system + user), for tokenizers with their own template."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]


# "model": the policy's own chat template, from its tokenizer directory.
TEMPLATES = ("model", *CHAT_TEMPLATES)


def format_prompt(
    question: str, template: str = "chatml", system_prompt: str = SYSTEM_PROMPT, tokenizer=None
) -> str:
    """The prompt text the policy continues: system prompt + question in a chat layout, or in
    the model's own template (``template="model"``: `tokenizer.apply_chat_template`)."""
    if template == "model":
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError("template='model' needs a Hugging Face tokenizer with a chat template")
        return tokenizer.apply_chat_template(chat_messages(question, system_prompt))
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"template must be one of {list(TEMPLATES)}, got {template!r}")
    return CHAT_TEMPLATES[template].format(system=system_prompt, question=question)


@dataclasses.dataclass(frozen=True)
class GSM8KConfig:
    """Options of `GSM8KTask` (the fields of a run's `task.options`).

    data_dir: directory with train.jsonl / test.jsonl in the original format, prepared through
      `gsm8k_builder.Gsm8kJsonl`; None uses the official TFDS ``gsm8k`` builder (downloads).
    tfds_data_dir: where TFDS writes the prepared array_record files (a cache); None:
      `$RL_JAX_CACHE/tfds` (`rl_jax.cache`).
    tokenizer: path of the policy's ``tokenizer.json`` (or its model directory); it measures
      prompts and is the task's tokenizer. A tokenizer object may be passed to `GSM8KTask`.
    template: chat layout of the prompt: "model" (the tokenizer directory's own chat template,
      the default) or a key of `CHAT_TEMPLATES` for tokenizers without one.
    max_prompt_len: prompt budget in tokens (BOS included); None = the longest prompt of both
      splits. A smaller value than that longest prompt is an error, never a silent truncation.
    max_prompt_tokens: drop the problems whose prompt is longer than this many tokens (BOS
      included) from both splits, for a model with a short context; the count dropped is
      printed in one line. None keeps every problem.
    max_response_len: generation cap in tokens (the paper uses 1024).
    num_eval: size of the held-out set (the first test problems); None = all 1,319.
    accuracy_weight, format_weight, timeout_seconds: see `gsm8k_reward.RewardConfig`.
    """

    data_dir: str | None = None
    tfds_data_dir: str | None = None
    tokenizer: str | None = None
    template: str = "model"
    max_prompt_len: int | None = None
    max_prompt_tokens: int | None = None
    max_response_len: int = 1024
    num_eval: int | None = None
    accuracy_weight: float = 1.0
    format_weight: float = 0.1
    timeout_seconds: int = TIMEOUT_SECONDS

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {list(TEMPLATES)}, got {self.template!r}")
        for name in ("max_prompt_len", "max_prompt_tokens", "max_response_len", "num_eval"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_response_len is None:
            raise ValueError("max_response_len must be a positive integer, got None")
        RewardConfig(self.accuracy_weight, self.format_weight, self.timeout_seconds)


def _load_examples(config: GSM8KConfig, split: str) -> list[GSM8KExample]:
    try:
        from rl_jax.tasks import gsm8k_builder
    except ModuleNotFoundError as error:
        raise ImportError(
            "GSM8KTask reads GSM8K through tensorflow-datasets: pip install 'rl_jax[data]'"
        ) from error

    tfds_data_dir = config.tfds_data_dir or cache.path("tfds")
    if config.data_dir is None:
        return gsm8k_builder.load_official_split(split, tfds_data_dir)
    return gsm8k_builder.load_split(config.data_dir, split, tfds_data_dir)


class GSM8KTask:
    """GSM8K for the RL loop (the `rl_jax.tasks.Task` protocol): train split for training, the
    first `num_eval` test problems held out, reward = `reward` with the config's weights.

    An `Example`'s `prompt` is the formatted chat prompt and its `answer` the full answer field.
    """

    name = "gsm8k"

    def __init__(self, config: GSM8KConfig | None = None, *, tokenizer=None, **options):
        # `tokenizer` is either the config field (a path, as `task_options` passes it) or a
        # tokenizer object; a path must not be mistaken for an object.
        if isinstance(tokenizer, str | os.PathLike):
            options["tokenizer"], tokenizer = os.fspath(tokenizer), None
        self.config = dataclasses.replace(config or GSM8KConfig(), **options)
        import_math_verify()  # the reward's package, checked before any data is read
        if tokenizer is None:
            if self.config.tokenizer is None:
                raise ValueError(
                    "tokenizer must be given (a path to tokenizer.json or a model directory): "
                    "prompt lengths are counted in the policy's tokens"
                )
            from rl_jax import hub
            from rl_jax.tokenizer import HFTokenizer

            path = self.config.tokenizer
            if hub.is_hub_id(path):  # the model's hub id: its tokenizer files from the cache
                path = hub.resolve(path, field="task.options.tokenizer")
            tokenizer = HFTokenizer(path)
        self.tokenizer = tokenizer
        self.reward_config = RewardConfig(
            self.config.accuracy_weight, self.config.format_weight, self.config.timeout_seconds
        )
        self._train = self._to_examples(_load_examples(self.config, "train"))
        test = self._to_examples(_load_examples(self.config, "test"))
        if self.config.max_prompt_tokens is not None:
            self._train, test = self._drop_long_prompts(self._train, test)
        num_eval = self.config.num_eval or len(test)
        if num_eval > len(test):
            raise ValueError(f"num_eval must be at most {len(test)}, got {num_eval}")
        self._eval = test[:num_eval]
        self.max_prompt_len = self._prompt_budget(self._train + test)
        self.max_response_len = self.config.max_response_len

    def _to_examples(self, examples: Sequence[GSM8KExample]) -> list[Example]:
        template, tokenizer = self.config.template, self.tokenizer
        return [
            Example(format_prompt(ex.question, template, tokenizer=tokenizer), ex.answer)
            for ex in examples
        ]

    def _prompt_tokens(self, example: Example) -> int:
        return len(self.tokenizer.encode(example.prompt, add_bos=True))

    def _drop_long_prompts(self, train: list[Example], test: list[Example]):
        """(train, test) without the prompts over `max_prompt_tokens`; says how many went."""
        limit = self.config.max_prompt_tokens
        kept = [[ex for ex in split if self._prompt_tokens(ex) <= limit] for split in (train, test)]
        counts = ", ".join(
            f"{len(split) - len(k)} of {len(split)} {name}"
            for name, split, k in zip(("train", "test"), (train, test), kept, strict=True)
        )  # fmt: skip
        print(f"gsm8k: dropped {counts} problems whose prompt is over max_prompt_tokens={limit}")
        for name, k in zip(("train", "test"), kept, strict=True):
            if not k:
                raise ValueError(
                    f"task_options.max_prompt_tokens={limit} drops every {name} problem: the "
                    f"shortest prompt has {min(map(self._prompt_tokens, train + test))} tokens"
                )
        return kept[0], kept[1]

    def _prompt_budget(self, examples: Sequence[Example]) -> int:
        longest = max(self._prompt_tokens(ex) for ex in examples)
        budget = self.config.max_prompt_len
        if budget is not None and budget < longest:
            raise ValueError(
                f"max_prompt_len must be at least {longest} (longest prompt), got {budget}"
            )
        return budget or longest

    def train_examples(self) -> list[Example]:
        """All training examples, in file order."""
        return list(self._train)

    def sample_prompts(self, rng: Seed, n: int) -> list[Example]:
        """n distinct training examples drawn uniformly from `rng` (a `Seed`);
        batches are drawn independently, not as epochs."""
        if not 1 <= n <= len(self._train):
            raise ValueError(f"n must lie in [1, {len(self._train)}], got {n}")
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        return [self._train[i] for i in rng.choice(len(self._train), size=n, replace=False)]

    def eval_examples(self, n: int | None = None) -> list[Example]:
        """The first n (default all num_eval) held-out test examples."""
        if n is not None and not 1 <= n <= len(self._eval):
            raise ValueError(f"n must lie in [1, num_eval={len(self._eval)}], got {n}")
        return self._eval[:n]

    def correct(self, completion: str, example: Example) -> bool:
        """Whether the answer block holds the gold answer: the accuracy term of the reward."""
        return accuracy(completion, example.answer, self.config.timeout_seconds) > 0

    def reward(self, completion: str, example: Example) -> float:
        return reward(completion, example.answer, self.reward_config)
