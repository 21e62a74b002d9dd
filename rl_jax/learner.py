"""The learner: `LearnerState` and one jitted policy-gradient update (DESIGN.md §1, §3, §5).

One update consumes a batch of rollouts with their rewards:

    A      = group_advantages(to_groups(rewards))      [num_groups, G]        (advantages.py)
    T      = red_weight_temperatures(A, lengths)       adaptive RED-Weight only (advantages.py)
    logp   = log softmax(f_theta(prompt + response) / temperature)[response]  (current params)
    loss   = policy_loss(logp, untruncated_logp, A, response_mask)           (losses.py)
    theta <- optax update with grad(loss)

The loss is a true token-mean over the whole batch: the batch is split into `micro_batches`
pieces whose losses share one global denominator, so their gradients add up to the gradient of
the full batch exactly (up to float summation order), on one device or many. Before the update
the same forward pass gives the metrics of DESIGN.md §5: entropy, KL to the frozen reference
policy (k2 as the paper's code logs it, k3, and the exact full-vocabulary KL) and KL to the
behaviour policy; each is a sum over tokens divided by the batch's token count.

With `packing` the forward passes run on packed sequences (`rl_jax.packing`: each micro-batch's
rows, per device, laid end to end without their padding) and the per-token log-probs, entropy
and KL terms are gathered back to the `[rows, response_len]` layout, where the loss and the
metrics are computed exactly as without it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from rl_jax import advantages as advantages_lib
from rl_jax import compat, groups, guards, logprobs, losses, packing, parallel
from rl_jax import optimizer as optimizer_lib
from rl_jax.algorithms import Algorithm
from rl_jax.config_sections import OptimizerConfig
from rl_jax.models import MemoryOptions, forward_hidden
from rl_jax.sampling import check_temperature


@flax.struct.dataclass
class LearnerState:
    """params, optimizer state, and `step`: updates taken so far, i.e. the policy version held."""

    params: Any
    opt_state: Any
    step: jax.Array


@flax.struct.dataclass
class TrainBatch:
    """What one update consumes; rows are grouped as `[num_groups * group_size]`.

    prompt_tokens, prompt_mask: `[batch, prompt_len]`, left padded.
    response_tokens, response_mask: `[batch, response_len]`, mask 1 up to and including EOS.
    untruncated_logp: `[batch, response_len]` the sampler's log-probs under the untruncated
      softmax(z / T) (`Rollout.untruncated_logp`): the behaviour side (old_logp of DESIGN.md §3).
    rewards: `[batch]` sequence rewards.
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    response_tokens: jax.Array
    response_mask: jax.Array
    untruncated_logp: jax.Array
    rewards: jax.Array

    @classmethod
    def from_rollout(cls, rollout, rewards) -> TrainBatch:
        """The batch for a sampler `Rollout` and its `[batch]` rewards.

        The behaviour side is the rollout's `untruncated_logp`, not its `sampled_logp`: the learner
        scores the untruncated softmax(z / T), so the behaviour side must too, or the ratio would
        not be 1 on-policy when top-k / top-p are on (the two are identical when they are off).
        """
        return cls(
            prompt_tokens=rollout.prompt_tokens,
            prompt_mask=rollout.prompt_mask,
            response_tokens=rollout.response_tokens,
            response_mask=rollout.response_mask,
            untruncated_logp=rollout.untruncated_logp,
            rewards=rewards,
        )


def response_hidden(graphdef, params, batch: TrainBatch, memory: MemoryOptions | None = None):
    """(hidden `[batch, response_len, d]` that predict each response token, W_head, layout)."""
    prompt_len = batch.prompt_tokens.shape[1]
    tokens = jnp.concatenate([batch.prompt_tokens, batch.response_tokens], axis=1)
    # Tokens after EOS are padding but come after every real token, so causality hides them.
    mask = jnp.concatenate([batch.prompt_mask, jnp.ones_like(batch.response_tokens)], axis=1)
    hidden, head, layout = forward_hidden(graphdef, params, tokens, mask, memory or MemoryOptions())
    return hidden[:, prompt_len - 1 : -1], head, layout


