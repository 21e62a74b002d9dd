"""The GSM8K reward: math-verify accuracy (with its exact-decimal fallback) and the R1 format
score; expected verdicts are written by hand."""

import json
import pathlib
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rl_jax.tasks import gsm8k_reward as reward_lib

GSM8K_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def _formatted(reasoning: str, final: str) -> str:
    return f"<think>{reasoning}</think> <answer>{final}</answer>"


@pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason=f"{GSM8K_DIR} is absent")
def test_gold_solution_of_every_test_problem_gets_full_accuracy():
    rows = [json.loads(line) for line in (GSM8K_DIR / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 1319
    for row in rows:
        reasoning, final = row["answer"].rsplit("####", 1)
        gold = row["answer"]
        assert reward_lib.accuracy(_formatted(reasoning.strip(), final.strip()), gold) == 1.0, row
        wrong = str(reward_lib.gold_number(gold) + 1)
        assert reward_lib.accuracy(_formatted(reasoning, wrong), gold) == 0.0, row


@pytest.mark.parametrize(
    "answer_text, gold",
    [
        ("18", "#### 18"),
        ("$18", "#### 18"),
        ("$18.", "#### 18"),
        ("18 dollars", "#### 18"),
        ("She makes $18 every day.", "#### 18"),
        ("16 - 3 - 4 = 9, so 9 * 2 = 18", "#### 18"),
        ("\nThe answer is:\n$70,000\n", "#### 70000"),
        ("70000", "#### 70,000"),
        ("1,575,000 km", "#### 1,575,000"),
        ("18.00", "#### 18"),
        ("-5", "#### -5"),
        ("-$5", "#### -5"),  # math-verify extracts nothing: the exact-decimal fallback
        ("$-5", "#### -5"),
        ("\u22125 degrees", "#### -5"),  # Unicode minus: the fallback
        ("4.5 cookies", "#### 4.5"),
        ("150%", "#### 150"),
        ("\\boxed{18}", "#### 18"),
        ("$\\boxed{18}$ dollars", "#### 18"),
        ("0.5", "#### .5"),  # the example: the gold's bare decimal
        (".5", "#### 0.5"),
        ("1/2", "#### 0.5"),
        ("\\frac{1}{2}", "#### 0.5"),
        ("$\\frac{9}{2}$ hours", "#### 4.5"),
        ("\\$18", "#### 18"),  # escaped dollar: the fallback
        ("The answer is 18.", "#### 18"),
        ("x = 18", "#### 18"),
    ],
)
def test_accuracy_accepts_answer_variants(answer_text, gold):
    assert reward_lib.accuracy(_formatted("...", answer_text), "steps\n" + gold) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "<think>...</think> <answer>17</answer>",  # wrong number
        "<think>...</think> <answer>-18</answer>",  # wrong sign
        "<think>...</think> <answer>18.5</answer>",  # wrong decimal
        "<think>...</think> <answer>180</answer>",
        "<think>...</think> <answer>1,8</answer>",  # math-verify reads a decimal comma: 1.8
        "<think>...</think> <answer>1.8</answer>",
        "<think>...</think> <answer>18/10</answer>",
        "<think>...</think> <answer></answer>",
        "<think>...</think> <answer>eighteen</answer>",
        "<think>18</think> the answer is 18",  # no answer block: no fallback to the text
        "<think>...</think> <answer>18",  # truncated block
        "<think>...</think> <answer>17</answer> <answer>18</answer>",  # first block counts
        "<answer>5</answer>",
        "",
    ],
)
def test_accuracy_rejects_wrong_or_missing_answers(completion):
    assert reward_lib.accuracy(completion, "#### 18") == 0.0


def test_gold_number_reads_bare_decimals_and_rejects_garbage():
    assert str(reward_lib.gold_number("#### .5")) == "0.5"
    assert str(reward_lib.gold_number("... #### -1,200")) == "-1200"
    for bad in ("#### seven", "#### 1 and 2", ""):
        with pytest.raises(ValueError, match="gold answer must end in"):
            reward_lib.gold_number(bad)


def test_comparison_timeout_counts_as_wrong_and_returns_promptly():
    start = time.perf_counter()
    # sympy would evaluate this power tower for ever; math-verify's alarm stops it.
    assert reward_lib.accuracy(_formatted("", "9^9^9^9"), "#### 18", timeout_seconds=1) == 0.0
    assert time.perf_counter() - start < 4


