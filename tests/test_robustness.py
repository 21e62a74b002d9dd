"""Issue 17: a run cannot be corrupted silently. The CLI refuses to resume another run, extends a
finished one, skips damaged checkpoints, stops on non-finite numbers, and reports every bad input
in one `error:` line (exit 2) without leaving anything on disk."""

import dataclasses
import errno
import json
import pathlib
import re
import shutil
import warnings

import jax
import numpy as np
import pytest

from rl_jax import config as config_lib
from rl_jax import run_dir
from rl_jax.checkpoint import Checkpointer, CheckpointSaveError, CheckpointWarning
from rl_jax.metrics import read_metrics
from rl_jax.tasks.arithmetic import ArithmeticTask
from rl_jax.train import main

FLAT_CONFIG = pathlib.Path(__file__).parent / "fixtures" / "flat_config.json"
# eval_prompts=0 with eval_every=1: evaluation is disabled (it crashed at step 0 before).
TINY = ["prompts_per_step=2", "group_size=2", "eval_every=1", "eval_prompts=0"]
TINY += ["checkpoint_every=1", "keep_checkpoints=3"]


def cli(capsys, out, *args):
    """(exit status, error lines on stderr) of `python -m rl_jax.train embedded TINY args`."""
    status = main(["embedded", *TINY, *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return status, [line for line in err.splitlines() if line.startswith("error:")]


def untimed(out):
    return [
        {k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))}
        for m in read_metrics(out)
    ]


def snapshot(directory):
    """{relative path: bytes} of every file under `directory`."""
    root = pathlib.Path(directory)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2 (never modified by the tests)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["embedded", *TINY, "steps=2", "--out", str(out)]) == 0
    return out


def test_identity_is_every_field_but_length_cadence_and_place():
    names = set(config_lib.field_paths())
    assert run_dir.RESUMABLE_FIELDS < names
    identity = run_dir.identity(dataclasses.asdict(config_lib.build("embedded")))
    assert set(identity) == names - run_dir.RESUMABLE_FIELDS
    assert run_dir.identity({}) == identity  # fields missing from an old config: their defaults


def _fake_run(out, **fields):
    """A run directory holding one checkpoint (step 2) of `fields`, without training."""
    cfg = config_lib.build("embedded", **{**fields, "out_dir": str(out)})
    with Checkpointer(out / run_dir.CHECKPOINT_DIR, save_every=1) as checkpointer:
        checkpointer.save(2, {"x": np.zeros(2)}, {"step": 2, "config": cfg.to_json()})
    run_dir.write_config(cfg)
    return snapshot(out)


@pytest.mark.parametrize(
    "override, field",
    [
        ("algorithm=reinforce", "algorithm.name='grpo' -> 'reinforce'"),
        ("learning_rate=1e-3", "optimizer.learning_rate=2e-05 -> 0.001"),
        ("group_size=4", "group_size=2 -> 4"),
        ("model=tiny", "model='warm-start' -> 'tiny'"),
    ],
)
def test_another_run_is_refused_before_anything_is_written(tmp_path, capsys, override, field):
    out = tmp_path / "run"
    before = _fake_run(out, prompts_per_step=2, group_size=2, eval_prompts=0, steps=2)
    status, errors = cli(capsys, out, "steps=2", override)
    assert status == 2 and len(errors) == 1, errors
    assert f"holds a different run (its checkpoint of step 2): {field};" in errors[0]
    assert "pass another --out or delete" in errors[0]
    assert snapshot(out) == before  # config.json included


def test_fewer_steps_and_a_decaying_schedule_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    before = _fake_run(out, prompts_per_step=2, group_size=2, eval_prompts=0, steps=2)
    status, errors = cli(capsys, out, "steps=1")
    assert status == 2 and errors == [
        f"error: steps=1 is below the newest checkpoint of the run in {out}, step 2; to continue "
        f"it, pass steps>=2; to start a new run, pass another --out or delete {out}"
    ]
    assert snapshot(out) == before
    cosine = tmp_path / "cosine"
    _fake_run(cosine, lr_schedule="cosine", prompts_per_step=2, group_size=2, eval_prompts=0)
    status, errors = cli(capsys, cosine, "steps=500", "lr_schedule=cosine")
    assert status == 2 and "steps=400 -> 500 (optimizer.schedule='cosine' decays" in errors[0]


