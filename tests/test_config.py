"""TrainConfig validation: bad input fails fast, naming the field and the allowed values; the
nested layout, its dotted paths and shorthands, and the flat layout it replaced."""

import dataclasses
import json
import pathlib

import pytest

from experiments import common
from rl_jax import config as config_lib
from rl_jax import run_dir
from rl_jax.train import main

FLAT_CONFIG = pathlib.Path(__file__).parent / "fixtures" / "flat_config.json"


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
        ({"optimizer": {"lr": 1e-6}}, "unknown config field 'optimizer.lr'; optimizer has"),
        ({"name": "grpo"}, r"ambiguous: write one of \['task.name', 'algorithm.name'\]"),
        ({"task_options": {"max_terms": 1}}, "max_terms"),
        ({"top_p": 0.0}, "top_p"),
        ({"micro_batches": 0}, "micro_batches"),
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
    assert cfg.algorithm.preset().loss.eps_high == 0.6
    assert cfg.optimizer.learning_rate == 2e-5 and isinstance(cfg.sampling.temperature, float)


def test_dotted_paths_shorthands_and_flat_names_mean_the_same_field():
    dotted = [
        "optimizer.learning_rate=1e-6", "optimizer.schedule=cosine", "sync.interval=20",
        "algorithm.name=rec-oneside-nois", "algorithm.overrides.eps_high=0.28",
        "task.options.max_terms=4", "memory.micro_batches=2", "sampling.top_k=5", "steps=7",
    ]  # fmt: skip
    short = [
        "learning_rate=1e-6", "lr_schedule=cosine", "sync_interval=20",
        "algorithm=rec-oneside-nois", "algorithm_overrides.eps_high=0.28",
        "task_options.max_terms=4", "micro_batches=2", "top_k=5", "steps=7",
    ]  # fmt: skip
    a, b = (config_lib.build("embedded", config_lib.parse_overrides(x)) for x in (dotted, short))
    assert a == b
    assert (a.optimizer.learning_rate, a.optimizer.schedule, a.sync.interval) == (
        1e-6,
        "cosine",
        20,
    )
    assert a.algorithm.preset().loss.eps_high == 0.28 and a.task.options == {"max_terms": 4}
    assert (a.memory.micro_batches, a.sampling.top_k, a.steps) == (2, 5, 7)
    nested = config_lib.build(None, {"optimizer": {"learning_rate": 1e-6}}, steps=7)
    assert nested.optimizer.learning_rate == 1e-6 and nested.steps == 7


def test_mappings_merge_key_by_key_across_layers():
    merged = config_lib.merge(
        {"steps": 1, "task_options": {"max_terms": 4, "max_operand": 5}},
        {"steps": 2, "task": {"options": {"max_operand": 7}}},
    )
    assert merged == {"steps": 2, "task.options": {"max_terms": 4, "max_operand": 7}}


def test_help_lists_every_field_with_its_default_grouped_by_part(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for path, default in config_lib.defaults().items():
        assert f"    {path} = {json.dumps(default)}" in text, path
    sections = ["[run]", "[task]", "[algorithm]", "[sampling]", "[optimizer]", "[memory]", "[sync]"]
    assert [text.index(s) for s in sections] == sorted(text.index(s) for s in sections)
    assert "optimizer.learning_rate = 2e-05  (also: learning_rate)" in text
    assert "sync.interval = 1  (also: sync_interval, interval)" in text


def test_a_flat_config_file_reads_as_the_nested_config():
    """A config.json of the flat layout (written by the code before the config had parts,
    tests/fixtures/flat_config.json) builds the same run as the nested fields."""
    flat = config_lib.build(str(FLAT_CONFIG))
    nested = config_lib.build(
        None,
        {
            "task": {"name": "arithmetic", "options": {"max_terms": 4}},
            "algorithm": {"name": "rec-oneside-nois", "overrides": {"eps_high": 0.28}},
            "optimizer": {"learning_rate": 3e-4, "schedule": "cosine"},
            "sync": {"interval": 4},
        },
        prompts_per_step=2, group_size=2, eval_prompts=0, steps=2, out_dir="runs/flat",
    )  # fmt: skip
    assert flat == nested
    stored = json.loads(FLAT_CONFIG.read_text())
    assert run_dir.identity(stored) == run_dir.identity(json.loads(nested.to_json()))
    assert config_lib.build(None, json.loads(nested.to_json())) == nested
    # A field the flat file predates takes its default; a key no field has is ignored.
    old = {k: v for k, v in stored.items() if k != "window_cap_gib"} | {"retired_field": 1}
    assert run_dir.identity(old) == run_dir.identity(stored)


def test_experiment_overrides_of_per_run_fields_are_refused_by_any_name(tmp_path):
    parser = common.make_parser("doc", steps=4, out=str(tmp_path))
    specs = [common.RunSpec("a", "a", {"sync_interval": 4})]
    for override in ("sync_interval=2", "sync.interval=2", "interval=2"):
        args = parser.parse_args([override])
        with pytest.raises(ValueError, match=r"override\(s\) \['sync.interval'\]"):
            common.build_configs(specs, args, {}, varied=("sync_interval",))


def test_each_part_is_frozen_and_replaced_alone():
    cfg = config_lib.build("embedded")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optimizer.learning_rate = 1.0  # type: ignore[misc]
    faster = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, b2=0.99))
    assert faster.optimizer.b2 == 0.99 and faster.memory == cfg.memory


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
    assert json.loads(cfg.to_json())["task"]["name"] == "gsm8k"


def test_misspelt_fields_and_preset_spellings():
    """The figures' spelling of a preset is accepted; a misspelt field or preset gets the
    closest names in its one error line."""
    assert config_lib.build("embedded", algorithm="REC-OneSide-NoIS").algorithm.name == (
        "rec-oneside-nois"
    )
    with pytest.raises(ValueError, match=r"'learning_rat' \(did you mean 'learning_rate'"):
        config_lib.build("embedded", learning_rat=1e-3)
    with pytest.raises(ValueError, match=r"'optimizer.learning_rat' \(did you mean"):
        config_lib.build("embedded", {"optimizer.learning_rat": 1e-3})
    with pytest.raises(ValueError, match=r"got 'grpoo' \(did you mean 'grpo'\?\)"):
        config_lib.build("embedded", algorithm="grpoo")
