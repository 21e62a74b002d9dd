"""TrainConfig validation: bad input fails fast, naming the field and the allowed values."""

import json

import pytest

from rl_jax import config as config_lib
from rl_jax.train import main


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"algorithm": "ppo"}, "grpo"),
        ({"group_size": 1}, "group_size"),
        ({"sync_interval": 0}, "sync_interval"),
        ({"sync_offset": -1}, "sync_offset"),
        ({"task": "mnist"}, "arithmetic"),
        ({"steps": 0}, "steps"),
        ({"temperature": 0.0}, "temperature"),
        ({"micro_batches": 3}, "micro_batches"),
        ({"lr_schedule": "step"}, "cosine"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"group_size": "8"}, "group_size"),
        ({"algorithm_overrides": {"eps_low": -0.1}}, "eps_low"),
        ({"algorithm_overrides": {"clip": "three-side"}}, "one-side"),
        ({"decode_slots": -1}, "decode_slots"),
        ({"no_such_field": 1}, "unknown config field"),
    ],
)
def test_bad_fields_name_themselves(fields, message):
    with pytest.raises(ValueError, match=message):
        config_lib.build("embedded", **fields)


def test_out_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="out_dir"):
        config_lib.build("embedded", out_dir=str(path))


def test_overrides_parse_json_and_dotted_keys():
    parsed = config_lib.parse_overrides(
        [
            "steps=5",
            "algorithm=rec-oneside-nois",
            "algorithm_overrides.eps_high=0.6",
            "ref_metrics=false",
        ]
    )
    assert parsed == {
        "steps": 5,
        "algorithm": "rec-oneside-nois",
        "algorithm_overrides": {"eps_high": 0.6},
        "ref_metrics": False,
    }
    cfg = config_lib.build("embedded", parsed)
    assert cfg.algorithm_preset().loss.eps_high == 0.6
    assert cfg.learning_rate == 2e-5 and isinstance(cfg.temperature, float)


def test_json_file_round_trip(tmp_path):
    cfg = config_lib.build("embedded", steps=7, sync_interval=20)
    path = tmp_path / "run.json"
    path.write_text(cfg.to_json())
    assert config_lib.build(str(path)) == cfg


def test_cli_reports_bad_config_without_running(tmp_path, capsys):
    assert main(["embedded", "group_size=1", "--out", str(tmp_path / "run")]) == 2
    assert "group_size" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_gsm8k_preset_is_valid():
    cfg = config_lib.build("gsm8k-qwen2.5-1.5b")
    assert json.loads(cfg.to_json())["task"] == "gsm8k"
