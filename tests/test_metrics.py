"""Tests for rl_jax.metrics: the JSONL format, resume truncation and the console views."""

import json
import math
import re
import struct
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from rl_jax import metrics as metrics_lib
from rl_jax.metrics import MetricsWriter, read_metrics


def _strict_json(line):
    """json.loads that rejects the non-standard NaN/Infinity tokens."""

    def reject(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=reject)


def _step_metrics(step):
    return {"reward/mean": step / 4, "kl/ref": np.float32(0.5) * step, "entropy": jnp.float32(2.0)}


def _run(out_dir, steps, resume_step=0, total_steps=6):
    options = {"tensorboard": False, "progress": False, "resume_step": resume_step}
    with MetricsWriter(out_dir, total_steps, **options) as writer:
        for step in steps:
            writer.write(step, _step_metrics(step))


def test_round_trip_converts_scalars_and_keeps_non_finite(tmp_path):
    with MetricsWriter(tmp_path, 3, tensorboard=False, progress=False) as writer:
        writer.write(1, {"a": jnp.float32(0.25), "b": np.int32(3), "c": True, "d": 1.5})
        writer.write(2, {"a": float("nan"), "b": jnp.inf, "c": -np.inf, "d": jnp.array(-0.0)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert _strict_json(lines[0]) == {"step": 1, "a": 0.25, "b": 3.0, "c": 1.0, "d": 1.5}
    assert _strict_json(lines[1]) == {
        "step": 2,
        "a": "NaN",
        "b": "Infinity",
        "c": "-Infinity",
        "d": -0.0,
    }
    first, second = read_metrics(tmp_path)
    assert first == {"step": 1, "a": 0.25, "b": 3.0, "c": 1.0, "d": 1.5}
    assert all(type(value) is float for name, value in first.items() if name != "step")
    assert math.isnan(second["a"]) and second["b"] == math.inf and second["c"] == -math.inf
    assert read_metrics(tmp_path / "metrics.jsonl")[0] == first


@pytest.mark.parametrize(
    "metrics, message",
    [
        ({"v": np.zeros(2)}, "real scalar"),
        ({"v": "high"}, "real scalar"),
        ({"v": 1j}, "real"),
        ({"step": 1.0}, "reserved"),
    ],
)
def test_write_rejects_bad_metrics(tmp_path, metrics, message):
    with MetricsWriter(tmp_path, 3, tensorboard=False, progress=False) as writer:
        with pytest.raises(ValueError, match=message):
            writer.write(1, metrics)


def test_write_rejects_decreasing_steps_and_bad_config(tmp_path):
    with MetricsWriter(tmp_path, 3, tensorboard=False, progress=False) as writer:
        writer.write(2, {"v": 1.0})
        writer.write(2, {"eval/v": 1.0})  # a second record for the same step is allowed
        with pytest.raises(ValueError, match="before the last logged step 2"):
            writer.write(1, {"v": 1.0})
    for kwargs, field in [
        ({"total_steps": 0}, "total_steps"),
        ({"log_every": 0}, "log_every"),
        ({"resume_step": 4}, "resume_step"),
    ]:
        with pytest.raises(ValueError, match=field):
            MetricsWriter(tmp_path, **{"total_steps": 3, "tensorboard": False, **kwargs})


def test_resume_truncates_to_the_checkpoint_step(tmp_path):
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    _run(uninterrupted, range(1, 7))
    _run(resumed, range(1, 6))
    with open(resumed / "metrics.jsonl", "a") as file:
        file.write('{"step": 6, "reward/me')  # a kill in the middle of a line
    with pytest.warns(UserWarning, match="torn last line 6"):
        _run(resumed, range(4, 7), resume_step=3)  # the checkpoint of step 3 is restored
    expected = (uninterrupted / "metrics.jsonl").read_bytes()
    assert (resumed / "metrics.jsonl").read_bytes() == expected
    assert [record["step"] for record in read_metrics(resumed)] == [1, 2, 3, 4, 5, 6]
    assert not (resumed / "metrics.jsonl.tmp").exists()
    _run(resumed, [1], resume_step=0)  # a fresh start forgets the old run
    assert [record["step"] for record in read_metrics(resumed)] == [1]


def test_resume_refuses_a_gap_before_the_checkpoint_step(tmp_path):
    _run(tmp_path, range(1, 41), total_steps=40)
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    torn = "".join(lines[:24]) + lines[24][:10]  # issue 17: torn at line 25, checkpoint at 30
    path.write_text(torn)
    with pytest.raises(metrics_lib.MetricsGapError, match="lacks the lines of steps 25-30 but"):
        _run(tmp_path, [31], resume_step=30, total_steps=40)
    assert path.read_text() == torn  # refused before anything was changed
    path.write_text("".join(lines[:3] + lines[4:]))  # one line lost in the middle
    with pytest.raises(metrics_lib.MetricsGapError, match="steps 4 but .* step 30"):
        _run(tmp_path, [31], resume_step=30, total_steps=40)
    path.unlink()
    with pytest.raises(metrics_lib.MetricsGapError, match="metrics.jsonl is missing but"):
        _run(tmp_path, [31], resume_step=30, total_steps=40)
    assert not path.exists()


def test_torn_last_line_warns_and_bad_middle_line_raises(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "v": 0.5}\n{"step": 2, "v"')
    with pytest.warns(UserWarning, match="torn last line 2"):
        assert read_metrics(path) == [{"step": 1, "v": 0.5}]
    path.write_text('{"step": 1, "v"\n{"step": 2, "v": 0.5}\n')
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        read_metrics(path)


def test_plain_lines_every_log_every_and_at_the_end(tmp_path, capsys):
    with MetricsWriter(tmp_path, 7, tensorboard=False, progress=False, log_every=3) as writer:
        for step in range(1, 8):
            writer.write(step, {**_step_metrics(step), "response_length/mean": 12.0, "other": 1})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["3/7", "6/7", "7/7"]
    pattern = (
        r"step 3/7 reward/mean=0.75 kl/ref=1.5 entropy=2 response_length/mean=12 \(\d+\.\d s\)"
    )
    assert re.fullmatch(pattern, lines[0])


def test_progress_bar_shows_key_numbers(tmp_path, capsys):
    _run(tmp_path, [1], total_steps=4)  # a resumed run has the lines before its checkpoint
    capsys.readouterr()
    with MetricsWriter(tmp_path, 4, tensorboard=False, progress=True, resume_step=1) as writer:
        writer.write(2, _step_metrics(2))
        writer.write(4, _step_metrics(4))
    out = capsys.readouterr().out
    assert "4/4" in out and "reward=1" in out and "kl=2" in out and "entropy=2" in out
    assert "step 4/4" not in out  # no plain lines with the bar


def _tensorboard_scalars(directory):
    """(step, tag, value) of every scalar event and the purge steps, read from event files."""
    from tensorboardX.proto.event_pb2 import Event

    scalars, purges = [], []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log"):
                purges.append(event.step)
            for value in event.summary.value:
                scalars.append((event.step, value.tag, value.simple_value))
    return scalars, purges


def test_tensorboard_scalars_and_purge_step_on_resume(tmp_path):
    _run(tmp_path, [1, 2], total_steps=3)  # JSONL only: the events below are the resumed run's
    with MetricsWriter(tmp_path, 3, progress=False, resume_step=2) as writer:
        writer.write(3, {"reward/mean": 0.5, "kl/ref": float("nan")})
    scalars, purges = _tensorboard_scalars(tmp_path / metrics_lib.TENSORBOARD_DIR)
    assert scalars[0] == (3, "reward/mean", 0.5)
    assert scalars[1][:2] == (3, "kl/ref") and math.isnan(scalars[1][2])
    assert purges == [3]  # events of earlier runs at steps >= 3 are discarded


def test_missing_tensorboardx_is_one_warning_line_and_metrics_go_on(tmp_path, monkeypatch, capsys):
    """On an image without tensorboardX (the lent GPU machines) a run keeps its metrics.jsonl and
    says in one line that the TensorBoard events are off and how to get them."""
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ImportError, match=r"need tensorboardX .* pip install"):
        metrics_lib._import_tensorboardx()
    with MetricsWriter(tmp_path / "run", 3, progress=False) as writer:
        writer.write(1, _step_metrics(1))
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        line.startswith("warning: TensorBoard events need tensorboardX")
        and "metrics.jsonl only" in line
    )
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1]
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_labelled_lines_show_held_out_reward_when_evaluated(tmp_path, capsys):
    """Several seeds off a terminal: each line names its seed; an evaluation step gets a line of
    its own with the held-out reward; a writer with console=False prints nothing."""
    kwargs = {"tensorboard": False, "progress": False, "log_every": 10}
    with (
        MetricsWriter(tmp_path / "a", 4, label="seed 3", **kwargs) as shown,
        MetricsWriter(tmp_path / "b", 4, console=False, **kwargs) as hidden,
    ):
        for step in range(1, 5):
            extra = {"eval/reward": 0.625} if step == 2 else {}
            shown.write(step, {**_step_metrics(step), **extra})
            hidden.write(step, {**_step_metrics(step), **extra})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines] == [["seed", "3:", "step"]] * 2
    assert "step 2/4" in lines[0] and "eval/reward=0.625" in lines[0]
    assert "step 4/4" in lines[1] and "eval/reward" not in lines[1]
    assert [m["step"] for m in read_metrics(tmp_path / "b")] == [1, 2, 3, 4]
