"""What padding costs: the learner with and without packing, the sampler lock-step vs slots.

    python benchmarks/padding.py --part learner [--json] [--rounds 3]
    python benchmarks/padding.py --part sampler [--json] [--rounds 3]

The workload is the paper's GSM8K step (arXiv 2509.24203 §5: 96 prompts x 8 responses, a
1,024-token cap) scaled to this CPU on the reference model `../shared/models/tiny-qwen2`
(context 512): 64 rows = 8 prompts x 8 responses, a prompt bucket of 64 positions whose real
prompts take 32-64 of them (~0.1 of the full width), and a response cap of 448 whose lengths
follow the paper's shape: log-normal with a mean of ~0.2 of the cap and the tail clipped at the
cap (public GSM8K GRPO logs: responses averaging 183-232 tokens of 1,024, the longest at the
cap). `paper_workload` draws it; each part times its two variants alternated in one process
(`--rounds` rounds) and prints one line per round, or one JSON object per line with `--json`.

The parts live beside this file: `padding_learner.py` (packed against padded updates) and
`padding_sampler.py` (slot decoding against lock-step decode); each defines
`run(workload, rounds) -> list[dict]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
MODEL_DIR = HERE.parents[1] / "shared" / "models" / "tiny-qwen2"
PARTS = ("learner", "sampler")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One step's rows: `prompt_lengths` and `response_lengths` are `[rows]` real token counts
    (rows grouped `[num_prompts * group_size]`, the group sharing its prompt), within a prompt
    bucket of `prompt_bucket` positions and a response cap of `cap`."""

    model_dir: pathlib.Path
    num_prompts: int
    group_size: int
    prompt_bucket: int
    cap: int
    prompt_lengths: np.ndarray
    response_lengths: np.ndarray

    @property
    def rows(self) -> int:
        return self.num_prompts * self.group_size

    @property
    def real_fraction(self) -> float:
        """Real positions over the padded layout's rows x (prompt bucket + cap)."""
        real = self.prompt_lengths.sum() + self.response_lengths.sum()
        return float(real / (self.rows * (self.prompt_bucket + self.cap)))


def paper_lengths(rng: np.random.Generator, rows: int, cap: int, mean_fraction: float = 0.2,
                  sigma: float = 0.75) -> np.ndarray:  # fmt: skip
    """`[rows]` int response lengths in [1, cap]: log-normal with mean `mean_fraction * cap`
    before clipping (mu = log(mean) - sigma^2 / 2), the tail clipped at the cap, and the longest
    row set to the cap (as in the paper step, whose 768 rows reach it; 64 draws rarely do)."""
    mu = np.log(mean_fraction * cap) - sigma**2 / 2
    lengths = np.clip(np.rint(rng.lognormal(mu, sigma, rows)), 1, cap).astype(np.int32)
    lengths[np.argmax(lengths)] = cap
    return lengths


def paper_workload(seed: int = 0, num_prompts: int = 8, group_size: int = 8,
                   prompt_bucket: int = 64, cap: int = 448) -> Workload:  # fmt: skip
    """The scaled paper step (module docstring), drawn from `seed`."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(prompt_bucket // 2, prompt_bucket + 1, num_prompts).astype(np.int32)
    return Workload(
        model_dir=MODEL_DIR,
        num_prompts=num_prompts,
        group_size=group_size,
        prompt_bucket=prompt_bucket,
        cap=cap,
        prompt_lengths=np.repeat(prompts, group_size),
        response_lengths=paper_lengths(rng, num_prompts * group_size, cap),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=PARTS, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="the workload's draw")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if not MODEL_DIR.is_dir():
        print(f"error: the reference model {MODEL_DIR} is missing", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    part = importlib.import_module(f"padding_{args.part}")
    workload = paper_workload(args.seed)
    for record in part.run(workload, args.rounds):
        record = {"part": args.part, "real_fraction": round(workload.real_fraction, 4), **record}
        print(json.dumps(record) if args.json else "  ".join(f"{k}={v}" for k, v in record.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