def packed_hidden(graphdef, params, batch: TrainBatch, pack: packing.Packing, memory):
    """(hidden `[R, W, d]` of one shard's packed rows, W_head, layout, next tokens `[R, W]`).

    `pack` is the shard's part of a `packing.Packing` (`source`, `segment`, `position` `[R, W]`).
    The next token of a packed row's last position is its first token: a target no response
    token reads.
    """
    tokens = jnp.concatenate([batch.prompt_tokens, batch.response_tokens], axis=1)
    tokens = tokens.reshape(-1)[pack.source]
    hidden, head, layout = forward_hidden(
        graphdef, params, tokens, None, memory, pack.position, pack.segment
    )
    return hidden, head, layout, jnp.roll(tokens, -1, axis=1)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _jitted_update(learner, state, batch, ref_params, key, pack=None):
    return learner.traced_update(state, batch, ref_params, key, pack)


def _split_micro_batches(tree, num: int):
    """`[batch, ...]` -> `[num, batch // num, ...]`, rows m, m + num, ... in micro-batch m.

    Strided rather than contiguous so that a batch sharded over devices stays evenly sharded
    inside every micro-batch.
    """
    return jax.tree.map(lambda x: x.reshape(-1, num, *x.shape[1:]).swapaxes(0, 1), tree)


