"""Issue 35: what is refused before anything compiles. A run whose step would not fit in memory
(one line: the estimate, the memory available, settings that fit), float settings out of the
float32 range or too small to sample stably, and a config.json that is not a JSON object."""

import dataclasses
import json
import math
import re

import jax
import pytest
from flax import nnx

from rl_jax import build, memory_estimate, models
from rl_jax import config as config_lib
from rl_jax.train import generation_window, main

TINY = ["prompts_per_step=2", "group_size=2", "eval_prompts=0", "steps=1"]


def cli(capsys, out, *args):
    status = main(["embedded", *TINY, *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return status, [line for line in err.splitlines() if line.startswith("error:")]


def test_memory_check_refuses_a_run_over_the_limit_and_names_what_fits(
    tmp_path, capsys, monkeypatch
):
    # The embedded step at 8 x 8 rows: 57 MiB on one XLA:CPU device, 74 MiB on two (the CLI
    # asks for one per core unless JAX has started); with micro_batches=2, 38 and 55 MiB.
    monkeypatch.setenv(memory_estimate.LIMIT_ENV, "56MiB")
    status, errors = cli(capsys, tmp_path / "run", "prompts_per_step=8", "group_size=8")
    assert status == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: the run needs about ")
    assert "(state " in errors[0] and "activations " in errors[0]
    assert (
        f"but 56 MiB are allowed by {memory_estimate.LIMIT_ENV}; settings that would fit: "
        "micro_batches=2" in errors[0]
    )
    assert not (tmp_path / "run").exists()


def test_the_embedded_default_fits_this_host():
    config = config_lib.build("embedded")
    run = build.build_run(config)
    memory_estimate.check(config, run, generation_window(config, run))  # no error


def test_the_issues_half_billion_model_does_not_fit_a_24_gib_cpu_host():
    """`model=qwen2.5-0.5b-instruct` with the embedded task on 2 CPU devices was killed by the
    kernel at 24 GiB (exit 137); the estimate puts it above that."""
    config = config_lib.build("embedded", model="qwen2.5-0.5b-instruct")
    model = dataclasses.replace(models.get_config(config.model), vocab_size=84)
    shapes = nnx.state(nnx.eval_shape(lambda: models.Decoder(model, rngs=nnx.Rngs(0))))
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    per_device = memory_estimate.estimate(config, model, params, 45, 25, 1, devices=2)
    assert 2 * per_device.total > 24 * 2**30


@pytest.mark.parametrize(
    "raw, expected", [("123", 123), ("2KiB", 2048), ("1.5 GiB", 3 * 2**29), ("", None)]
)
def test_memory_limit_parses_byte_counts(raw, expected):
    assert memory_estimate.memory_limit({memory_estimate.LIMIT_ENV: raw}) == expected


def test_a_bad_memory_limit_is_named():
    with pytest.raises(ValueError, match="RL_JAX_MEMORY_LIMIT must be a byte count"):
        memory_estimate.memory_limit({memory_estimate.LIMIT_ENV: "lots"})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"temperature": 1e39}, "temperature must be finite in float32 and > 0"),
        ({"temperature": 1e-9}, "temperature must be >= 0.001 to sample stably in float32"),
        ({"learning_rate": 1e39}, "learning_rate must be finite in float32"),
        ({"learning_rate": 1e-50}, "learning_rate=1e-50 is 0 in float32"),
    ],
)
def test_float_settings_are_checked_in_float32(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.build("embedded", **fields)


def test_temperature_out_of_range_is_one_cli_line(tmp_path, capsys):
    status, errors = cli(capsys, tmp_path / "run", "temperature=1e39")
    assert status == 2 and len(errors) == 1 and "temperature must be finite in float32" in errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["null", "5", "[]", '"x"'])
def test_a_config_json_that_is_not_an_object_is_one_line(tmp_path, capsys, text):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(text)
    status, errors = cli(capsys, out)
    assert status == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: {out / 'config.json'} is not a readable config (it holds ")
    assert "not a JSON object); delete it, or pass another --out" in errors[0]
    assert json.loads((out / "config.json").read_text()) == json.loads(text)


def test_a_preset_model_says_it_starts_from_random_weights():
    note = build.random_weights_note(config_lib.build("embedded", model="tiny"))
    assert note == "model='tiny' is an architecture preset: starting from random weights"
    assert build.random_weights_note(config_lib.build("embedded")) is None  # the warm start
