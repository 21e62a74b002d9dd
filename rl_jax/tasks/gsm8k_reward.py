"""The reward of the paper's GSM8K experiments (arXiv 2509.24203): accuracy by Hugging Face's
`math-verify`, as the authors' code (Trinity-RFT ``MathRewardFn``) checks it, plus the R1 format
score. For a problem whose dataset answer field ends in ``#### g``:

    R(y) = accuracy_weight * accuracy(y, g)
         + format_weight * (+1 if y ends in ``<think>...</think> <answer>...</answer>`` else -1)

so with the defaults (1.0, 0.1) rewards lie in {1.1, 0.9, 0.1, -0.1}.

Accuracy, and where it deliberately differs from the authors' code:

- The answer is the *first* ``<answer>...</answer>`` block, which may span several lines (the
  authors' regex has no DOTALL, so a multi-line block is missed and their parser falls back to the
  whole response). With no complete block, accuracy is 0: we never fall back to text elsewhere.
- The block is read by ``math_verify.parse`` (its default LaTeX + plain-expression extraction,
  as the authors call it) and compared with ``math_verify.verify`` against the gold number, an
  exact `sympy.Rational`. So ``0.5`` equals ``.5`` and ``1/2`` and ``\\frac{1}{2}``; ``$``, units,
  ``\\boxed{}``, ``1,000`` and trailing text are handled by math-verify; ``150%`` matches 150 or
  1.5 (math-verify accepts either reading of a percent). Where the block holds several numbers,
  math-verify's extraction decides which one is the answer (usually the last).
- Fallback: when math-verify extracts nothing from the block (e.g. ``-$5``, a Unicode minus
  ``\u22125``, ``\\$18``), when its parsing times out, or when the reward runs outside the main
  thread (math-verify's timeouts are ``signal.alarm`` based and only work there; without a
  timeout a ``9^9^9^9`` in a block would hang the run), the exact-decimal rule decides:
  `number_matches`, the last number of the block, ``$`` and thousands separators removed,
  compared exactly with the gold (``18.00`` equals ``18``, ``1/2`` does not equal ``0.5``). A
  comparison that times out counts as wrong, as in the authors' code.
- The gold number is the text after the last ``####`` of the answer field (the authors parse the
  whole field, reasoning included, as free text), or the whole field when it has no ``####``.

Format: the response must *end* (up to whitespace) with ``<think>X</think>``, optional whitespace,
``<answer>Y</answer>``, where Y holds no answer tags; anything may precede ``<think>``. The
authors' pattern uses ``re.MULTILINE``, so its ``$`` also accepts text after ``</answer>`` as long
as a line break follows the tag.

Any completion string gives a reward and never raises; only a malformed gold answer raises, or
a missing math-verify: it (and its sympy) is imported on first use, so the rest of rl_jax runs
without it (the lent GPU machines' image lacks it), and `import_math_verify` names the package.
"""

from __future__ import annotations

import dataclasses
import decimal
import logging
import math
import re
import threading
import warnings

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TIMEOUT_SECONDS = 5  # per math-verify parse and per comparison, as in the authors' code

# A number: optional minus (not glued to a preceding word or digit, so "5-3" is 5 and 3), digits
# with optional comma thousands groups, optional decimal part; or a bare decimal part (".5").
# Linear-time: no nested repeats that can backtrack on garbage.
_NUMBER = re.compile(
    r"(?:(?<![\w.])(?P<minus>[-\u2212]))?"
    r"(?:(?P<integer>\d{1,3}(?:,\d{3})+(?![\d,]\d)|\d+)(?P<fraction>\.\d+)?"
    r"|(?<![\w.])(?P<bare>\.\d+))",
    re.ASCII,
)

# math-verify logs every timeout and unparsable string at WARNING/DEBUG; a policy in training
# produces thousands of them. Its one-time "timeout disabled" warning is ours to give.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def import_math_verify():
    """The math_verify module; ImportError naming the package to install when it is missing."""
    try:
        import math_verify
    except ModuleNotFoundError as error:
        raise ImportError(
            f"the GSM8K reward needs math-verify ({error}): "
            "pip install 'math-verify>=0.9,<0.10' (a requirement of rl_jax)"
        ) from error
    return math_verify


def _numbers(text: str) -> list[decimal.Decimal]:
    """All numbers in `text`, in order, `$` and thousands separators removed."""
    values = []
    for match in _NUMBER.finditer(text.replace("$", "")):
        if match["bare"]:
            digits = "0" + match["bare"]
        else:
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


def number_matches(block: str, gold: decimal.Decimal) -> bool:
    """The exact-decimal rule (the fallback): the last number in `block` equals `gold`."""
    values = _numbers(block)
    return bool(values) and values[-1] == gold


_warned_thread = False


def math_verify_matches(
    block: str, gold: decimal.Decimal, timeout_seconds: int = TIMEOUT_SECONDS
) -> bool | None:
    """math-verify's verdict on `block` against `gold`; None when it cannot give one.

    None means: nothing could be extracted from `block`, parsing timed out, or this is not the
    main thread (where math-verify's signal-based timeouts cannot run). A comparison that times
    out is False.
    """
    global _warned_thread
    if threading.current_thread() is not threading.main_thread():
        if not _warned_thread:
            warnings.warn(
                "GSM8K reward outside the main thread: math-verify's timeouts need the main "
                "thread, so the exact-decimal rule decides accuracy here",
                RuntimeWarning,
                stacklevel=2,
            )
            _warned_thread = True
        return None
    math_verify = import_math_verify()
    import sympy  # a dependency of math-verify

    parsed = math_verify.parse(block, parsing_timeout=timeout_seconds)
    if not parsed:
        return None
    target = [sympy.Rational(str(gold)), format(gold.normalize(), "f")]
    return bool(math_verify.verify(target, parsed, timeout_seconds=timeout_seconds))


def accuracy(completion: str, gold_answer: str, timeout_seconds: int = TIMEOUT_SECONDS) -> float:
    """1.0 if the first answer block states the gold final number, else 0.0 (see module doc).

    `gold_answer` is the dataset's answer field (``... #### 72``) or just the final number.
    """
    gold = gold_number(gold_answer)
    block = answer_block(completion)
    if block is None:
        return 0.0
    verdict = math_verify_matches(block, gold, timeout_seconds)
    return float(number_matches(block, gold) if verdict is None else verdict)


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
    Set `format_weight=0` for accuracy only. `timeout_seconds`: math-verify's limit per parse
    and per comparison (whole seconds: it uses ``signal.alarm``).
    """

    accuracy_weight: float = 1.0
    format_weight: float = 0.1
    timeout_seconds: int = TIMEOUT_SECONDS

    def __post_init__(self):
        for name in ("accuracy_weight", "format_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        value = self.timeout_seconds
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"timeout_seconds must be an integer >= 1, got {value!r}")


def reward(completion: str, gold_answer: str, config: RewardConfig = RewardConfig()) -> float:
    """The combined GSM8K reward of one completion (see module doc)."""
    correct = accuracy(completion, gold_answer, config.timeout_seconds)
    return config.accuracy_weight * correct + config.format_weight * format_score(completion)
