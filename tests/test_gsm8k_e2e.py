"""GSM8K through the whole loop, via the CLI a user types: the TFDS builder over a slice of the
real data, the tokenizer of a Hugging Face model directory, generate, reward, update, held-out
evaluation, checkpoints, and a rerun that resumes from the last checkpoint it finds."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from rl_jax.metrics import read_metrics
from tests.conftest import SHARED

ROOT = pathlib.Path(__file__).resolve().parents[1]
GSM8K_DIR = SHARED / "data" / "gsm8k"
MODEL_DIR = SHARED / "models" / "tiny-qwen2"
MAX_RESPONSE_LEN = 8
STEPS = 3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (GSM8K_DIR.is_dir() and MODEL_DIR.is_dir()),
        reason=f"needs {GSM8K_DIR} and {MODEL_DIR}",
    ),
]


def _slice(source_dir, target_dir, counts):
    """The first `counts[split]` problems of each split whose prompt fits the tiny model.

    The tiny model has 512 positions and a 512-token vocabulary, so most GSM8K prompts (system
    prompt included) run to 300-1,000 tokens; the task would rightly refuse a longer one.
    """
    pytest.importorskip("tensorflow_datasets", reason="needs the 'data' extra")
    from rl_jax.tasks import gsm8k
    from rl_jax.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(MODEL_DIR)
    budget = 512 - MAX_RESPONSE_LEN
    target_dir.mkdir()
    for split, count in counts.items():
        lines = (source_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        fits = lambda line: len(
            tokenizer.encode(
                gsm8k.format_prompt(json.loads(line)["question"], "model", tokenizer=tokenizer),
                add_bos=True,
            )
        )
        kept = [line for line in lines[:200] if fits(line) <= budget][:count]
        assert len(kept) == count
        (target_dir / f"{split}.jsonl").write_text("\n".join(kept) + "\n", encoding="utf-8")


def _command(data_dir, tfds_dir, out):
    return [
        sys.executable, "-m", "rl_jax.train", "gsm8k-qwen2.5-1.5b",
        f"model={MODEL_DIR}",
        f"task_options.data_dir={data_dir}",
        f"task_options.tokenizer={MODEL_DIR}",
        f"task_options.tfds_data_dir={tfds_dir}",
        # rep-asymre's forward-KL term moves the policy even when all rewards of a group tie,
        # which they do for an untrained 3M-parameter model.
        "algorithm=rep-asymre",
        "prompts_per_step=2", "group_size=2", "micro_batches=1",
        f"max_response_len={MAX_RESPONSE_LEN}", f"steps={STEPS}",
        "eval_every=2", "eval_prompts=4", "checkpoint_every=2",
        "--out", str(out),
    ]  # fmt: skip


def test_gsm8k_cli_trains_evaluates_checkpoints_and_resumes(tmp_path):
    data_dir, tfds_dir, out = tmp_path / "gsm8k", tmp_path / "tfds", tmp_path / "run"
    _slice(GSM8K_DIR, data_dir, {"train": 16, "test": 8})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax"))
    command = _command(data_dir, tfds_dir, out)

    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    logged = read_metrics(out)
    assert [m["step"] for m in logged] == list(range(STEPS + 1))
    assert [m["step"] for m in logged if "eval/reward" in m] == [0, 2, 3]
    for m in logged[1:]:
        # Each response scores one of the R1 reward values; none can exceed 1.1.
        assert -0.1 - 1e-6 <= m["reward/mean"] <= 1.1 + 1e-6
        assert m["response_length/max"] <= MAX_RESPONSE_LEN
        assert m["num_sequences"] == 4 and m["grad_norm"] > 0
    # kl/ref of step 1 is 0 up to rounding (the learner's and the reference's forwards are two
    # programs; tests/test_train.py), and step 1 moved the policy.
    assert abs(logged[1]["kl/ref"]) < 1e-12 and logged[2]["kl/ref"] > 0
    checkpoints = out / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 3]

    # A run that died after its step-2 checkpoint: the rerun resumes there and repeats the rest.
    shutil.rmtree(checkpoints / "3")
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert f"resuming {out} from step 2" in rerun.stdout
    untimed = lambda ms: [
        {k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))} for m in ms
    ]
    assert untimed(read_metrics(out)) == untimed(logged)
    assert (checkpoints / "3").is_dir()


# --- bad input through the same CLI: one `error:` line, exit code 2, nothing written ---------

TINY_DATA = ROOT / "tests" / "fixtures" / "gsm8k_tiny"


def _main_error(capsys, tmp_path, **fields):
    """Runs `rl_jax.train.main` in process (it fails before compiling); returns its error line."""
    from rl_jax import train

    fields = {
        "model": str(MODEL_DIR),
        "task_options.data_dir": str(TINY_DATA),
        "task_options.tokenizer": str(MODEL_DIR),
        "task_options.tfds_data_dir": str(tmp_path / "tfds"),
        **fields,
    }
    out = tmp_path / "run"
    argv = ["gsm8k-qwen2.5-1.5b", *(f"{k}={v}" for k, v in fields.items()), "--out", str(out)]
    assert train.main(argv) == 2
    # TFDS may report preparing the data above it; the error itself is the one last line.
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:]
    assert not out.exists()
    return lines[-1]


def _model_copy(tmp_path, keep=("config.json", "model.safetensors"), **config_fields):
    model = tmp_path / "model"
    model.mkdir()
    for name in keep:
        (model / name).symlink_to(MODEL_DIR / name)
    if config_fields:
        hf = json.loads((MODEL_DIR / "config.json").read_text())
        (model / "config.json").unlink()
        (model / "config.json").write_text(json.dumps({**hf, **config_fields}))
    return model


def test_missing_data_dir_is_one_error_line(capsys, tmp_path):
    err = _main_error(capsys, tmp_path, **{"task_options.data_dir": str(tmp_path / "nowhere")})
    assert "task_options.data_dir=" in err and "is not a directory" in err


def test_model_dir_without_config_or_with_only_pickle_weights(capsys, tmp_path):
    model = _model_copy(tmp_path, keep=("model.safetensors",))
    assert f"model directory {model} has no config.json" in _main_error(
        capsys, tmp_path, model=str(model)
    )
    shutil.rmtree(model)
    model = _model_copy(tmp_path, keep=("config.json",))
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    err = _main_error(capsys, tmp_path, model=str(model))
    assert "has no model.safetensors" in err and "pickle checkpoints" in err
    assert "is none of them (no such directory)" in _main_error(capsys, tmp_path, model="nope")


def test_tokenizer_larger_than_the_model_vocabulary(capsys, tmp_path):
    model = _model_copy(tmp_path, vocab_size=256)
    err = _main_error(capsys, tmp_path, model=str(model))
    assert "has 512 tokens, more than the vocab_size 256" in err
    assert "task_options.tokenizer" in err
    missing = tmp_path / "no-tokenizer"
    missing.mkdir()
    err = _main_error(capsys, tmp_path, **{"task_options.tokenizer": str(missing)})
    assert f"tokenizer file {missing / 'tokenizer.json'} does not exist" in err


def test_prompt_plus_response_beyond_the_context(capsys, tmp_path):
    err = _main_error(capsys, tmp_path, max_response_len=512)
    assert "max_response_len=512 plus the task's prompt length" in err
    assert "exceeds the model's context of 512 tokens" in err
