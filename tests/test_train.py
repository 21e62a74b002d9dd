"""The RL loop end to end on the warm-started tiny policy: sync schedule, staleness, resume."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rl_jax import config as config_lib
from rl_jax.checkpoint import Checkpointer
from rl_jax.metrics import read_metrics
from rl_jax.train import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = {
    "prompts_per_step": 4,
    "group_size": 4,
    "eval_every": 0,
    "checkpoint_every": 0,
    "learning_rate": 3e-4,
}


def run(tmp_path, name, **fields):
    cfg = config_lib.build("embedded", **{**SMALL, **fields, "out_dir": str(tmp_path / name)})
    return train(cfg)


@pytest.mark.parametrize(
    "interval,offset,steps",
    [(1, 0, 3), (20, 0, 22), (1, 10, 13), (1000, 0, 3)],
    ids=["on-policy", "interval-20", "offset-10", "offline"],
)
def test_staleness_follows_the_schedule(tmp_path, interval, offset, steps):
    result = run(tmp_path, "r", sync_interval=interval, sync_offset=offset, steps=steps)
    schedule = result.config.sync
    logged = read_metrics(tmp_path / "r")
    assert [m["step"] for m in logged] == list(range(1, steps + 1))
    for m in logged:
        k = m["step"]
        assert m["policy_version"] == schedule.version_for_step(k)
        assert m["staleness/max"] == m["staleness/mean"] == schedule.staleness(k)
        assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
    # The first batch is scored by the initial policy itself, so kl/ref is 0 up to rounding: the
    # learner's forward is differentiated and the reference's is not, two programs that XLA may
    # fuse differently (3.6e-16 on an Intel AVX-512 host, exactly 0 on AMD ones). A k2 of 1e-12
    # means log-probs 1.4e-6 apart, far above float32 rounding of log-probs near -1.
    assert abs(logged[0]["kl/ref"]) < 1e-12
    if (interval, offset) == (1, 0):
        for m in logged:  # on-policy: the learner recomputes exactly the behaviour log-probs
            assert abs(m["ratio/min"] - 1) < 1e-4 and abs(m["ratio/max"] - 1) < 1e-4, m
            assert m["kl/behaviour"] < 1e-8
    else:  # stale data: the learner has moved away from the behaviour policy
        assert max(abs(m["ratio/max"] - 1) for m in logged[1:]) > 1e-3
    np.testing.assert_array_equal(result.state.learner.step, [steps])
    np.testing.assert_array_equal(
        result.state.sampler.policy_version, [schedule.version_for_step(steps)]
    )


def _train_command(out, steps):
    fields = {**SMALL, "steps": steps, "checkpoint_every": 2, "sync_interval": 3}
    overrides = [f"{k}={json.dumps(v)}" for k, v in fields.items()]
    return [sys.executable, "-m", "rl_jax.train", "embedded", *overrides, "--out", str(out)]


def test_sigkill_and_rerun_resumes_bit_for_bit(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax"))
    steps = 10
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_train_command(reference, steps), env=env, check=True, capture_output=True)

    proc = subprocess.Popen(
        _train_command(killed, steps), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = (
            [m["step"] for m in read_metrics(killed)] if (killed / "metrics.jsonl").exists() else []
        )
        if done and done[-1] >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [m["step"] for m in read_metrics(killed)][-1] < steps, "the run finished before the kill"

    rerun = subprocess.run(_train_command(killed, steps), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "resuming" in rerun.stdout

    untimed = lambda ms: [
        {k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))} for m in ms
    ]
    assert untimed(read_metrics(killed)) == untimed(read_metrics(reference))
    finals = []
    for out in (reference, killed):
        with Checkpointer(out / "checkpoints", save_every=2) as ckpt:
            assert ckpt.steps[-1] == steps
        path = out / "checkpoints" / str(steps) / "state"
        # As numpy arrays: the CLI's run may have used more devices than this process has.
        checkpointer = ocp.PyTreeCheckpointer()
        restore_args = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
            checkpointer.metadata(path).item_metadata.tree,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # orbax: no _CHECKPOINT_METADATA file
            state = checkpointer.restore(path, restore_args=restore_args)
        finals.append(state["learner"])
    for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1]), strict=True):
        np.testing.assert_array_equal(a, b)