def test_outside_the_main_thread_the_exact_decimal_rule_decides():
    results = {}

    def score():
        with pytest.warns(RuntimeWarning, match="outside the main thread"):
            results["half"] = reward_lib.accuracy(_formatted("", "1/2"), "#### 0.5")
        results["plain"] = reward_lib.accuracy(_formatted("", "$18"), "#### 18")

    reward_lib._warned_thread = False
    thread = threading.Thread(target=score)
    thread.start()
    thread.join()
    # The decimal rule reads "1/2" as 2; in the main thread math-verify reads one half.
    assert results == {"half": 0.0, "plain": 1.0}
    assert reward_lib.accuracy(_formatted("", "1/2"), "#### 0.5") == 1.0


@pytest.mark.parametrize(
    "completion, well_formed",
    [
        ("<think>a</think> <answer>1</answer>", True),
        ("<think>a</think><answer>1</answer>", True),
        ("<think>\na\n</think>\n<answer>\n1\n</answer>\n\n", True),
        ("Let me think. <think>a</think> <answer>1</answer>", True),
        ("<think>a</think> <answer>1</answer> done", False),
        ("<think>a</think> <answer>1</answer>\nmore text", False),  # the authors' MULTILINE $
        ("<think>a</think> x <answer>1</answer>", False),
        ("<answer>1</answer>", False),
        ("a</think> <answer>1</answer>", False),
        ("<think>a</think> <answer>1</answer></answer>", False),
        ("<think>a</think> <answer>1", False),
        ("", False),
    ],
)
def test_format_requires_think_then_answer_at_the_end(completion, well_formed):
    assert reward_lib.is_well_formed(completion) is well_formed


def test_reward_combines_both_parts_with_configurable_weights():
    gold = "#### 3"
    cases = {
        "<think>a</think> <answer>3</answer>": 1.1,
        "<think>a</think> <answer>4</answer>": 0.1,
        "<answer>3</answer> trailing": 0.9,
        "garbage": -0.1,
    }
    for completion, expected in cases.items():
        assert reward_lib.reward(completion, gold) == pytest.approx(expected)
    accuracy_only = reward_lib.RewardConfig(format_weight=0.0)
    assert reward_lib.reward("<answer>3</answer> x", gold, accuracy_only) == 1.0
    assert reward_lib.reward("garbage", gold, accuracy_only) == 0.0
    weighted = reward_lib.RewardConfig(accuracy_weight=2.0, format_weight=0.5)
    assert reward_lib.reward("<think>a</think><answer>3</answer>", gold, weighted) == 2.5
    with pytest.raises(ValueError, match="format_weight"):
        reward_lib.RewardConfig(format_weight=-0.1)
    with pytest.raises(ValueError, match="accuracy_weight"):
        reward_lib.RewardConfig(accuracy_weight=float("nan"))
    with pytest.raises(ValueError, match="timeout_seconds must be an integer >= 1"):
        reward_lib.RewardConfig(timeout_seconds=0.5)
    with pytest.raises(ValueError, match="gold answer"):
        reward_lib.accuracy("<answer>3</answer>", "no final number")


_FRAGMENTS = st.sampled_from(
    ["<think>", "</think>", "<answer>", "</answer>", "####", "$", ",", ".", "-", "\u2212", " ",
     "\n", "1,000", "-3.5", "9" * 60, "\u0663", "\uff15", "<", ">", "/", "\\frac{", "}", "^",
     "\\boxed{", "%"]
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.text(), st.lists(st.one_of(_FRAGMENTS, st.text(max_size=5))).map("".join)),
    st.integers(-(10**6), 10**6),
)
def test_garbage_never_raises(completion, gold):
    assert reward_lib.accuracy(completion, f"#### {gold}", timeout_seconds=1) in (0.0, 1.0)
    config = reward_lib.RewardConfig(timeout_seconds=1)
    value = reward_lib.reward(completion, f"#### {gold}", config)
    assert any(value == pytest.approx(r) for r in (1.1, 0.9, 0.1, -0.1))


def test_missing_math_verify_is_one_clear_error(monkeypatch):
    """math-verify is imported on first use (the accelerator image has none); without it the
    reward names the package to install, while the parts that do not need it still work."""
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ImportError, match=r"needs math-verify .* pip install"):
        reward_lib.reward(_formatted("2+2", "4"), "#### 4")
    assert reward_lib.format_score(_formatted("2+2", "4")) == 1.0
    assert reward_lib.number_matches("4", reward_lib.gold_number("#### 4"))
    from rl_jax.tasks.gsm8k import GSM8KTask

    with pytest.raises(ImportError, match="needs math-verify"):  # before any data is read
        GSM8KTask(tokenizer="no/such/tokenizer.json", data_dir="no/such/dir")
