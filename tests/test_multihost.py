"""Two processes with two CPU devices each (jax.distributed on 127.0.0.1, gloo collectives) run
the embedded default as one job: the same metrics and parameters as one process with four
devices, a SIGKILL of one process followed by a restart of both resumes, and a SIGTERM to both
saves one step (with checksums of every shard) that a restart resumes."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rl_jax import build, checkpoint, parallel
from rl_jax import config as config_lib
from rl_jax.checkpoint import Checkpointer
from rl_jax.metrics import read_metrics
from rl_jax.train import make_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIELDS = {
    "prompts_per_step": 2,
    "group_size": 4,
    "steps": 4,
    "sync_interval": 2,
    "checkpoint_every": 2,
    "eval_every": 2,
    "eval_prompts": 8,
    "learning_rate": 3e-4,
}
UNTIMED = lambda ms: [
    {k: v for k, v in m.items() if not k.startswith(("time/", "thro"))} for m in ms
]


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax"))
    return env


def _command(out: pathlib.Path) -> list[str]:
    overrides = [f"{k}={json.dumps(v)}" for k, v in FIELDS.items()]
    return [sys.executable, "-m", "rl_jax.train", "embedded", *overrides, "--out", str(out)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_job(out: pathlib.Path) -> list[subprocess.Popen]:
    port = _free_port()
    return [
        subprocess.Popen(
            _command(out),
            env=_env(
                2,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def _finish(procs, timeout=900) -> list[str]:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text[-3000:]
    return outputs


def _final_params(out: pathlib.Path) -> list[np.ndarray]:
    """The learner's parameters in the run's last checkpoint, restored onto this process's one
    device (the run's own resume path, with a target placed here)."""
    config = config_lib.build("embedded", **FIELDS, out_dir=str(out))
    run = build.build_run(config)
    target = make_step(config, run, parallel.make_mesh(1)).init(run.params, [config.seed])
    target = jax.tree.map(lambda x: x[0], target)
    with Checkpointer(out / "checkpoints", save_every=2) as ckpt:
        step, state, _ = ckpt.restore_latest(target)
    assert step == FIELDS["steps"]
    return [np.asarray(x) for x in jax.tree.leaves(state.learner.params)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost") / "one-process"
    subprocess.run(_command(out), env=_env(4), check=True, capture_output=True, timeout=900)
    return out


def test_two_processes_equal_one_process_with_the_same_devices(reference, tmp_path):
    out = tmp_path / "two-processes"
    outputs = _finish(_start_job(out))
    assert "step 4/4" in outputs[0]
    assert not (out / "metrics.jsonl").read_text().count('"step": 5')
    got, want = UNTIMED(read_metrics(out)), UNTIMED(read_metrics(reference))
    assert [m["step"] for m in got] == [0, 1, 2, 3, 4]
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(_final_params(out), _final_params(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sigkill_of_one_process_then_a_restart_of_both_resumes(reference, tmp_path):
    out = tmp_path / "killed"
    procs = _start_job(out)
    deadline = time.time() + 900
    while time.time() < deadline:
        steps = [m["step"] for m in read_metrics(out)] if (out / "metrics.jsonl").exists() else []
        if (out / "checkpoints" / "2").is_dir() and steps and steps[-1] >= 2:
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)  # one host dies; its partner is stopped by the launcher
    procs[1].wait()
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    assert not (out / "checkpoints" / "4").is_dir(), "the job finished before the kill"

    outputs = _finish(_start_job(out))
    assert "resuming" in outputs[0]
    got, want = UNTIMED(read_metrics(out)), UNTIMED(read_metrics(reference))
    assert [m["step"] for m in got] == [0, 1, 2, 3, 4]
    for a, b in zip(got, want, strict=True):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_sigterm_to_both_processes_saves_the_same_step_and_a_restart_resumes(reference, tmp_path):
    out = tmp_path / "preempted"
    procs = _start_job(out)
    deadline = time.time() + 900
    while time.time() < deadline and not (
        (out / "metrics.jsonl").exists() and [m for m in read_metrics(out) if m["step"] >= 1]
    ):
        time.sleep(0.05)
    for proc in procs:  # a preempted slice: every host gets the signal
        proc.send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], [text[-3000:] for text in outputs]
    stopped = read_metrics(out)[-1]["step"]
    assert 1 <= stopped < FIELDS["steps"], "the job finished before the signal"
    for text in outputs:
        assert f"preempted at step {stopped}: saved checkpoint {stopped} in {out}" in text
    assert checkpoint.finished_steps(out / "checkpoints")[-1] == stopped
    # The state is spread over both processes: every array is checksummed shard by shard.
    checksums = checkpoint.read_meta(out / "checkpoints", stopped)[checkpoint.CHECKSUMS_KEY]
    assert all(isinstance(shards, dict) and shards for shards in checksums.values())

    outputs = _finish(_start_job(out))  # verifies the shards it restores
    assert f"resuming {out} from step {stopped}" in outputs[0]
    got, want = UNTIMED(read_metrics(out)), UNTIMED(read_metrics(reference))
    assert [m["step"] for m in got] == [0, 1, 2, 3, 4]
    for a, b in zip(got, want, strict=True):  # 2 x 2 devices vs 1 x 4: a different program
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(_final_params(out), _final_params(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # whole-array restore checks shards
