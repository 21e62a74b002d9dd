"""Issue 35: a SIGTERM or SIGINT saves the step in hand and a rerun resumes it bit for bit; a
second signal stops at once and keeps the last complete checkpoint; one run owns its directory.

The CLI runs in subprocesses (signals, exit statuses). `STOPPER` wraps the CLI to signal itself
at a chosen point (inside sampling, or with a save that a second signal interrupts), so the
step at which the run stops is deterministic."""

import fcntl
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from rl_jax import checkpoint, run_lock
from rl_jax.metrics import read_metrics
from rl_jax.train import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIELDS = {
    "prompts_per_step": 2,
    "group_size": 4,
    "eval_every": 0,
    "checkpoint_every": 2,
    "sync_interval": 3,
    "learning_rate": 3e-4,
    "steps": 5,
}
STOPPER = """
import os, signal, sys, time
from rl_jax import checkpoint, host_side, train

mode, stop_at = sys.argv[1], 3
if mode == "sampling":  # the signal arrives while step 3's batch is being generated
    sample = host_side.HostSide._sample_window
    def _sample_window(self, state, step):
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGINT)
        return sample(self, state, step)
    host_side.HostSide._sample_window = _sample_window
else:  # "save": signalled during step 3; the save of step 3 then hangs until signalled again
    learn_step = host_side.HostSide.step
    def step(self, state, k):
        if k == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return learn_step(self, state, k)
    host_side.HostSide.step = step
    save = checkpoint.Checkpointer.save
    def slow_save(self, k, state, meta):
        if k == stop_at:
            print(f"saving {k}", flush=True)
            time.sleep(600)
        return save(self, k, state, meta)
    checkpoint.Checkpointer.save = slow_save
sys.exit(train.main(sys.argv[2:]))
"""


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax"))
    return env


def _args(out, **fields) -> list[str]:
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**FIELDS, **fields}.items()]
    return ["embedded", *overrides, "--out", str(out)]


def _cli(out, **fields) -> list[str]:
    return [sys.executable, "-m", "rl_jax.train", *_args(out, **fields)]


def _untimed(out) -> list[dict]:
    return [
        {k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))}
        for m in read_metrics(out)
    ]


def _rerun_equals(reference, out) -> None:
    rerun = subprocess.run(_cli(out), env=_env(), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "resuming" in rerun.stdout
    assert _untimed(out) == _untimed(reference)  # the same program on the same host: bit for bit
    assert checkpoint.finished_steps(out / "checkpoints")[-1] == FIELDS["steps"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("preemption") / "reference"
    subprocess.run(_cli(out), env=_env(), check=True, capture_output=True, timeout=900)
    return out


def test_sigterm_saves_the_step_in_hand_and_a_rerun_resumes_bit_for_bit(reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and read_metrics(out):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = (text.decode() for text in proc.communicate(timeout=600))
    assert proc.returncode == 143, stdout[-2000:] + stderr[-2000:]
    stopped = read_metrics(out)[-1]["step"]
    assert stopped < FIELDS["steps"], "the run finished before the signal"
    assert stdout.splitlines()[-1] == (
        f"preempted at step {stopped}: saved checkpoint {stopped} in {out}; rerun the same "
        "command to resume"
    )
    assert checkpoint.finished_steps(out / "checkpoints")[-1] == stopped
    assert not (out / run_lock.LOCK_FILE).exists()
    _rerun_equals(reference, out)


def _stopper(tmp_path, mode, out) -> subprocess.Popen:
    script = tmp_path / "stopper.py"
    script.write_text(STOPPER)
    command = [sys.executable, str(script), mode, *_args(out)]
    return subprocess.Popen(
        command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_sigint_during_sampling_finishes_that_step_and_saves_it(reference, tmp_path):
    out = tmp_path / "run"
    proc = _stopper(tmp_path, "sampling", out)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert f"preempted at step 3: saved checkpoint 3 in {out}" in stdout
    assert "SIGINT: stopping after the step in hand" in stderr
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    assert checkpoint.finished_steps(out / "checkpoints") == [2, 3]
    _rerun_equals(reference, out)


def test_a_second_signal_during_the_save_stops_at_once_keeping_the_last_checkpoint(
    reference, tmp_path
):
    out = tmp_path / "run"
    proc = _stopper(tmp_path, "save", out)
    for line in proc.stdout:  # blocks until the save of step 3 has begun
        if line == "saving 3\n":
            break
    else:
        pytest.fail(f"the run ended without saving step 3: {proc.communicate()}")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)  # at once, not after the 600 s save
    assert proc.returncode == 143, stdout[-2000:] + stderr[-2000:]
    assert "SIGTERM again: stopping at once" in stderr
    assert checkpoint.finished_steps(out / "checkpoints") == [2]
    _rerun_equals(reference, out)


def test_a_second_run_on_a_held_directory_is_refused_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rl_jax import run_lock\n"
         "with run_lock.hold(sys.argv[1]):\n print('held', flush=True); time.sleep(600)",
         str(out)],
        env=_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        before = sorted(p.name for p in out.iterdir())
        assert main(_args(out, prompts_per_step=2, steps=1)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out} is in use by another run (PID {holder.pid} on ")
        assert len(err.splitlines()) == 1, err
        assert sorted(p.name for p in out.iterdir()) == before == [run_lock.LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    assert main(_args(out, steps=1)) == 0  # the kernel released the dead holder's lock
    assert not (out / run_lock.LOCK_FILE).exists()


def test_a_holder_caught_before_it_writes_its_name_is_still_named(tmp_path):
    """The holder writes its line just after taking the lock; a refusal in between waits for it."""
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / run_lock.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    writer = threading.Timer(0.3, lambda: os.pwrite(fd, b"PID 42 on host, since now\n", 0))
    writer.start()
    try:
        with pytest.raises(
            run_lock.RunLockedError, match=r"in use by another run \(PID 42 on host"
        ):
            with run_lock.hold(out):
                pass
    finally:
        writer.join()
        os.close(fd)


@pytest.mark.parametrize("seeds", [(0, 0), (0, 1)], ids=["same-config", "other-seed"])
def test_two_runs_started_together_on_one_directory_leave_one_consistent_run(tmp_path, seeds):
    out = tmp_path / "run"
    procs = [
        subprocess.Popen(
            _cli(out, seed=seed, steps=3),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in seeds
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    statuses = [p.returncode for p in procs]
    assert sorted(statuses) == [0, 2], outputs
    winner, loser = seeds[statuses.index(0)], statuses.index(2)
    errors = outputs[loser][1].strip().splitlines()
    assert len(errors) == 1 and "is in use by another run (PID" in errors[0], errors
    assert json.loads((out / "config.json").read_text())["seed"] == winner
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    steps = checkpoint.finished_steps(out / "checkpoints")
    assert steps == [2, 3]
    for step in steps:
        stored = json.loads(checkpoint.read_meta(out / "checkpoints", step)["config"])
        assert stored["seed"] == winner
