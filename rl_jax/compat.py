"""The one home of JAX calls whose name or place differs between the releases rl_jax runs on.

rl_jax is tested on jax 0.10.2 (the version the CPU machines' index serves) and is written to
run on jax 0.11.x (the accelerator images). Calls that moved or were renamed between releases go
through the functions here, each choosing by feature (what the installed jax has), not by
version number, so that the rest of the package uses one spelling.
"""

from __future__ import annotations

import jax


def to_varying(tree, axes: tuple[str, ...]):
    """`tree` marked as varying over the mesh `axes` inside `shard_map` (so that differentiating
    it adds no all-reduce): `jax.lax.pcast(..., to="varying")`, named `jax.lax.pvary` before it."""
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(tree, axes, to="varying")
    return jax.lax.pvary(tree, axes)


def shard_map(fn, *, mesh, in_specs, out_specs, check_vma: bool = True):
    """`jax.shard_map`, found in `jax.experimental.shard_map` in older releases (where
    `check_vma` was named `check_rep`)."""
    specs = {"mesh": mesh, "in_specs": in_specs, "out_specs": out_specs}
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, **specs, check_vma=check_vma)
    from jax.experimental.shard_map import shard_map as experimental_shard_map

    return experimental_shard_map(fn, **specs, check_rep=check_vma)


def set_cpu_device_count(count: int) -> bool:
    """Asks XLA:CPU for `count` devices (`jax_num_cpu_devices`) unless JAX has started or the
    option is already set; returns whether it took effect. False where this jax lacks the
    option (then `XLA_FLAGS=--xla_force_host_platform_device_count=N` is the way)."""
    current = getattr(jax.config, "jax_num_cpu_devices", None)
    if current is None or current != -1:
        return False
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX has started: its devices stay as they are
        return False
    return True