def test_config_json_alone_identifies_a_run_without_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    cfg = config_lib.build("embedded", prompts_per_step=2, group_size=2, eval_prompts=0)
    (out / "config.json").write_text(cfg.to_json())
    status, errors = cli(capsys, out, "seed=3")
    assert (
        status == 2 and f"holds a different run ({out / 'config.json'}): seed=0 -> 3" in errors[0]
    )


def _flat_layout(nested: dict) -> dict:
    """A config in the flat layout of the code before the config had parts: its fields (those of
    tests/fixtures/flat_config.json, written by that code) at the top level, by their old names."""
    old_names = set(json.loads(FLAT_CONFIG.read_text()))
    old_name = {path: alias for alias, path in config_lib.ALIASES.items()}
    flat = config_lib.flatten(nested)
    renamed = {old_name.get(path, path.rpartition(".")[2]): value for path, value in flat.items()}
    return {name: value for name, value in renamed.items() if name in old_names}


def test_a_run_written_in_the_flat_layout_resumes(finished, tmp_path, capsys):
    """config.json and every checkpoint's stored config rewritten in the flat layout: the run
    is still recognised as itself and extended; a changed field is refused by its path."""
    out = tmp_path / "flat"
    shutil.copytree(finished, out)
    flat = _flat_layout(json.loads((out / "config.json").read_text()))
    assert set(flat) == set(json.loads(FLAT_CONFIG.read_text()))  # every old field
    (out / "config.json").write_text(json.dumps(flat))
    for meta in (out / run_dir.CHECKPOINT_DIR).glob("*/meta/metadata"):
        stored = json.loads(meta.read_text())
        meta.write_text(json.dumps({**stored, "config": json.dumps(flat)}))
    status, errors = cli(capsys, out, "steps=3", "sync_interval=2")
    assert status == 2 and "sync.interval=1 -> 2" in errors[0]
    assert cli(capsys, out, "steps=3") == (0, [])
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["sync"] == {"interval": 1, "offset": 0}


def test_a_finished_run_is_extended_as_if_it_had_run_longer(finished, tmp_path, capsys):
    extended, reference = tmp_path / "extended", tmp_path / "reference"
    shutil.copytree(finished, extended)
    assert cli(capsys, extended, "steps=3") == (0, [])  # was: policy version 2 never snapshotted
    assert cli(capsys, reference, "steps=3") == (0, [])
    assert untimed(extended) == untimed(reference)
    assert [m["step"] for m in read_metrics(extended)] == [1, 2, 3]


