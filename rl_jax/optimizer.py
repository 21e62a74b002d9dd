"""The learner's optimizer plumbing: AdamW's state in float32 whatever the parameter dtype, and
that state placed like the parameters it belongs to (`rl_jax.learner.Learner.init`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def float32_moments(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` run in float32 whatever the parameter dtype: its state (AdamW's moments) is float32,
    gradients and parameters are upcast on the way in and the updates cast back to each
    parameter's dtype. With float32 parameters (the recommended master copy, with bfloat16
    compute) every cast is a no-op; with bfloat16 parameters an update smaller than half a
    bfloat16 ulp of its parameter (|u| < |p| * 2^-9) rounds away when applied."""
    up = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)

    def update(grads, state, params=None):
        updates, state = tx.update(up(grads), state, None if params is None else up(params))
        return jax.tree.map(lambda u, g: u.astype(g.dtype), updates, grads), state

    return optax.GradientTransformation(lambda params: tx.init(up(params)), update)


def state_shardings(tx: optax.GradientTransformation, params):
    """(parameter shardings, optimizer-state shardings, the step count's sharding) of a learner
    state `(params, tx.init(params), step)`, with every optimizer moment placed like its
    parameter; None (let XLA choose) when `params` are not on a mesh.

    Specs are written without trailing Nones (`P(None, "fsdp")`, not `P(None, "fsdp", None)`),
    the form XLA gives the update's outputs: equal placements must also compare equal, or the
    second update would compile again.
    """
    leaves = [getattr(x, "sharding", None) for x in jax.tree.leaves(params)]
    if not leaves or not all(isinstance(s, jax.sharding.NamedSharding) for s in leaves):
        return None

    def canonical(s):
        spec = list(s.spec)
        while spec and spec[-1] is None:
            spec.pop()
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec))

    shardings = jax.tree.map(lambda x: canonical(x.sharding), params)
    replicated = jax.sharding.NamedSharding(leaves[0].mesh, jax.sharding.PartitionSpec())
    opt_state = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, opt_state, shardings, transform_non_params=lambda _: replicated
    )
    return shardings, opt_shardings, replicated
