"""The embedded sum task: generator, split, solutions and reward."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rl_jax.tasks import ArithmeticConfig, ArithmeticTask, Example
from rl_jax.tasks.arithmetic import classify, extract_answer, parse_terms, solution


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask()


def test_generator_is_deterministic(task):
    first = task.sample_prompts(7, 64)
    assert first == task.sample_prompts(7, 64)
    assert first == task.sample_prompts(np.random.default_rng(7), 64)
    assert first != task.sample_prompts(8, 64)
    assert task.sample_prompts((7, 3), 8) == task.sample_prompts((7, 3), 8)  # (seed, step) keys
    assert task.sample_prompts((7, 3), 8) != task.sample_prompts((7, 4), 8)
    assert ArithmeticTask().eval_examples() == task.eval_examples()
    assert task.eval_examples(3) == task.eval_examples()[:3]


def test_examples_follow_the_config(task):
    examples = task.sample_prompts(0, 400)
    counts = {n: 0 for n in range(2, 6)}
    for ex in examples:
        terms = parse_terms(ex.prompt)
        counts[len(terms)] += 1
        assert all(0 <= t <= 9 for t in terms) and ex.answer == str(sum(terms))
        assert len(task.tokenizer.encode(ex.prompt, add_bos=True)) <= task.max_prompt_len
    assert min(counts.values()) > 60  # roughly uniform over 2..5 terms
    hard = ArithmeticTask(ArithmeticConfig(min_terms=6, max_terms=6, max_operand=99))
    for ex in hard.sample_prompts(0, 50):
        assert len(parse_terms(ex.prompt)) == 6 and max(parse_terms(ex.prompt)) <= 99
        assert len(hard.tokenizer.encode(ex.prompt, add_bos=True)) <= hard.max_prompt_len
    assert hard.max_prompt_len == 1 + 6 * 3
    assert hard.max_response_len == len(solution((99,) * 6)) + 1


def test_train_and_eval_are_disjoint(task):
    held_out = {ex.prompt for ex in task.eval_examples()}
    assert all(task.is_held_out(p) for p in held_out)
    for seed in range(5):
        assert not held_out & {ex.prompt for ex in task.sample_prompts(seed, 2000)}
    # The split covers every problem size, including the 100 two-term problems.
    assert {len(parse_terms(p)) for p in held_out} == {2, 3, 4, 5}


def test_solutions_are_chains_of_partial_sums():
    assert solution((3, 5)) == "3+5=8#8"
    assert solution((3, 5, 2, 7)) == "3+5=8+2=10+7=17#17"
    assert solution((9, 9, 9, 9, 9)) == "9+9=18+9=27+9=36+9=45#45"
    assert ArithmeticTask().max_response_len == 25  # the longest chain above, plus EOS
    lengths = {len(solution(parse_terms(ex.prompt))) for ex in ArithmeticTask().eval_examples()}
    assert min(lengths) <= 8 and max(lengths) >= 22


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("3+5=8+2=10+7=17#17", 1.0),
        ("#17", 1.0),
        ("#017", 1.0),
        ("3+5=8+2=10+7=16#17", 1.0),  # a wrong step does not matter, the final answer does
        ("3+5=8+2=10+7=17#16", 0.0),
        ("#170", 0.0),
        ("#1 7", 0.0),
        ("17", 0.0),  # no answer marker
        ("#16#17", 0.0),  # only the first marker counts
        ("#-17", 0.0),
        ("", 0.0),
        ("so um let me see so um let", 0.0),
        ("###", 0.0),
        ("#", 0.0),
        ("#17 and then some", 1.0),
        ("\x00\ufffd<bos>#17", 1.0),
    ],
)
def test_reward_hand_written(task, completion, expected):
    assert task.reward(completion, Example("3+5+2+7=", "17")) == expected


def test_format_component():
    task = ArithmeticTask(ArithmeticConfig(format_weight=0.1))
    ex = Example("3+5+2+7=", "17")
    assert task.reward("3+5=8+2=10+7=17#17", ex) == pytest.approx(1.1)
    assert task.reward("#17", ex) == pytest.approx(1.1)
    assert task.reward("#17 and then some", ex) == pytest.approx(0.9)
    assert task.reward("#18", ex) == pytest.approx(0.1)
    assert task.reward("um", ex) == pytest.approx(-0.1)


@given(st.text(max_size=40))
def test_reward_never_raises(text):
    task = ArithmeticTask(ArithmeticConfig(num_eval=1, format_weight=0.1))
    assert task.reward(text, Example("1+2=", "3")) in (-0.1, 0.1, 0.9, 1.1)


def test_extract_and_classify():
    assert extract_answer("1+2=3#3") == 3 and extract_answer("no") is None
    assert extract_answer(None) is None
    assert classify("3+5=8#8") == "chain"
    assert classify("#8") == "direct"
    assert classify("so um so") == "other" and classify("3+5=8") == "other"


def test_config_is_validated():
    with pytest.raises(ValueError, match="min_terms"):
        ArithmeticConfig(min_terms=1)
    with pytest.raises(ValueError, match="max_terms"):
        ArithmeticConfig(min_terms=4, max_terms=3)
    with pytest.raises(ValueError, match="eval_fraction"):
        ArithmeticConfig(eval_fraction=1.0)
    with pytest.raises(ValueError, match="max_response_len must be >= 25"):
        ArithmeticConfig(max_response_len=24)
    with pytest.raises(ValueError, match="n must lie"):
        ArithmeticTask().eval_examples(10_000)
