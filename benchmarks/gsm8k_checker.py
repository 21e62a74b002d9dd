"""Where the GSM8K answer checkers agree: the exact-decimal rule (our checker before math-verify,
now its fallback) against math-verify (the authors' checker, our accuracy since), on the 1,319
gold answers of the test split and on hand-written tricky completions.

    python -m benchmarks.gsm8k_checker [--data ../shared/data/gsm8k]

Prints one row per tricky case (expected verdict by hand, old, new) and the agreement counts.
Takes ~10 s on one CPU core (5 of them: the `9^9^9^9` case runs into math-verify's timeout).
"""

from __future__ import annotations

import argparse
import json
import pathlib

from rl_jax.tasks import gsm8k_reward as reward_lib

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"

# (answer block, gold final number, the verdict a careful human grader gives)
TRICKY = [
    ("18", "18", True),
    ("18 dollars", "18", True),
    ("18 eggs per day", "18", True),
    ("$18", "18", True),
    ("\\$18", "18", True),
    ("$18.", "18", True),
    ("1,000", "1000", True),
    ("1,000 people", "1000", True),
    ("$1,000.50", "1000.5", True),
    ("1 000", "1000", True),
    ("0.5", ".5", True),
    (".5", "0.5", True),
    ("18.00", "18", True),
    ("4.50 dollars", "4.5", True),
    ("1/2", "0.5", True),
    ("\\frac{1}{2}", "0.5", True),
    ("$\\frac{9}{2}$", "4.5", True),
    ("4 1/2", "4.5", True),
    ("\\boxed{18}", "18", True),
    ("$\\boxed{70,000}$", "70000", True),
    ("The answer is 18.", "18", True),
    ("So she makes 16 - 3 - 4 = 9 eggs and 9 * 2 = $18.", "18", True),
    ("18\nShe sells the rest at the market.", "18", True),
    ("18 (not 17)", "18", True),
    ("The answer is 18, not 17", "18", True),
    ("17 or 18", "18", False),
    ("x = 18", "18", True),
    ("150%", "150", True),
    ("50%", "50", True),
    ("-5", "-5", True),
    ("-$5", "-5", True),
    ("$-5", "-5", True),
    ("\u22125 degrees", "-5", True),
    ("a loss of 5 dollars", "-5", False),
    ("1,8", "18", False),
    ("eighteen", "18", False),
    ("18.5", "18", False),
    ("180", "18", False),
    ("3 + 15", "18", True),
    ("9^9^9^9", "18", False),
]
# Several answer blocks: only the first one counts (checked on whole completions).
SEVERAL_BLOCKS = [
    ("<think>..</think> <answer>17</answer> <answer>18</answer>", "18", False),
    ("<think>..</think> <answer>18</answer> <answer>17</answer>", "18", True),
]


def old_accuracy(completion: str, gold: str) -> bool:
    """The exact-decimal rule on the first answer block (`number_matches`)."""
    block = reward_lib.answer_block(completion)
    return block is not None and reward_lib.number_matches(block, reward_lib.gold_number(gold))


def new_accuracy(completion: str, gold: str) -> bool:
    return reward_lib.accuracy(completion, gold) == 1.0


def _complete(block: str) -> str:
    return f"<think>...</think> <answer>{block}</answer>"


def gold_rows(data_dir: pathlib.Path) -> list[dict]:
    lines = (data_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def gold_agreement(rows: list[dict]) -> dict[str, tuple[int, int, int]]:
    """Per way of stating the gold answer: (old accepts, new accepts, both agree) counts."""
    variants = {
        "final number only": lambda reasoning, final: final,
        "whole solution, '#### n' kept": lambda reasoning, final: f"{reasoning}#### {final}",
        "whole solution, 'The answer is n.'": lambda r, final: f"{r}The answer is {final}.",
        "wrong: n + 1": None,
    }
    counts = {}
    for name, make in variants.items():
        old = new = agree = 0
        for row in rows:
            reasoning, final = row["answer"].rsplit("####", 1)
            final = final.strip()
            block = make(reasoning, final) if make else str(reward_lib.gold_number(final) + 1)
            verdicts = (
                old_accuracy(_complete(block), row["answer"]),
                new_accuracy(_complete(block), row["answer"]),
            )
            old, new, agree = (
                old + verdicts[0],
                new + verdicts[1],
                agree + (len(set(verdicts)) == 1),
            )
        counts[name] = (old, new, agree)
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)

    print(
        f"{'tricky completion (answer block)':<52} {'gold':>7} {'human':>6} {'old':>6} {'new':>6}"
    )
    rows = [(_complete(b), g, e, repr(b)) for b, g, e in TRICKY]
    rows += [(c, g, e, repr(c[18:])) for c, g, e in SEVERAL_BLOCKS]
    tally = {"old == new": 0, "old == human": 0, "new == human": 0}
    for completion, gold, expected, label in rows:
        old, new = old_accuracy(completion, gold), new_accuracy(completion, gold)
        tally["old == new"] += old == new
        tally["old == human"] += old == expected
        tally["new == human"] += new == expected
        mark = "" if old == new else "  <- differ"
        print(f"{label[:52]:<52} {gold:>7} {expected!s:>6} {old!s:>6} {new!s:>6}{mark}")
    print(", ".join(f"{k}: {v}/{len(rows)}" for k, v in tally.items()))

    gold = gold_rows(args.data)
    print(f"\n{len(gold)} gold answers of the test split, stated as the answer block:")
    print(f"{'variant':<40} {'old accepts':>12} {'new accepts':>12} {'agree':>6}")
    for name, (old, new, agree) in gold_agreement(gold).items():
        print(f"{name:<40} {old:>12} {new:>12} {agree:>6}")


if __name__ == "__main__":
    main()
