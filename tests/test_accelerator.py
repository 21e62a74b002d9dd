"""benchmarks/accelerator.py on the CPU: its `--small` run is the CI test of the device check,
run the way the GPU image runs it (without the packages that image lacks), and its bad input."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator.py"
# Not on the lent GPU machines' image (issue 29); torch comes with none of our imports either.
ABSENT = ("math_verify", "sympy", "tensorboardX", "tensorflow_datasets", "torch")
CHECKS = {
    "environment", "logits", "sampler/greedy", "sampler/sampled", "learner",
    "attention/chunked", "attention/dot_product", "bfloat16", "attention/dot_product_bf16",
    "logits/default_precision",
    "timing/matmul_peak", "timing/setup", "timing/sampler", "timing/sampler_slots",
    "timing/learner", "timing/learner_packed", "summary",
}  # fmt: skip


def run(tmp_path, *args, absent=ABSENT, code=None):
    """The script in a fresh interpreter on the CPU, `absent` modules unimportable (a
    sitecustomize sets them to None in sys.modules before anything runs)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        f"import sys\nfor name in {absent!r}:\n    sys.modules[name] = None\n"
    )
    env = {
        **os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
        "JAX_PLATFORMS": "cpu",
        # Compile-time only (XLA:CPU's LLVM passes): about a third less CPU time here.
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
    }  # fmt: skip
    command = [sys.executable, "-c", code] if code else [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def test_the_blocked_modules_cannot_be_imported(tmp_path):
    result = run(tmp_path, code="import math_verify")
    assert result.returncode == 1 and "ModuleNotFoundError" in result.stderr


def test_every_module_imports_without_them_but_the_data_builder(tmp_path):
    """math-verify and tensorboardX are imported where they are used, not at import time;
    only the GSM8K data builder needs tensorflow-datasets to import (the 'data' extra)."""
    code = (
        "import importlib, pkgutil, rl_jax\n"
        "for module in pkgutil.walk_packages(rl_jax.__path__, 'rl_jax.'):\n"
        "    if module.name != 'rl_jax.tasks.gsm8k_builder':\n"
        "        importlib.import_module(module.name)\n"
    )
    result = run(tmp_path, code=code)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_small_run_passes_every_check_without_the_packages_the_gpu_image_lacks(tmp_path):
    result = run(tmp_path, "--small", "--json")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    for record in records:
        assert record["backend"] == "cpu" and isinstance(record["ok"], bool), record
        assert record["ok"], record
    by_check = {record["check"]: record for record in records}
    assert set(by_check) == CHECKS and len(records) == len(CHECKS)
    assert by_check["environment"]["reference"] == "same device"
    assert by_check["learner"]["grad_norm"] > 0 and by_check["learner"]["grad_leaves"] > 0
    for phase in ("timing/sampler", "timing/learner"):
        timing = by_check[phase]
        assert timing["rows"] == 16 and timing["response_tokens_per_s"] > 0, timing
        assert timing["compile_s"] > 0 and timing["aot_peak_gib"] >= 0, timing
        assert "mfu" not in timing and "no published peak" in timing["mfu_note"], timing
    slots, packed = by_check["timing/sampler_slots"], by_check["timing/learner_packed"]
    for timing, before in ((slots, "timing/sampler"), (packed, "timing/learner")):
        # the same rows as the padded phase, real (paper-shaped) lengths, a ratio against it
        assert timing["rows"] == by_check[before]["rows"] and timing["speedup"] > 0, timing
        assert 0 < timing["real_fraction"] < 1, timing
    assert slots["decode_slots"] == 8 and 0 < slots["row_step_utilization"] <= 1, slots
    assert packed["packed_shape"] and packed["aot_peak_gib"] >= 0, packed


@pytest.mark.parametrize(
    "args, absent, message",
    [
        (["--backend", "tpu"], ABSENT, "error: --backend tpu: JAX finds no such device"),
        (["--rows", "12"], ABSENT, "error: --rows must be whole groups of 8"),
        (["--model", "gpt"], ABSENT, "error: --model 'gpt': choose one of"),
        (["--memory-gib", "16"], ABSENT, "error: qwen2.5-1.5b-instruct at 768 rows x (256 + 1024)"),
        (["--small"], (*ABSENT, "optax"), "error: the package 'optax' is missing"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2_before_anything_compiles(
    tmp_path, args, absent, message
):
    result = run(tmp_path, *args, absent=absent)
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.splitlines()[-1].startswith(message), result.stderr
