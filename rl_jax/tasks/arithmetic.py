"""The embedded default task: sums of small numbers, solved as a chain of partial sums.

Prompt `3+5+2+7=`; the worked solution restates each addition on the running total and ends
with the final answer after `#`:

    3+5=8+2=10+7=17#17

so a correct response's length grows with the number of terms (2 terms: 8 tokens with EOS;
5 single-digit terms: at most 24). A direct answer `#17` is also accepted. Difficulty knobs:
the number of terms and the largest operand.

Train and held-out prompts come from one seeded generator and are split by a stable hash of the
prompt text, so no held-out problem is ever a training prompt, whatever the seeds.
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import numpy as np

from rl_jax.tasks.base import Example, Seed
from rl_jax.tokenizer import CharTokenizer

_ANSWER = re.compile(r"#(-?\d+)")
_WELL_FORMED = re.compile(r"(?:\d+(?:\+\d+=\d+)+)?#\d+")
_CHAIN = re.compile(r"\d+(?:\+\d+=\d+)+#\d+")
_HASH_BUCKETS = 1000
_EVAL_STREAM = 1_000_003  # eval examples use a seed stream that training seeds never reach


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
    """Difficulty, split and reward settings of the sum task.

    min_terms/max_terms: number of operands, drawn uniformly in [min_terms, max_terms].
    max_operand: operands drawn uniformly in [0, max_operand].
    eval_fraction: share of the problem space (by prompt hash) reserved for held-out evaluation.
    num_eval: size of the fixed held-out set; eval_seed: its seed.
    format_weight: reward = correct + format_weight * (+1 if well formed else -1); 0 disables it.
    max_response_len: generation cap in tokens; None = the longest worked solution + EOS.
    """

    min_terms: int = 2
    max_terms: int = 5
    max_operand: int = 9
    eval_fraction: float = 0.1
    num_eval: int = 512
    eval_seed: int = 0
    format_weight: float = 0.0
    max_response_len: int | None = None

    def __post_init__(self):
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(
                f"min_terms and max_terms must satisfy 2 <= min_terms <= max_terms, "
                f"got min_terms={self.min_terms}, max_terms={self.max_terms}"
            )
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must lie in (0, 1), got {self.eval_fraction}")
        if self.num_eval < 1:
            raise ValueError(f"num_eval must be >= 1, got {self.num_eval}")
        if self.format_weight < 0:
            raise ValueError(f"format_weight must be >= 0, got {self.format_weight}")
        longest = longest_solution_len(self.max_terms, self.max_operand) + 1
        if self.max_response_len is not None and self.max_response_len < longest:
            raise ValueError(
                f"max_response_len must be >= {longest} (longest worked solution + EOS) for "
                f"max_terms={self.max_terms}, max_operand={self.max_operand}, "
                f"got {self.max_response_len}"
            )


def solution(terms: tuple[int, ...]) -> str:
    """The worked chain of partial sums: `a+b=s2+c=s3...#total`."""
    total = terms[0]
    steps = [str(total)]
    for term in terms[1:]:
        total += term
        steps.append(f"+{term}={total}")
    return "".join(steps) + f"#{total}"


def longest_solution_len(max_terms: int, max_operand: int) -> int:
    """Characters in the longest worked solution (every operand = max_operand)."""
    return len(solution((max_operand,) * max_terms))


def parse_terms(prompt: str) -> tuple[int, ...]:
    """Operands of a prompt `a+b+...=`."""
    return tuple(int(t) for t in prompt.rstrip("=").split("+"))


def extract_answer(completion: str) -> int | None:
    """The integer right after the first `#`, or None (never raises)."""
    match = _ANSWER.search(completion) if isinstance(completion, str) else None
    return int(match.group(1)) if match else None


def classify(completion: str) -> str:
    """Which strategy a response followed: "chain", "direct" (`#S` only) or "other"."""
    if _CHAIN.fullmatch(completion):
        return "chain"
    if completion.startswith("#") and _WELL_FORMED.fullmatch(completion):
        return "direct"
    return "other"


class ArithmeticTask:
    """Multi-operand addition with verifiable answers (see the module docstring)."""

    name = "arithmetic"

    def __init__(self, config: ArithmeticConfig | None = None):
        self.config = config or ArithmeticConfig()
        self.tokenizer = CharTokenizer()
        cfg = self.config
        digits = len(str(cfg.max_operand))
        self.max_prompt_len = 1 + cfg.max_terms * (digits + 1)  # BOS + "a+b+...="
        self.max_response_len = cfg.max_response_len or (
            longest_solution_len(cfg.max_terms, cfg.max_operand) + 1
        )
        self._eval = self._draw(
            np.random.default_rng([cfg.eval_seed, _EVAL_STREAM]), cfg.num_eval, held_out=True
        )

    def is_held_out(self, prompt: str) -> bool:
        """Held-out iff the prompt's CRC32 falls in the first eval_fraction of hash buckets."""
        bucket = zlib.crc32(prompt.encode()) % _HASH_BUCKETS
        return bucket < round(self.config.eval_fraction * _HASH_BUCKETS)

    def _draw(self, rng: np.random.Generator, n: int, held_out: bool) -> list[Example]:
        cfg = self.config
        examples = []
        while len(examples) < n:
            num_terms = int(rng.integers(cfg.min_terms, cfg.max_terms + 1))
            terms = rng.integers(0, cfg.max_operand + 1, size=num_terms).tolist()
            prompt = "+".join(map(str, terms)) + "="
            if self.is_held_out(prompt) == held_out:
                examples.append(Example(prompt=prompt, answer=str(sum(terms))))
        return examples

    def sample_prompts(self, rng: Seed, n: int) -> list[Example]:
        """n training prompts (never held-out ones) drawn from `rng` (a `Seed`)."""
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        return self._draw(rng, n, held_out=False)

    def eval_examples(self, n: int | None = None) -> list[Example]:
        """The first n (default all num_eval) examples of the fixed held-out set."""
        if n is not None and not 1 <= n <= self.config.num_eval:
            raise ValueError(f"n must lie in [1, num_eval={self.config.num_eval}], got {n}")
        return self._eval[:n]

    def correct(self, completion: str, example: Example) -> bool:
        answer = extract_answer(completion)
        return answer is not None and str(answer) == example.answer

    def reward(self, completion: str, example: Example) -> float:
        """1 for the right number after the first `#`, else 0; plus the optional format term
        +-format_weight for a (non-)well-formed response (`chain#S` or `#S`, nothing else)."""
        reward = 1.0 if self.correct(completion, example) else 0.0
        if self.config.format_weight:
            well_formed = isinstance(completion, str) and _WELL_FORMED.fullmatch(completion)
            reward += self.config.format_weight * (1.0 if well_formed else -1.0)
        return reward
