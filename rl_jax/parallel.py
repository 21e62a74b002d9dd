"""Device mesh and sharding helpers (DESIGN.md §6).

One process per host; JAX SPMD over a mesh with a `data` axis (the batch) and an `fsdp` axis
(parameters of large models). `jit` with `NamedSharding` inputs does the rest: XLA inserts the
all-reduces, so sums over the batch are exact across devices. The same code runs on one CPU.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, FSDP = "data", "fsdp"


def initialize_distributed() -> None:
    """Joins a multi-host job (TPU pods, multi-node GPU); a no-op for one process.

    `jax.distributed.initialize()` reads the coordinator address, process count and id from the
    environment (TPU metadata, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID). After it, `jax.devices()` lists the devices of all hosts.
    """
    import os

    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS"):
        jax.distributed.initialize()


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A `[data, fsdp]` mesh over all devices (of all hosts); `fsdp` must divide the count."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    if fsdp < 1 or devices.size % fsdp:
        raise ValueError(f"fsdp must be a divisor of the device count {devices.size}, got {fsdp}")
    return Mesh(devices.reshape(devices.size // fsdp, fsdp), (DATA, FSDP))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec((DATA, FSDP)))


def run_batch_sharding(mesh: Mesh) -> NamedSharding:
    """`[runs, batch, ...]`: the run axis whole on every device, the batch split over all."""
    return NamedSharding(mesh, PartitionSpec(None, (DATA, FSDP)))


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
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(f"batch axis {x.shape[:1]} must be divisible by the {n} devices")
        # Each process passes its own rows; with one process this is a plain device_put.
        return jax.make_array_from_process_local_data(batch_sharding(mesh), x)

    return jax.tree.map(put, batch)
