"""One XLA:CPU device per core (`parallel.use_cpu_cores`): how many, and when JAX is left alone."""

import os
import pathlib
import subprocess
import sys

import pytest

from rl_jax import parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "rows, cores, environ, want",
    [
        (64, 2, {}, 2),
        (64, 6, {}, 4),  # the largest count that divides the rows
        (9, 2, {}, 1),
        (64, 2, {"RL_JAX_CPU_DEVICES": "1"}, 1),
        (64, 2, {"RL_JAX_CPU_DEVICES": "3"}, 3),  # as asked: the run then names the rows
        (64, 2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, None),
        (64, 2, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, None),
        (64, 2, {"SLURM_NTASKS": "2"}, None),
    ],
)
def test_cpu_device_count(rows, cores, environ, want):
    assert parallel.cpu_device_count(rows, environ, cores) == want


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_device_count_names_the_variable(value):
    with pytest.raises(ValueError, match="RL_JAX_CPU_DEVICES must be an integer >= 1"):
        parallel.cpu_device_count(64, {"RL_JAX_CPU_DEVICES": value}, 2)


SCRIPT = "from rl_jax import parallel; n = parallel.use_cpu_cores(64); import jax; print(n, jax.device_count())"


@pytest.mark.parametrize(
    "extra, want",
    [
        ({"RL_JAX_CPU_DEVICES": "2"}, "2 2"),
        ({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, "None 3"),
    ],
)
def test_use_cpu_cores_before_jax_starts(extra, want):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "RL_JAX_CPU_DEVICES")}
    env.update(PYTHONPATH=str(ROOT), **extra)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == want


def test_use_cpu_cores_leaves_a_started_jax_alone():
    import jax

    jax.devices()
    assert parallel.use_cpu_cores(64) is None
