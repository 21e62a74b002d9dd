"""Device mesh and sharding helpers (DESIGN.md §6).

One process per host; JAX SPMD over a mesh with a `data` axis (the batch) and an `fsdp` axis
(parameters of large models). `jit` with `NamedSharding` inputs does the rest: XLA inserts the
all-reduces, so sums over the batch are exact across devices. The same code runs on one CPU.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rl_jax import compat

DATA, FSDP = "data", "fsdp"


def initialize_distributed() -> None:
    """Joins a multi-process job when the environment describes one; a no-op otherwise.

    Call it before anything touches a device. On any machine, JAX_COORDINATOR_ADDRESS
    (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID (0 .. n - 1) describe the
    job; JAX reads only the address itself, so the other two are passed explicitly. Without
    them, a SLURM job of several tasks or a multi-host TPU slice is detected by JAX's own cluster
    detection (`jax.distributed.initialize()` without arguments). After it, `jax.devices()` lists
    the devices of every process.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        counts = {}
        for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
            try:
                counts[name] = int(env[name])
            except (KeyError, ValueError):
                raise ValueError(
                    f"{name} must be set to an integer when JAX_COORDINATOR_ADDRESS is set, "
                    f"got {env.get(name)!r}"
                ) from None
        num, index = counts["JAX_NUM_PROCESSES"], counts["JAX_PROCESS_ID"]
        if num < 1 or not 0 <= index < num:
            raise ValueError(f"JAX_PROCESS_ID must be in [0, JAX_NUM_PROCESSES={num}), got {index}")
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=num,
            process_id=index,
        )  # fmt: skip
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


CPU_DEVICES_ENV = "RL_JAX_CPU_DEVICES"


def cpu_device_count(rows: int, environ=None, cores: int | None = None) -> int | None:
    """How many XLA:CPU devices `use_cpu_cores` asks for: `RL_JAX_CPU_DEVICES` if set, else the
    largest count <= the cores this process may run on that divides `rows`; None (leave JAX's
    default) when XLA_FLAGS sets a count or the environment describes a multi-process job."""
    env = os.environ if environ is None else environ
    if (
        "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "")
        or env.get("JAX_COORDINATOR_ADDRESS")
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    ):
        return None
    wanted = env.get(CPU_DEVICES_ENV, "")
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise ValueError(f"{CPU_DEVICES_ENV} must be an integer >= 1, got {wanted!r}")
        return int(wanted)
    cores = cores or len(os.sched_getaffinity(0))
    return max(n for n in range(1, cores + 1) if rows % n == 0)


def use_cpu_cores(rows: int) -> int | None:
    """Before JAX starts: one XLA:CPU device per core, so that a batch's `rows` split over them.

    XLA:CPU runs one device's small operations (a decode step of 64 rows, the tiny policy's
    elementwise work) on about one core; with one device per core the rows of each device run in
    parallel: the embedded default's sampling ~1.6x faster on 2 cores, its update unchanged
    (BENCHMARKS.md, "One device per core"). `cpu_device_count` says how many; nothing changes once JAX has started or
    where `jax_num_cpu_devices` is already set, and an accelerator's devices are not affected.
    Returns the count set, or None.
    """
    count = cpu_device_count(rows)
    if count is None or not compat.set_cpu_device_count(count):
        return None
    return count


def to_host(tree):
    """numpy copies of (possibly globally sharded) arrays, whole on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def from_host(x, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds whole (one or many processes)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A `[data, fsdp]` mesh over all devices (of all hosts); `fsdp` must divide the count."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    if fsdp < 1 or devices.size % fsdp:
        raise ValueError(f"fsdp must be a divisor of the device count {devices.size}, got {fsdp}")
    return Mesh(devices.reshape(devices.size // fsdp, fsdp), (DATA, FSDP))


def rows_spec(mesh: Mesh, axis: int = 0) -> PartitionSpec:
    """Axis `axis` (the batch rows) split over every device, i.e. over all axes of `mesh`; the
    axes before it whole. The one statement of "rows over all devices" (sampler, learner, loop)."""
    return PartitionSpec(*([None] * axis), tuple(mesh.axis_names))


def rows_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """`rows_spec` as a sharding: axis `axis` split over every device of `mesh`."""
    return NamedSharding(mesh, rows_spec(mesh, axis))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return rows_sharding(mesh, 0)


def check_rows(rows: int, devices: int, what: str = "the batch") -> None:
    """Rows split evenly over the devices: `rows` must be a multiple of `devices`."""
    if rows % devices:
        raise ValueError(f"{what} = {rows} rows must divide over the {devices} devices")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(params, mesh: Mesh):
    """Replicated parameters, or with fsdp > 1 each leaf's largest divisible axis over `fsdp`."""
    size = mesh.shape[FSDP]

    def spec(x):
        if size == 1 or x.ndim == 0:
            return replicated(mesh)
        axes = sorted(range(x.ndim), key=lambda a: -x.shape[a])
        for a in axes:
            if x.shape[a] % size == 0:
                parts = [None] * x.ndim
                parts[a] = FSDP
                return NamedSharding(mesh, PartitionSpec(*parts))
        return replicated(mesh)

    return jax.tree.map(spec, params)


def shard_batch(batch, mesh: Mesh):
    """Places every leaf of a host batch with its leading axis over the devices of `mesh`."""
    n = mesh.local_mesh.devices.size

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("every leaf of a batch needs a leading batch axis, got a scalar")
        check_rows(x.shape[0], n, "the batch axis of this process")
        # Each process passes its own rows; with one process this is a plain device_put.
        return jax.make_array_from_process_local_data(batch_sharding(mesh), x)

    return jax.tree.map(put, batch)
