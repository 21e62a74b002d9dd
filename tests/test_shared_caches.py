"""Issue 35: caches that several runs fill at once. Two first uses of one TFDS directory both
succeed with the same rows (the loser of the race used to be told `Cannot rename ...
incomplete...: Destination ... already exists` and exit 2, as if its input were bad)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_DIR = ROOT / "tests" / "fixtures" / "gsm8k_tiny"
LOAD = """
import json, sys
from rl_jax.tasks import gsm8k_builder
rows = gsm8k_builder.load_split(sys.argv[1], "train", sys.argv[2])
print(json.dumps([[r.index, r.question] for r in rows]))
"""


def test_two_first_uses_of_one_tfds_directory_both_succeed(tmp_path):
    pytest.importorskip("tensorflow_datasets", reason="needs the 'data' extra")
    cache = tmp_path / "tfds"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD, str(TINY_DIR), str(cache)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    first, second = (json.loads(stdout.splitlines()[-1]) for stdout, _ in outputs)
    assert first == second and len(first) > 0
    assert not list(cache.glob(".*.lock"))