def _overwrite_largest_data_file(step_dir):
    """Issue 17's damage: 4,096 random bytes into the largest data file, same size."""
    largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    size = largest.stat().st_size
    with open(largest, "r+b") as file:
        file.seek(size // 2)
        file.write(np.random.default_rng(17).bytes(4096))
    assert largest.stat().st_size == size


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_latest_checkpoint_is_reported_and_skipped(finished, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(finished, damaged)
    _overwrite_largest_data_file(damaged / "checkpoints" / "2")
    # Where the bytes land varies with the file layout: in a raw (incompressible) chunk they
    # decode, and only the checksums see them (pinned in test_checkpoint.py); in a compressed one
    # the read fails. Either way the checkpoint is reported and skipped, never loaded.
    with pytest.warns(CheckpointWarning, match="step 2 .*(ChecksumError|error while reading)"):
        assert cli(capsys, damaged, "steps=2") == (0, [])
    assert untimed(damaged) == untimed(finished)  # step 2 was trained again, identically
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # the new step 2 verifies
        assert cli(capsys, damaged, "steps=2") == (0, [])


def test_nan_reward_is_rejected_naming_completion_and_prompt(tmp_path, capsys, monkeypatch):
    reward = ArithmeticTask.reward
    calls = []

    def reward_nan_on_third(self, completion, example):
        calls.append(example.prompt)
        return float("nan") if len(calls) == 3 else reward(self, completion, example)

    monkeypatch.setattr(ArithmeticTask, "reward", reward_nan_on_third)
    out = tmp_path / "new" / "run"
    status, errors = cli(capsys, out, "steps=2")
    assert status == 2 and len(errors) == 1
    assert "the task's reward is nan (rewards must be finite) for the completion '" in errors[0]
    assert f"of the prompt '{calls[2]}' (row 2; 1 of 4 rewards" in errors[0]
    assert not (tmp_path / "new").exists()  # created by the run, removed: nothing was written


def test_non_finite_update_stops_before_it_is_applied_or_saved(tmp_path, capsys):
    out = tmp_path / "run"
    status, errors = cli(capsys, out, "steps=3", "learning_rate=1e38")
    assert status == 1 and len(errors) == 1, errors
    # The symptom: the loss reads 0 while the gradient is NaN. Step 1 moves every
    # parameter by ~1e38; which later step's gradient is the first non-finite one depends on
    # the data.
    found = re.match(
        r"error: step (\d+): non-finite grad_norm=nan \(loss=0, grad_norm=nan\)", errors[0]
    )
    assert found, errors[0]
    bad = int(found.group(1))
    assert bad >= 2 and "the update was not applied" in errors[0]
    with Checkpointer(out / "checkpoints", save_every=1) as checkpointer:
        assert checkpointer.steps == list(range(1, bad))
    assert [m["step"] for m in read_metrics(out)] == list(range(1, bad))


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "task_options.foo=1",
            "unknown task_options key(s) ['foo'] for task 'arithmetic'; allowed",
        ),
        ("task_options.max_terms=x", "task_options.max_terms must be of type int, got 'x'"),
        (
            "seed=-1",
            "seed must be an integer in [0, 4294967295] (the last of num_seeds too), got -1",
        ),
        (f"fsdp={jax.device_count() + 2}", "fsdp must be a divisor of the device count"),
        ("runs_per_batch=2", "runs_per_batch must divide num_seeds = 1 (one of [1]), got 2"),
        ("temperature=NaN", "temperature must be a finite number, got nan"),
        ("algorithm=nonsense", "algorithm must be one of ['reinforce', 'grpo'"),
    ],
)
def test_bad_input_is_one_error_line_and_leaves_nothing(tmp_path, capsys, override, message):
    status, errors = cli(capsys, tmp_path / "run", "steps=2", override)
    assert status == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "run").exists()


def test_read_only_out_dir_is_one_error_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro" / "run"

    def read_only(self, *args, **kwargs):  # root ignores chmod; a read-only mount does not
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    assert cli(capsys, out, "steps=2") == (2, [f"error: {out}: Read-only file system"])
    assert not (tmp_path / "ro").exists()


def test_full_disk_is_one_error_line(tmp_path, capfd, monkeypatch):
    message = f"could not save the checkpoint of step 2 in {tmp_path}: No space left on device"

    def full_disk(config):
        raise CheckpointSaveError(message)

    monkeypatch.setattr("rl_jax.train.train", full_disk)
    assert main(["embedded", "--out", str(tmp_path / "run")]) == 1
    assert capfd.readouterr().err == f"error: {message}\n"


def test_eval_prompts_zero_disables_evaluation():
    gsm8k = config_lib.build("gsm8k-qwen2.5-1.5b")
    assert gsm8k.eval_prompts == 0 and not any(gsm8k.evaluates_at(k) for k in (0, 20, 400))
    embedded = config_lib.build("embedded", eval_every=20, steps=50)
    assert [k for k in range(51) if embedded.evaluates_at(k)] == [0, 20, 40, 50]
    assert json.loads(embedded.to_json())["eval_prompts"] == 128
