"""Warm start: teaching data, cache keys, and the end-to-end base policy in the target band."""

import dataclasses
import pathlib

import numpy as np
import pytest
from flax import nnx

from rl_jax import warm_start
from rl_jax.tasks import ArithmeticTask
from rl_jax.tasks.arithmetic import classify
from rl_jax.warm_start import Phase, WarmStartConfig


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask()


def _response(task, tokens_row, loss_row):
    """Decoded response of one teacher-forcing row, and whether it ends in EOS."""
    targets = tokens_row[1:][loss_row > 0]
    return task.tokenizer.decode(targets), task.tokenizer.eos_id in targets.tolist()


@pytest.mark.parametrize("strategy", range(3))
def test_training_batch_layout(task, strategy):
    mixture = tuple(float(i == strategy) for i in range(3))
    rng = np.random.default_rng(0)
    tokens, loss_mask = warm_start.training_batch(task, rng, 32, mixture, WarmStartConfig())
    width_p, width_r = task.max_prompt_len, task.max_response_len
    assert tokens.shape == (32, width_p + width_r) and loss_mask.shape == (
        32,
        width_p + width_r - 1,
    )
    assert not loss_mask[:, : width_p - 1].any()  # never trained to predict the prompt
    examples = task.sample_prompts(np.random.default_rng(0), 1)
    assert task.tokenizer.decode(tokens[0, :width_p]) == examples[0].prompt  # BOS + left pad
    assert tokens[0, width_p - len(examples[0].prompt) - 1] == task.tokenizer.bos_id
    for row, loss_row in zip(tokens, loss_mask, strict=True):
        prompt = task.tokenizer.decode(row[:width_p])
        terms = [int(t) for t in prompt.rstrip("=").split("+")]
        text, has_eos = _response(task, row, loss_row)
        if strategy == 0:
            assert classify(text) == "chain" and text.endswith(f"#{sum(terms)}") and has_eos
        elif strategy == 1:
            answer = int(text[1:])
            assert classify(text) == "direct" and has_eos
            assert answer == sum(terms) if len(terms) == 2 else 1 <= abs(answer - sum(terms)) <= 5
        else:
            assert not has_eos and loss_row.sum() == width_r and "#" not in text


def test_training_batch_is_seeded(task):
    def batch(seed):
        return warm_start.training_batch(
            task, np.random.default_rng(seed), 8, (0.7, 0.2, 0.1), WarmStartConfig()
        )

    np.testing.assert_array_equal(batch(3)[0], batch(3)[0])
    assert not np.array_equal(batch(3)[0], batch(4)[0])


def test_cache_key_tracks_every_config(task, monkeypatch, tmp_path):
    config = WarmStartConfig()
    key = warm_start.cache_key(task, config)
    assert key == warm_start.cache_key(ArithmeticTask(), WarmStartConfig())
    assert key != warm_start.cache_key(task, dataclasses.replace(config, seed=1))
    phases = (Phase(10, 1e-3, (1.0, 0.0, 0.0)),)
    assert key != warm_start.cache_key(task, dataclasses.replace(config, phases=phases))
    other_task = ArithmeticTask(dataclasses.replace(task.config, max_terms=4))
    assert key != warm_start.cache_key(other_task, config)
    monkeypatch.setenv("RL_JAX_CACHE", str(tmp_path))
    assert warm_start.cache_dir(task, config) == tmp_path / "warm_start" / key
    # Weights trained by other code are not reused: the decoder's source is part of the key.
    real = pathlib.Path(warm_start.__file__).parent / "models" / "decoder.py"
    edited = real.read_bytes() + b"\n# edited\n"
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: edited if self == real else
                        open(self, "rb").read())  # fmt: skip
    assert warm_start.cache_key(task, config) != key


def test_config_is_validated():
    with pytest.raises(ValueError, match="model must be one of"):
        WarmStartConfig(model="huge")
    with pytest.raises(ValueError, match="Phase.mixture"):
        Phase(10, 1e-3, (0.5, 0.5))
    with pytest.raises(ValueError, match="Phase.steps"):
        Phase(0, 1e-3, (1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="phases"):
        WarmStartConfig(phases=())


@pytest.mark.slow
def test_warm_start_base_policy_in_band(task):
    """The real warm start (default recipe), in the suite's shared cache (tests/conftest.py sets
    RL_JAX_CACHE) so the RL tests reuse it: a low held-out reward (0.20 measured) with all three
    behaviours present, rambles into the length cap the most common one (so RL shortens
    responses), and correct chains one re-weighting away."""
    config = WarmStartConfig()
    model_cfg, model = warm_start.load_or_train(task, config)
    path = warm_start.cache_dir(task, config)
    # Written atomically: a finished checkpoint, no temporary directory left beside it.
    assert (path / "warm_start.json").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith((".", "tmp"))]
    assert model_cfg == warm_start.model_config(task, config)
    metrics = warm_start.read_report(path)["eval"]
    assert 0.1 <= metrics["reward"] <= 0.35, metrics
    assert metrics["share/chain"] >= 0.08 and metrics["accuracy/chain"] >= 0.7, metrics
    assert metrics["share/direct"] >= 0.04 and metrics["share/other"] >= 0.5, metrics
    assert metrics["clip_ratio"] >= 0.5 and metrics["response_length"] >= 18, metrics

    # Loading again never retrains, and sampling the loaded checkpoint with the same key
    # reproduces the evaluation recorded from the freshly trained parameters exactly.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(warm_start, "train", lambda *args, **kwargs: pytest.fail("retrained"))
        cached_cfg, cached = warm_start.load_or_train(task, config)
    assert cached_cfg == model_cfg
    again = warm_start.evaluate(task, *nnx.split(cached, nnx.Param), config.num_eval, config.seed)
    assert again == metrics
