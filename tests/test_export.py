"""`python -m rl_jax.export`: a trained tiny Qwen2-shaped run written as a Hugging Face directory
that transformers loads with rl_jax's logits, its tokenizer and generation settings, and the
refusals (a non-empty OUT_DIR, a num_seeds parent, a missing step) that write nothing."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from rl_jax import config as config_lib
from rl_jax import export, models, saved_run
from rl_jax.tokenizer import HF_TOKENIZER_FILES, CharTokenizer, HFTokenizer
from rl_jax.train import train
from tests.conftest import SHARED

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_QWEN2 = SHARED / "models" / "tiny-qwen2"
ATOL = 1e-4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two steps of the random-init `tiny` preset (Qwen2 layout, tied head) on the arithmetic
    task, checkpointed at both. rep-asymre's forward-KL term moves the policy even though
    every reward of the untrained model is 0."""
    out = tmp_path_factory.mktemp("export") / "run"
    config = config_lib.build(
        "embedded",
        model="tiny", algorithm="rep-asymre", prompts_per_step=4, group_size=4, learning_rate=3e-3, steps=2,
        eval_every=0, checkpoint_every=1, out_dir=str(out),
    )  # fmt: skip
    train(config)
    return out


@pytest.fixture(scope="module")
def saved(run):
    return saved_run.load(saved_run.find(run))


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    export.export(saved, out)
    return out


def _rl_jax_logits(saved, tokens, mask):
    positions = models.default_positions(tokens, mask)
    return np.asarray(models.forward(saved.run.graphdef, saved.params(0), tokens, positions, mask))


def test_transformers_gives_rl_jax_logits(saved, exported):
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        exported, attn_implementation="eager"
    ).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    batch = tokenizer(["3+5+2=", "9+9+9+9+9=3"], padding=True, return_tensors="np")
    tokens, mask = batch["input_ids"], batch["attention_mask"]
    positions = np.asarray(models.default_positions(tokens, mask))
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()  # fmt: skip
    ours = _rl_jax_logits(saved, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(ref[real]).max() > 0.5  # of order 1: the tolerance is 1e-4 of them
    # Two implementations (XLA and PyTorch) of the same float32 model: rounding apart.
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)


def test_trained_parameters_are_exported(saved, exported, run, tmp_path):
    """The step-2 policy, not the initial one nor the step-1 checkpoint."""
    embed = lambda path: safe_open(path / "model.safetensors", "np").get_tensor(
        "model.embed_tokens.weight"
    )
    np.testing.assert_array_equal(embed(exported), nnx.to_pure_dict(saved.params(0))["embed"])
    assert export.main([str(run), str(tmp_path / "step1"), "--step", "1"]) == 0
    assert not np.array_equal(embed(tmp_path / "step1"), embed(exported))


def test_tokenizer_and_generation_config(saved, exported):
    ours = CharTokenizer()
    hf = transformers.AutoTokenizer.from_pretrained(exported)
    assert type(hf).__name__ == "Qwen2Tokenizer"  # what transformers loads for a Qwen2 model
    for text in ["3+5+2=", "12+7=19#19", " (a, b)\n\nXy"]:  # BOS first, as rl_jax's prompts
        assert hf(text)["input_ids"] == ours.encode(text, add_bos=True)
        assert hf.decode(ours.encode(text), skip_special_tokens=True) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert HFTokenizer(exported).encode("3+4=", add_bos=True) == ours.encode("3+4=", add_bos=True)
    generation = transformers.GenerationConfig.from_pretrained(exported)
    assert generation.do_sample and generation.temperature == 1.0
    assert generation.top_k == 0 and generation.top_p == 1.0  # off, as in the run
    assert generation.max_new_tokens == saved.run.max_response_len
    assert (generation.eos_token_id, generation.pad_token_id) == (2, 0)
    config = json.loads((exported / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)


def test_bfloat16(saved, tmp_path):
    export.export(saved, tmp_path / "bf16", "bfloat16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.skipif(not TINY_QWEN2.is_dir(), reason=f"{TINY_QWEN2} is absent")
def test_hf_tokenizer_files_are_copied(tmp_path):
    """GSM8K runs name a Hugging Face tokenizer directory: its files, chat template included."""
    HFTokenizer(TINY_QWEN2).save(tmp_path)
    copied = sorted(p.name for p in tmp_path.iterdir())
    assert "chat_template.jinja" in copied and "tokenizer_config.json" in copied
    assert copied == sorted(n for n in HF_TOKENIZER_FILES if (TINY_QWEN2 / n).is_file())
    for name in copied:
        assert (tmp_path / name).read_bytes() == (TINY_QWEN2 / name).read_bytes()


def test_a_failed_export_leaves_nothing(saved, tmp_path, monkeypatch):
    def fail(directory):
        raise OSError("disk full")

    monkeypatch.setattr(saved.run.tokenizer, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        export.export(saved, tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        export.export(saved, tmp_path / "new" / "dirs" / "out")
    assert list(tmp_path.iterdir()) == []


def _error(capsys, argv) -> str:
    assert export.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""
    return lines[0]


def test_refusals_write_nothing(run, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert "is not an empty directory" in _error(capsys, [str(run), str(full)])
    assert [p.name for p in full.iterdir()] == ["keep.txt"]

    out = tmp_path / "out"
    assert "has no checkpoint of step 9; it has steps [1, 2]" in _error(
        capsys, [str(run), str(out), "--step", "9"]
    )
    parent = tmp_path / "seeds"
    for seed in (3, 4):
        shutil.copytree(run, parent / f"seed_{seed}")
    line = _error(capsys, [str(parent), str(out)])
    assert "holds 2 runs; export one of" in line and str(parent / "seed_4") in line
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("[]")
    assert "cannot read the run's config" in _error(capsys, [str(tmp_path / "broken"), str(out)])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "full", "seeds"]

    empty = tmp_path / "empty"
    empty.mkdir()  # an empty OUT_DIR is filled
    assert export.main([str(run), str(empty)]) == 0
    assert (empty / "model.safetensors").is_file()
    assert capsys.readouterr().out.strip() == f"wrote {empty} (step 2 of {run})"


def test_module_cli_refuses_a_directory_without_a_checkpoint(run, tmp_path):
    (tmp_path / "run").mkdir()
    shutil.copy(run / "config.json", tmp_path / "run" / "config.json")
    result = subprocess.run(
        [sys.executable, "-m", "rl_jax.export", str(tmp_path / "run"), str(tmp_path / "out")],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'run'} has no checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
