"""One RL step as pure functions of one state pytree (DESIGN.md §1, §4; arXiv 2509.24203 §4).

    window, state, use = step.sample(state, prompt_tokens, prompt_mask, k0) jitted
    rewards        = task reward of window.response_tokens                 the host boundary
    state, metrics = step.learn(state, window, rewards, k - k0, k, pack)   jitted, k in window

`RunState` holds everything a run carries from step to step: the learner's state, the sampler's
(possibly stale) parameters and policy version, the pending snapshots of the sync schedule, the
frozen reference parameters of `kl/ref` and the run's root key. `sample` applies the schedule
inside the state transition: when the sampler does not hold v(k0) it takes that snapshot from
`pending`, then it generates the batches of a window of steps k0 .. k0 + m - 1 in one call
(`SyncSchedule.window`: steps whose batches the same version generates, so nothing the learner
does in between can change them; m = 1 on-policy). Each step's rows get exactly the prompts and
keys a call for that step alone would give them. `learn` scores one step's rollout of the
window, updates the learner, keeps
its new parameters in `pending` when a later step samples from them, and returns the step's
metrics as device arrays (read once, when they are logged). Token ids out and rewards in are the
only host transfers of a step (with packing, also the response lengths out and the step's
`Packing`, planned on the host from them, in).

Every array of a `RunState` has a leading run axis: `num_seeds` runs (one per seed) are one
compiled program, and run i computes what a single run of seed i computes. The program vmaps
`runs_per_batch` runs at a time and loops (`lax.map`) over the batches (`Step.per_run`): one run
at a time is the fastest way on a CPU, all at once on an accelerator. A window adds a step axis
after the run axis: rollouts are `[runs, m, rows, ...]`.

Keys: one root per run, `key(seed)`; each use folds in its own purpose and the step, so no two
seeds or roles share draws: sampling at step k uses fold_in(fold_in(root, SAMPLE), k), the
learner (RED-Drop) fold_in(fold_in(root, LEARN), k), the held-out evaluation fold_in(root, EVAL).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rl_jax import groups
from rl_jax.learner import Learner, LearnerState, TrainBatch
from rl_jax.sampler import Rollout, SamplerState, SamplingConfig, generate_rows, row_keys
from rl_jax.sync import SyncSchedule

SAMPLE, LEARN, EVAL = 0, 1, 2  # key purposes
RUNS = "runs"  # the vmapped axis of a RunState


def purpose_key(root: jax.Array, purpose: int, step=None) -> jax.Array:
    """fold_in(root, purpose), then the step if given: the key of one use of the run's root."""
    key = jax.random.fold_in(root, purpose)
    return key if step is None else jax.random.fold_in(key, step)


@flax.struct.dataclass
class PendingSnapshots:
    """Learner parameter snapshots waiting for the sampler, in `num_slots` fixed slots.

    params: the parameter pytree with a leading `[num_slots]` axis on every leaf.
    versions: `[num_slots]` int32, the policy version in each slot, -1 where empty.
    `push` and `take` are traced: the schedule guarantees a free slot and the wanted version
    (`SyncSchedule.num_slots`; tests/test_step.py checks every schedule of the studies).
    """

    params: Any
    versions: jax.Array

    @classmethod
    def empty(cls, params, num_slots: int) -> PendingSnapshots:
        stacked = jax.tree.map(lambda x: jnp.zeros((num_slots, *x.shape), x.dtype), params)
        return cls(params=stacked, versions=jnp.full((num_slots,), -1, jnp.int32))

    def push(self, version, params, due) -> PendingSnapshots:
        """Where `due`, stores `params` as `version` in the first empty slot."""
        slot = jnp.argmax(self.versions < 0)
        keep = lambda stacked, x: stacked.at[slot].set(jnp.where(due, x, stacked[slot]))
        versions = self.versions.at[slot].set(jnp.where(due, version, self.versions[slot]))
        return PendingSnapshots(jax.tree.map(keep, self.params, params), versions)

    def take(self, version) -> tuple[Any, PendingSnapshots]:
        """(params of `version`, snapshots without it and every older one)."""
        slot = jnp.argmax(self.versions == version)
        params = jax.tree.map(lambda stacked: stacked[slot], self.params)
        return params, self.replace(versions=jnp.where(self.versions > version, self.versions, -1))