@dataclasses.dataclass(frozen=True)
class Learner:
    """Static settings of the update; `update` is jitted once per batch shape.

    Attributes:
      graphdef: the model's `nnx.GraphDef` (see `rl_jax.models`).
      algorithm: the preset with its advantage and loss settings (`rl_jax.algorithms.get`).
      optimizer: `OptimizerConfig`, built for a run of `steps` learner steps (`build(steps)`);
        `steps` matters only to a decaying schedule and is kept as 0 where it does not, so
        that learners that update alike compare equal (and share compiled programs).
      group_size: responses per prompt, G.
      temperature: the sampling temperature; logp and entropy are of softmax(logits / T).
      micro_batches: gradient-accumulation pieces per update; must divide the batch.
      ref_metrics: compute the KL-to-reference metrics (one extra forward pass per update).
      memory: layer recomputation and attention implementation (`rl_jax.models.MemoryOptions`).
      logprob_chunk: response positions per block of `logprobs.token_stats` (0 = one block).
      mesh: the devices the batch's rows are split over (`rl_jax.parallel.make_mesh`); with
        replicated parameters the update all-reduces its gradient once (`_accumulate`).
      packing: forward passes on packed sequences (`rl_jax.packing`); every update then takes
        the batch's `Packing`, planned on the host by `pack`.
    """

    graphdef: Any
    algorithm: Algorithm
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4)
    steps: int = 0
    group_size: int = 8
    temperature: float = 1.0
    micro_batches: int = 1
    ref_metrics: bool = True
    memory: MemoryOptions = MemoryOptions()
    logprob_chunk: int = 0
    mesh: Mesh | None = None
    packing: bool = False

    def __post_init__(self):
        groups.check_group_size(self.group_size)
        check_temperature(self.temperature)
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.optimizer.decay_steps(self.steps) == 0:
            object.__setattr__(self, "steps", 0)
        if not (isinstance(self.logprob_chunk, int) and self.logprob_chunk >= 0):
            raise ValueError(f"logprob_chunk must be an int >= 0, got {self.logprob_chunk!r}")
        if not isinstance(self.packing, bool):
            raise ValueError(f"packing must be true or false, got {self.packing!r}")

    @functools.cached_property
    def tx(self) -> optax.GradientTransformation:
        return optimizer_lib.float32_moments(self.optimizer.build(self.steps))

    def init_state(self, params) -> LearnerState:
        """A fresh state (traceable): the params, their float32 optimizer state, step 0."""
        return LearnerState(params=params, opt_state=self.tx.init(params), step=jnp.int32(0))

    def init(self, params) -> LearnerState:
        """A fresh state, placed as `update` returns it (one compile of `update`).

        Each optimizer moment is placed like its parameter (under fsdp > 1 sharded like it, not
        replicated); the step count and other scalars are replicated on the parameters' mesh.
        """
        return jax.jit(self.init_state, out_shardings=self.state_shardings(params))(params)

    def state_shardings(self, params) -> LearnerState | None:
        """Where `init` places the state of `params` (`rl_jax.optimizer.state_shardings`)."""
        placed = optimizer_lib.state_shardings(self.tx, params)
        return None if placed is None else LearnerState(*placed)

    def update(self, state: LearnerState, batch: TrainBatch, ref_params, key, pack=None):
        """One jitted update -> (state, metrics); `state` is donated.

        Compiled once per (learner settings, batch shape, packed shape): equal `Learner`s, e.g.
        the runs of several seeds, share the compiled program. `pack`: the batch's `Packing`
        (`pack`), with `packing` on only.
        """
        return _jitted_update(self, state, batch, ref_params, key, pack)

    def shard_rows(self, batch_size: int) -> np.ndarray:
        """`[micro_batches, shards, rows]`: the batch rows each shard of an update holds.

        Micro-batches take rows strided (`_split_micro_batches`) and each device of the mesh a
        contiguous block of a micro-batch (one shard per device where the rows divide over
        them, else the micro-batch is one shard).
        """
        micro = _split_micro_batches(np.arange(batch_size), self.micro_batches)
        mesh, rows = self.mesh, micro.shape[1]
        shards = 1 if mesh is None or rows % mesh.size else mesh.size
        return micro.reshape(self.micro_batches, shards, -1)

    def pack(self, prompt_mask, response_lengths, response_width: int) -> packing.Packing:
        """The `Packing` of batches (host arrays, optional leading axes such as runs) with
        `prompt_mask` `[..., B, P]` and `response_lengths` `[..., B]` (`packing.plan`)."""
        batch_size = np.shape(response_lengths)[-1]
        return packing.plan(
            prompt_mask, response_lengths, response_width, self.shard_rows(batch_size)
        )

    def traced_update(self, state: LearnerState, batch: TrainBatch, ref_params, key, pack=None):
        """The update for callers that trace it inside their own jit (`rl_jax.step`)."""
        grads, metrics = self.gradients(state.params, batch, ref_params, key, pack)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = LearnerState(params=params, opt_state=opt_state, step=state.step + 1)
        # A non-finite loss or gradient leaves the state as it was; the loop stops the run.
        new_state = guards.keep_if_finite(guards.update_is_finite(metrics), new_state, state)
        return new_state, metrics

    def gradients(self, params, batch: TrainBatch, ref_params, key, pack=None):
        """(gradient of the batch's loss w.r.t. `params`, the update's metrics), traced."""
        batch_size = batch.rewards.shape[0]
        if batch_size % self.micro_batches:
            raise ValueError(
                f"micro_batches={self.micro_batches} must divide the batch {batch_size}"
            )
        if self.packing != (pack is not None):
            raise ValueError(
                "a Learner with packing=True takes the batch's Packing (Learner.pack), "
                "one with packing=False none"
            )
        rewards = groups.to_groups(batch.rewards, self.group_size)
        adv = advantages_lib.group_advantages(rewards, self.algorithm.advantage, key=key)
        mask = batch.response_mask.astype(jnp.float32)
        temps, temp_metrics = self._red_temperatures(adv, mask)
        adv = groups.from_groups(adv)
        denominator = losses.loss_denominator(mask, self.algorithm.loss)
        num_tokens = jnp.maximum(mask.sum(), 1.0)

        micro = _split_micro_batches((batch, adv, temps), self.micro_batches)
        if pack is not None:  # source, segment, position come per micro-batch already
            pack = pack.replace(target=_split_micro_batches(pack.target, self.micro_batches))
            pack = self._place_packing(pack, batch)
        grads, (loss, policy_metrics, sums) = self._accumulate(
            params, ref_params, (*micro, pack), denominator
        )
        metrics = {"loss": loss.sum(), "grad_norm": optax.global_norm(grads)}
        metrics.update(losses.aggregate_metrics(policy_metrics))
        metrics.update({name: total.sum() / num_tokens for name, total in sums.items()})
        metrics["advantage/mean"] = losses.masked_mean(
            jnp.broadcast_to(adv[:, None], mask.shape), mask
        )
        metrics.update(temp_metrics)
        return grads, metrics

    def _red_temperatures(self, adv, mask):
        """Adaptive RED-Weight: each row's temperature `[batch]` and the step's metrics, or
        (None, {}) when the preset does not adapt it.

        `adv` is `[num_groups, G]`, the lengths are the response tokens of each row (mask 1 up
        to and including EOS). Metrics: `red/temperature`, the mean over the batch (one T) or
        over the groups of the finite temperatures, inf when none is finite (nothing was
        reweighted; the metrics file writes "Infinity", and only loss and grad_norm are guarded
        against non-finite values, `rl_jax.guards`); `red/reweighted_frac`, the fraction of
        the batch (0 or 1) or of the groups whose T is finite.
        """
        level = self.algorithm.loss.adaptive_temp
        if level == "none":
            return None, {}
        lengths = groups.to_groups(mask.sum(axis=-1), self.group_size)
        temps = advantages_lib.red_weight_temperatures(adv, lengths, level)
        finite = jnp.isfinite(temps)
        count = finite.sum()
        mean = jnp.where(finite, temps, 0.0).sum() / jnp.maximum(count, 1)
        metrics = {
            "red/temperature": jnp.where(count > 0, mean, jnp.inf),
            "red/reweighted_frac": finite.mean(dtype=jnp.float32),
        }
        return groups.from_groups(jnp.broadcast_to(temps[:, None], adv.shape)), metrics

    def _accumulate(self, params, ref_params, micro, denominator):
        """Summed gradient and per-micro-batch outputs of `micro` (`[micro_batches, rows, ...]`):
        (grads, (loss `[M]`, policy metrics `[pieces]`, metric sums `[M]`)).

        Under data parallelism (`mesh` splits the rows over its devices, parameters replicated)
        each device adds up the gradients of its own rows over every micro-batch and the devices
        sum theirs once: one all-reduce per update instead of the one per micro-batch that XLA
        inserts for a replicated gradient (the same sum in another order). Elsewhere (one
        device, fsdp, rows that do not divide over the devices) XLA places the reductions.
        """

        def accumulate(params, ref_params, micro, denominator):
            def micro_step(grads, micro):
                mb, mb_adv, mb_temps, mb_pack = micro
                (loss, (policy_metrics, sums)), g = jax.value_and_grad(self._loss, has_aux=True)(
                    params, mb, mb_adv, mb_temps, denominator, ref_params, mb_pack
                )
                return jax.tree.map(jnp.add, grads, g), (loss, policy_metrics, sums)

            zeros = jax.tree.map(jnp.zeros_like, params)
            return jax.lax.scan(micro_step, zeros, micro)

        mesh = self.mesh
        if self._data_shards(micro[1].shape[1]) == 1:
            return accumulate(params, ref_params, micro, denominator)
        devices = tuple(mesh.axis_names)  # psum over all of them: over every device

        def per_device(params, ref_params, micro, denominator):
            # Varying per device, so that differentiating it adds no all-reduce to the loop.
            params = compat.to_varying(params, devices)
            grads, (loss, policy_metrics, sums) = accumulate(params, ref_params, micro, denominator)
            total = lambda tree: jax.lax.psum(tree, devices)
            return total(grads), (total(loss), policy_metrics, total(sums))

        whole, split = P(), parallel.rows_spec(mesh, axis=1)  # [micro_batches, rows, ...]
        return compat.shard_map(
            per_device, mesh=mesh, in_specs=(whole, whole, split, whole),
            out_specs=(whole, (whole, parallel.rows_spec(mesh), whole)),
        )(params, ref_params, micro, denominator)  # fmt: skip

    def _place_packing(self, pack: packing.Packing, batch: TrainBatch) -> packing.Packing:
        """Per-device shards of a `Packing` (`[M, S * R, W]`, target `[M, rows, N]`) as
        `_accumulate` consumes them: as they are under per-device accumulation; elsewhere, with
        S > 1 shards (fsdp), their indices offset to address the whole micro-batch and its
        packed rows placed like its rows, over every device of the mesh."""
        num_packed, width = pack.source.shape[1:]
        rows = pack.target.shape[1]
        shards = self.shard_rows(self.micro_batches * rows).shape[1]
        if shards == 1 or self._data_shards(rows) > 1:
            return pack
        full = batch.prompt_tokens.shape[1] + batch.response_tokens.shape[1]
        shard_of = lambda n: jnp.arange(n, dtype=jnp.int32) // (n // shards)
        pack = pack.replace(
            source=pack.source + (shard_of(num_packed) * (rows // shards * full))[None, :, None],
            target=pack.target + (shard_of(rows) * (num_packed // shards * width))[None, :, None],
        )
        split = jax.sharding.NamedSharding(self.mesh, P(None, tuple(self.mesh.axis_names)))
        return jax.lax.with_sharding_constraint(pack, split)

    def _data_shards(self, rows: int) -> int:
        """Devices that accumulate their own rows of a micro-batch of `rows` (`_accumulate`):
        all of the mesh's under pure data parallelism, else 1 (XLA places the reductions)."""
        mesh = self.mesh
        if mesh is None or mesh.size == 1 or mesh.shape[parallel.FSDP] > 1 or rows % mesh.size:
            return 1
        return mesh.size

    def response_stats(self, params, batch: TrainBatch, ref_params, pack=None) -> dict:
        """`logprobs.token_stats` of the response tokens, `[rows, response_len]` each.

        With `pack` (one shard's part of a `Packing`) the forwards run on the packed rows and
        each statistic is gathered back from the position that predicts its token.
        """
        if pack is None:
            hidden, head, layout = response_hidden(self.graphdef, params, batch, self.memory)
            targets, ref = batch.response_tokens, None
            if self.ref_metrics:
                ref = response_hidden(self.graphdef, ref_params, batch, self.memory)[:2]
        else:
            hidden, head, layout, targets = packed_hidden(
                self.graphdef, params, batch, pack, self.memory
            )
            ref = None
            if self.ref_metrics:
                ref = packed_hidden(self.graphdef, ref_params, batch, pack, self.memory)[:2]
        if ref is not None:
            ref = jax.lax.stop_gradient(ref)
        stats = logprobs.token_stats(
            hidden, head, layout, targets, self.temperature, ref=ref, chunk=self.logprob_chunk
        )
        if pack is None:
            return stats
        return jax.tree.map(lambda x: x.reshape(-1)[pack.target], stats)

    def _loss(self, params, batch: TrainBatch, adv, temps, denominator, ref_params, pack=None):
        stats = self.response_stats(params, batch, ref_params, pack)
        mask = batch.response_mask.astype(jnp.float32)
        loss, policy_metrics = losses.policy_loss(
            stats["logp"], batch.untruncated_logp, adv, mask, self.algorithm.loss,
            denominator=denominator, temperature=temps,
        )  # fmt: skip
        logp = jax.lax.stop_gradient(stats["logp"])
        sums = {
            "entropy": losses.masked_sum(jax.lax.stop_gradient(stats["entropy"]), mask),
            "kl/behaviour": losses.masked_sum(losses.kl_k2(logp, batch.untruncated_logp), mask),
        }
        if self.ref_metrics:
            ref_logp = stats["ref_logp"]
            sums["kl/ref"] = losses.masked_sum(losses.kl_k2(logp, ref_logp), mask)
            sums["kl/ref_k3"] = losses.masked_sum(losses.kl_k3(logp, ref_logp), mask)
            sums["kl/ref_full"] = losses.masked_sum(jax.lax.stop_gradient(stats["full_kl"]), mask)
        return loss, (policy_metrics, sums)
