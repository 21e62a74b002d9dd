"""`rl_jax.compat`: each call works through the installed jax's spelling and through the other
one (the releases differ; the fallback branch is taken by hiding the newer name)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from rl_jax import compat


def _sum_over_devices(shard_map_fn, mark_varying):
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))

    def per_device(w, x):
        w = mark_varying(w, ("data",))
        return jax.lax.psum(jax.grad(lambda w: jnp.sum(w * x))(w), ("data",))

    fn = shard_map_fn(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    return jax.jit(fn)(jnp.float32(2.0), jnp.arange(4, dtype=jnp.float32))


def test_shard_map_and_varying_use_the_installed_names():
    np.testing.assert_allclose(_sum_over_devices(compat.shard_map, compat.to_varying), 6.0)


def test_fallbacks_for_the_older_names(monkeypatch):
    calls = []
    pcast = jax.lax.pcast

    def pvary(tree, axes):
        calls.append(axes)
        return pcast(tree, axes, to="varying")

    monkeypatch.delattr(jax.lax, "pcast")
    monkeypatch.setattr(jax.lax, "pvary", pvary, raising=False)
    monkeypatch.delattr(jax, "shard_map")
    np.testing.assert_allclose(_sum_over_devices(compat.shard_map, compat.to_varying), 6.0)
    assert calls == [("data",)]


def test_cpu_device_count_is_left_alone_once_jax_has_started():
    jax.devices()  # started
    assert compat.set_cpu_device_count(2) is False