@flax.struct.dataclass
class RunState:
    """The whole state of a run (module docstring); every leaf has a leading run axis."""

    learner: LearnerState
    sampler: SamplerState
    pending: PendingSnapshots
    ref_params: Any
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class Step:
    """The static settings of a run's step; `sample`, `learn` and `evaluate` are its jitted
    methods (the `Step` itself static: equal steps share compiled programs), each compiled once.

    learner: the update (`rl_jax.learner.Learner`); sampling: how tokens are drawn;
    schedule: the sync schedule; group_size: G; mesh: rows are split over all its devices;
    runs_per_batch: runs vmapped together (`per_run`).
    """

    learner: Learner
    sampling: SamplingConfig
    schedule: SyncSchedule
    group_size: int
    mesh: Mesh | None = None
    runs_per_batch: int = 1

    def init(self, params, seeds) -> RunState:
        """The state of runs with `seeds` at step 0, all from the same initial `params`.

        Reference, sampler and learner parameters are separate buffers, so the donated steps
        never alias one buffer twice.
        """
        num_runs = len(seeds)
        stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * num_runs), tree)
        roots = jnp.stack([jax.random.key(s) for s in seeds])
        single = lambda p, root: RunState(
            learner=self.learner.init_state(p),
            sampler=SamplerState.create(jax.tree.map(jnp.copy, p), purpose_key(root, SAMPLE)),
            pending=PendingSnapshots.empty(p, self.schedule.num_slots),
            ref_params=jax.tree.map(jnp.copy, p),
            key=root,
        )
        return jax.jit(jax.vmap(single))(stack(params), roots)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
    def sample(self, state: RunState, prompt_tokens, prompt_mask, first_step):
        """Sync if due, then draw G responses per prompt for each step of a window.

        prompt_tokens, prompt_mask: `[runs, m, num_prompts, P]` left-padded, the prompts of steps
        first_step .. first_step + m - 1 (one window of `SyncSchedule.window`). Returns
        (Rollout `[runs, m, rows, ...]`, state, row-step utilization `[runs]`: the window's kept
        tokens over decode slots x decode steps, `sampler/row_step_utilization`); `state` is
        donated.
        """
        one = lambda s, tokens, mask: self._sample_one(s, tokens, mask, first_step)
        return self.per_run(one, state, prompt_tokens, prompt_mask)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
    def learn(self, state: RunState, window: Rollout, rewards, index, step, pack=None):
        """Update on rollout `index` of `window` and its rewards (`[runs, m, rows]`) at learner
        step `step`: (state, metrics), run axis first; `state` is donated. `pack`: the step's
        `Packing` with a run axis (`Learner.pack`), when the learner packs."""
        one = lambda s, w, r, p: self._learn_one(s, w, r, p, index, step)
        return self.per_run(one, state, window, rewards, pack)

    @functools.partial(jax.jit, static_argnums=0)
    def evaluate(self, state: RunState, prompt_tokens, prompt_mask) -> Rollout:
        """One response per held-out prompt from the learner's policy, `[runs, num_prompts, ...]`.

        The same key at every evaluation, so successive evaluations differ by the policy only.
        """
        mesh = self.mesh
        if mesh is not None and prompt_tokens.shape[0] % mesh.size:
            mesh = None  # every device generates all of them

        def one(params, version, root):
            keys = row_keys(purpose_key(root, EVAL), prompt_tokens.shape[0])[1]
            rollout, _ = generate_rows(
                self.learner.graphdef, params, version, keys, prompt_tokens, prompt_mask,
                self.sampling, mesh, loop_axes=(RUNS,),
            )  # fmt: skip
            return rollout

        return self.per_run(one, state.learner.params, state.learner.step, state.key)

    def per_run(self, fn, *runs):
        """`fn` applied to each run of `runs` (pytrees with a leading run axis), traced.

        `runs_per_batch` runs are vmapped together (axis name `RUNS`) and the batches run one
        after another (`lax.map`); with one batch it is a plain vmap. On XLA:CPU the embedded
        default's 5-seed learn runs 1.2-1.3x faster one run at a time than vmapped, its whole
        step ~1.1-1.2x (BENCHMARKS.md, "Many seeds in one program"): batching tiny matmuls over
        runs gains nothing there, and the batch's intermediates fall out of the caches.
        """
        num_runs = jax.tree.leaves(runs)[0].shape[0]
        batched = jax.vmap(fn, axis_name=RUNS)
        if self.runs_per_batch >= num_runs:
            return batched(*runs)
        split = lambda x: x.reshape(-1, self.runs_per_batch, *x.shape[1:])
        out = jax.lax.map(lambda batch: batched(*batch), jax.tree.map(split, runs))
        return jax.tree.map(lambda y: y.reshape(num_runs, *y.shape[2:]), out)

    # -- one run, traced ---------------------------------------------------------------------

    def _sample_one(self, state: RunState, prompt_tokens, prompt_mask, first_step):
        version = self.schedule.version_for_step(first_step)
        snapshot, pending = state.pending.take(version)
        swap = state.sampler.policy_version != version
        pick = lambda new, old: jnp.where(swap, new, old)
        sampler = state.sampler.replace(
            params=jax.tree.map(pick, snapshot, state.sampler.params),
            policy_version=jnp.where(swap, version, state.sampler.policy_version),
        )
        pending = jax.tree.map(pick, pending, state.pending)

        # The window's steps are stacked into one batch of rows, each row with the key it
        # would have in a call for its step alone (`sampler.row_keys`).
        num_steps, num_prompts = prompt_tokens.shape[:2]
        rows = num_prompts * self.group_size
        steps = first_step + jnp.arange(num_steps, dtype=jnp.int32)
        keys = jax.vmap(lambda k: row_keys(jax.random.fold_in(sampler.key, k), rows)[1])(steps)
        as_rows = jax.vmap(lambda x: groups.rows_from_prompts(x, self.group_size))
        stacked = lambda x: x.reshape(num_steps * rows, *x.shape[2:])
        rollout, slot_steps = generate_rows(
            self.learner.graphdef, sampler.params, sampler.policy_version, stacked(keys),
            stacked(as_rows(prompt_tokens)), stacked(as_rows(prompt_mask)), self.sampling,
            self.mesh, loop_axes=(RUNS,),
        )  # fmt: skip
        window = jax.tree.map(lambda x: x.reshape(num_steps, rows, *x.shape[1:]), rollout)
        utilization = jnp.sum(rollout.response_length) / slot_steps
        return window, state.replace(sampler=sampler, pending=pending), utilization

    def _learn_one(self, state: RunState, window: Rollout, rewards, pack, index, step):
        rollout = jax.tree.map(lambda x: x[index], window)
        batch = TrainBatch.from_rollout(rollout, rewards[index])
        ref_params = state.ref_params if self.learner.ref_metrics else None
        key = purpose_key(state.key, LEARN, step)
        learner, metrics = self.learner.traced_update(state.learner, batch, ref_params, key, pack)
        due = self.schedule.snapshot_due(step)
        pending = state.pending.push(step, learner.params, due)
        metrics.update(rollout_metrics(rollout, batch.rewards, step, self.sampling.max_new_tokens))
        return state.replace(learner=learner, pending=pending), metrics


def rollout_metrics(rollout: Rollout, rewards, step, cap: int) -> dict:
    """Metrics of one batch of rollouts (DESIGN.md §5), traced."""
    lengths = rollout.response_length.astype(jnp.float32)
    staleness = (step - 1 - rollout.policy_version).astype(jnp.float32)
    return {
        "reward/mean": jnp.mean(rewards),
        "reward/std": jnp.std(rewards),
        "response_length/mean": jnp.mean(lengths),
        "response_length/max": jnp.max(lengths),
        "response_length/clip_ratio": jnp.mean(rollout.truncated.astype(jnp.float32)),
        "response_length/cap": jnp.float32(cap),
        "staleness/mean": jnp.mean(staleness),
        "staleness/max": jnp.max(staleness),
        "policy_version": jnp.max(rollout.policy_version).astype(jnp.float32),
    }
