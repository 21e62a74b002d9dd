"""GSM8K: the prompt and reward of the paper's GSM8K experiments (arXiv 2509.24203).

The prompt is the DeepSeek-R1 system prompt: reason inside ``<think>...</think>``, then give the
final answer inside ``<answer>...</answer>``. The reward of a completion ``y`` for a problem whose
dataset answer field ends in ``#### g`` is

    R(y) = accuracy_weight * 1[number(first answer block of y) == g]
         + format_weight * (+1 if y ends in ``<think>...</think> <answer>...</answer>`` else -1)

so with the defaults (1.0, 0.1) rewards lie in {1.1, 0.9, 0.1, -0.1}.

Semantics, and where they deliberately differ from the authors' code (Trinity-RFT
``MathRewardFn``, which parses with ``math_verify``):

- The answer is the *first* ``<answer>...</answer>`` block, which may span several lines (the
  authors' regex has no DOTALL, so a multi-line block is missed and their parser falls back to the
  whole response). With no complete block, accuracy is 0: we never fall back to numbers elsewhere.
- The predicted number is the *last* number in that block ("16 - 3 - 4 = 9" -> 9), after removing
  ``$`` signs and thousands separators; units, percent signs, words and trailing periods around it
  are ignored; ``-5``, ``-$5``, ``$-5``, ``−5`` are negative; decimals are compared exactly, so
  ``18.00`` equals ``18`` and ``0.5`` does not equal ``1/2`` (no fractions or LaTeX algebra).
- The gold number is the text after the last ``####`` of the answer field (the authors parse the
  whole field, reasoning included, as free text), or the whole field when it has no ``####``.
- Format: the response must *end* (up to whitespace) with ``<think>X</think>``, optional
  whitespace, ``<answer>Y</answer>``, where Y holds no answer tags; anything may precede
  ``<think>``. The authors' pattern uses ``re.MULTILINE``, so its ``$`` also accepts text after
  ``</answer>`` as long as a line break follows the tag.
- Any completion string gives a reward and never raises; only a malformed gold answer raises.

`GSM8KTask` exposes the dataset (read through the TFDS builder in `rl_jax.tasks.gsm8k_builder`,
an optional dependency) to the RL loop.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import os
import re
from collections.abc import Sequence

import numpy as np

from rl_jax.tasks.base import Example

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

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# A number: optional minus (not glued to a preceding word or digit, so "5-3" is 5 and 3), digits
# with optional comma thousands groups, optional decimal part. Linear-time: no nested repeats
# that can backtrack on garbage.
_NUMBER = re.compile(
    r"(?:(?<![\w.])(?P<minus>[-\u2212]))?"
    r"(?P<integer>\d{1,3}(?:,\d{3})+(?![\d,]\d)|\d+)"
    r"(?P<fraction>\.\d+)?",
    re.ASCII,
)


def chat_messages(question: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The prompt as chat messages (system + user), for tokenizers with their own template."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]


def format_prompt(question: str, template: str = "chatml", system_prompt: str = SYSTEM_PROMPT):
    """The prompt text the policy continues: system prompt + question in a chat layout."""
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"template must be one of {sorted(CHAT_TEMPLATES)}, got {template!r}")
    return CHAT_TEMPLATES[template].format(system=system_prompt, question=question)


def _numbers(text: str) -> list[decimal.Decimal]:
    """All numbers in `text`, in order, `$` and thousands separators removed."""
    values = []
    for match in _NUMBER.finditer(text.replace("$", "")):
        digits = match["integer"].replace(",", "") + (match["fraction"] or "")
        value = decimal.Decimal(digits)
        values.append(-value if match["minus"] else value)
    return values


def gold_number(gold_answer: str) -> decimal.Decimal:
    """The final number of a GSM8K answer field: the text after its last ``####``.

    Raises:
      ValueError: the field (after ``####``, if any) does not hold exactly one number.
    """
    final = gold_answer.rsplit("####", 1)[-1]
    values = _numbers(final)
    if len(values) != 1:
        raise ValueError(f"gold answer must end in '#### <number>', got {final.strip()[:80]!r}")
    return values[0]


def answer_block(completion: str) -> str | None:
    """The text of the first complete ``<answer>...</answer>`` block, or None."""
    start = completion.find(ANSWER_OPEN)
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    end = completion.find(ANSWER_CLOSE, start)
    return None if end < 0 else completion[start:end]


def extract_answer(completion: str) -> decimal.Decimal | None:
    """The predicted number: the last number in the first answer block, or None."""
    block = answer_block(completion)
    values = _numbers(block) if block is not None else []
    return values[-1] if values else None


def accuracy(completion: str, gold_answer: str) -> float:
    """1.0 if the number in the first answer block equals the gold final number, else 0.0.

    `gold_answer` is the dataset's answer field (``... #### 72``) or just the final number.
    """
    predicted = extract_answer(completion)
    return float(predicted is not None and predicted == gold_number(gold_answer))


def is_well_formed(completion: str) -> bool:
    """Whether `completion` ends in ``<think>X</think> <answer>Y</answer>`` (see module doc)."""
    text = completion.rstrip()
    if not text.endswith(ANSWER_CLOSE):
        return False
    body = text[: -len(ANSWER_CLOSE)]
    answer_start = body.rfind(ANSWER_OPEN)
    if answer_start < 0 or ANSWER_CLOSE in body[answer_start:]:
        return False
    head = body[:answer_start].rstrip()
    return head.endswith(THINK_CLOSE) and THINK_OPEN in head[: -len(THINK_CLOSE)]


def format_score(completion: str) -> float:
    """+1.0 for a well-formed response, -1.0 otherwise (scaled by `format_weight`)."""
    return 1.0 if is_well_formed(completion) else -1.0


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Weights of the two reward parts; (1.0, 0.1) is the paper's setup.

    reward = accuracy_weight * accuracy + format_weight * format_score (format_score = +-1).
    Set `format_weight=0` for accuracy only.
    """

    accuracy_weight: float = 1.0
    format_weight: float = 0.1

    def __post_init__(self):
        for name in ("accuracy_weight", "format_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def reward(completion: str, gold_answer: str, config: RewardConfig = RewardConfig()) -> float:
    """The combined GSM8K reward of one completion (see module doc)."""
    return config.accuracy_weight * accuracy(
        completion, gold_answer
    ) + config.format_weight * format_score(completion)


@dataclasses.dataclass(frozen=True)
class GSM8KExample:
    """One GSM8K problem: `index` is its row in the source file, `answer` the full answer field."""

    index: int
    question: str
    answer: str

    @property
    def gold(self) -> decimal.Decimal:
        return gold_number(self.answer)


@dataclasses.dataclass(frozen=True)
class GSM8KConfig:
    """Options of `GSM8KTask` (the keyword arguments of `TrainConfig.task_options`).

    data_dir: directory with train.jsonl / test.jsonl in the original format, prepared through
      `gsm8k_builder.Gsm8kJsonl`; None uses the official TFDS ``gsm8k`` builder (downloads).
    tfds_data_dir: where TFDS writes the prepared array_record files (a cache).
    tokenizer: path of the policy's ``tokenizer.json`` (or its model directory); it measures
      prompts and is the task's tokenizer. A tokenizer object may be passed to `GSM8KTask`.
    template: chat layout of the prompt, a key of `CHAT_TEMPLATES`.
    max_prompt_len: prompt budget in tokens (BOS included); None = the longest prompt of both
      splits. A smaller value than that longest prompt is an error, never a silent truncation.
    max_response_len: generation cap in tokens (the paper uses 1024).
    num_eval: size of the held-out set (the first test problems); None = all 1,319.
    accuracy_weight, format_weight: see `RewardConfig`.
    """

    data_dir: str | None = None
    tfds_data_dir: str = "~/.cache/rl_jax/tfds"
    tokenizer: str | None = None
    template: str = "chatml"
    max_prompt_len: int | None = None
    max_response_len: int = 1024
    num_eval: int | None = None
    accuracy_weight: float = 1.0
    format_weight: float = 0.1

    def __post_init__(self):
        if self.template not in CHAT_TEMPLATES:
            raise ValueError(
                f"template must be one of {sorted(CHAT_TEMPLATES)}, got {self.template!r}"
            )
        for name in ("max_prompt_len", "max_response_len", "num_eval"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_response_len is None:
            raise ValueError("max_response_len must be a positive integer, got None")
        RewardConfig(self.accuracy_weight, self.format_weight)


def _load_examples(config: GSM8KConfig, split: str) -> list[GSM8KExample]:
    try:
        from rl_jax.tasks import gsm8k_builder
    except ModuleNotFoundError as error:
        raise ImportError(
            "GSM8KTask reads GSM8K through tensorflow-datasets: pip install 'rl_jax[data]'"
        ) from error

    if config.data_dir is None:
        return gsm8k_builder.load_official_split(split, config.tfds_data_dir)
    return gsm8k_builder.load_split(config.data_dir, split, config.tfds_data_dir)


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
        if tokenizer is None:
            if self.config.tokenizer is None:
                raise ValueError(
                    "tokenizer must be given (a path to tokenizer.json or a model directory): "
                    "prompt lengths are counted in the policy's tokens"
                )
            from rl_jax.tokenizer import HFTokenizer

            tokenizer = HFTokenizer(self.config.tokenizer)
        self.tokenizer = tokenizer
        self.reward_config = RewardConfig(self.config.accuracy_weight, self.config.format_weight)
        self._train = self._to_examples(_load_examples(self.config, "train"))
        test = self._to_examples(_load_examples(self.config, "test"))
        num_eval = self.config.num_eval or len(test)
        if num_eval > len(test):
            raise ValueError(f"num_eval must be at most {len(test)}, got {num_eval}")
        self._eval = test[:num_eval]
        self.max_prompt_len = self._prompt_budget(self._train + test)
        self.max_response_len = self.config.max_response_len

    def _to_examples(self, examples: Sequence[GSM8KExample]) -> list[Example]:
        template = self.config.template
        return [Example(format_prompt(ex.question, template), ex.answer) for ex in examples]

    def _prompt_budget(self, examples: Sequence[Example]) -> int:
        longest = max(len(self.tokenizer.encode(ex.prompt, add_bos=True)) for ex in examples)
        budget = self.config.max_prompt_len
        if budget is not None and budget < longest:
            raise ValueError(
                f"max_prompt_len must be at least {longest} (longest prompt), got {budget}"
            )
        return budget or longest

    def train_examples(self) -> list[Example]:
        """All training examples, in file order."""
        return list(self._train)

    def sample_prompts(self, rng: np.random.Generator | int, n: int) -> list[Example]:
        """n distinct training examples drawn uniformly (an int seed or a numpy Generator);
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

    def reward(self, completion: str, example: Example) -> float:
        return reward(completion, example.answer, self.reward_config)
