"""The host side of a training step: what happens around the jitted `Step` (DESIGN.md §1).

`HostSide.step(state, k)` samples a new window of steps when k is past the current one (the
prompts of each step drawn on the host from (seed, k), encoded, generated in one jitted call),
scores the responses with the task's reward (token ids out, rewards in: the one host boundary
of a step), plans the learner's packed layout when it packs, runs the jitted `learn`, and reads
the step's metrics once. `HostSide.evaluate` scores the learner's policy on the held-out prompts.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from rl_jax import build, groups, guards, parallel
from rl_jax import config as config_lib
from rl_jax.sampler import Rollout
from rl_jax.step import RunState, Step


@dataclasses.dataclass(frozen=True)
class Window:
    """The batches of learner steps first .. first + length - 1, generated in one call by one
    policy version (`SyncSchedule.window`): rollouts `[runs, length, rows, ...]` and their
    rewards `[runs, length, rows]`, both on the devices."""

    first: int
    length: int
    rollouts: Rollout
    rewards: jax.Array
    utilization: np.ndarray  # `[runs]` sampler/row_step_utilization of the window's generation
    # With packing: the rows' prompt masks `[runs, length, rows, P]` and response lengths
    # `[runs, length, rows]` on the host, from which each step's packing is planned.
    packing_inputs: tuple | None = None

    def holds(self, step: int) -> bool:
        return 0 <= step - self.first < self.length


@dataclasses.dataclass
class HostSide:
    """What the host does around the jitted step: prompts, rewards, metric reads, evaluation."""

    config: config_lib.TrainConfig
    run: build.Run
    step_fn: Step
    mesh: object
    window_size: int = 1  # steps per generate call (`generation_window`)
    window: Window | None = None  # the current one

    def step(self, state: RunState, step: int) -> tuple[RunState, list[dict]]:
        """Learner step k of every run: sample (a new window when k is past the current one),
        score on the host, learn; each run's metrics."""
        config = self.config
        t0 = time.perf_counter()
        if self.window is None or not self.window.holds(step):
            state = self._sample_window(state, step)
        window = self.window
        t1 = time.perf_counter()
        state, metrics = self.step_fn.learn(
            state, window.rollouts, window.rewards, step - window.first, step,
            self._pack(step - window.first),
        )  # fmt: skip
        metrics = parallel.to_host(metrics)
        t2 = time.perf_counter()
        rows = config.rows
        out = []
        for i in range(config.num_seeds):
            values = {name: float(value[i]) for name, value in metrics.items()}
            guards.check_update(
                step, values, seed=config.seed + i if config.num_seeds > 1 else None
            )
            values.update({
                "time/sample": t1 - t0,
                "time/learn": t2 - t1,
                "sampler/row_step_utilization": float(window.utilization[i]),
                "throughput/tokens_per_s": values["response_length/mean"] * rows
                / max(t2 - t0, 1e-9),
            })  # fmt: skip
            out.append(values)
        return state, out

    def _sample_window(self, state: RunState, step: int) -> RunState:
        """Generates and scores the window of `SyncSchedule.window` that holds `step`."""
        config, task = self.config, self.run.task
        start, length = self.step_fn.schedule.window(step, self.window_size)
        examples = [
            [task.sample_prompts((single.seed, k), config.prompts_per_step) for k in
             range(start, start + length)]
            for single in config.runs()
        ]  # fmt: skip
        prompts = self._encode_host(examples)
        rollouts, state, utilization = self.step_fn.sample(state, *self._replicated(prompts), start)
        tokens = parallel.to_host(rollouts.response_tokens)  # [runs, m, rows, N]
        rewards = np.stack(
            [
                self._rewards(tokens[:, j], [e[j] for e in examples], config.group_size)
                for j in range(length)
            ],
            axis=1,
        )
        rewards = parallel.from_host(rewards, parallel.rows_sharding(self.mesh, axis=2))
        packing_inputs = None
        if self.step_fn.learner.packing:  # [runs, m, rows, P] prompt masks, [runs, m, rows]
            lengths = parallel.to_host(rollouts.response_length)
            packing_inputs = (groups.rows_from_prompts(prompts[1], config.group_size, 2), lengths)
        utilization = parallel.to_host(utilization)
        self.window = Window(start, length, rollouts, rewards, utilization, packing_inputs)
        return state

    def _pack(self, index: int):
        """The `Packing` of rollout `index` of the window (run axis first), or None."""
        if self.window.packing_inputs is None:
            return None
        masks, lengths = self.window.packing_inputs
        width = self.window.rollouts.response_tokens.shape[-1]
        return self._replicated(
            self.step_fn.learner.pack(masks[:, index], lengths[:, index], width)
        )

    def evaluate(self, state: RunState) -> list[float]:
        """Each run's mean reward on the fixed held-out prompts (one response each)."""
        examples = self.run.task.eval_examples(self.config.eval_prompts)
        tokens, mask = self.run.tokenizer.encode_batch(
            [ex.prompt for ex in examples], length=self.run.task.max_prompt_len, add_bos=True
        )
        replicated = parallel.replicated(self.mesh)
        rollout = self.step_fn.evaluate(
            state, parallel.from_host(tokens, replicated), parallel.from_host(mask, replicated)
        )
        runs = [examples] * self.config.num_seeds
        rewards = self._rewards(parallel.to_host(rollout.response_tokens), runs, 1)
        return [float(r.mean()) for r in rewards]

    def _encode(self, examples: list[list[list]]):
        """`[runs][m][num_prompts]` examples -> replicated `[runs, m, num_prompts, P]` arrays."""
        return self._replicated(self._encode_host(examples))

    def _replicated(self, tree):
        """Host arrays placed whole on every device."""
        replicated = parallel.replicated(self.mesh)
        return jax.tree.map(lambda x: parallel.from_host(x, replicated), tree)

    def _encode_host(self, examples: list[list[list]]):
        """`[runs][m][num_prompts]` examples -> host `[runs, m, num_prompts, P]` tokens, mask."""
        tokenizer, width = self.run.tokenizer, self.run.task.max_prompt_len
        encoded = [
            [
                tokenizer.encode_batch([ex.prompt for ex in e], length=width, add_bos=True)
                for e in run
            ]
            for run in examples
        ]
        return tuple(np.asarray([[pair[i] for pair in run] for run in encoded]) for i in (0, 1))

    def _rewards(self, tokens: np.ndarray, examples: list[list], group_size: int) -> np.ndarray:
        """`[runs, rows]` float32 rewards of `[runs, rows, N]` response token ids."""
        out = []
        for run_tokens, run_examples in zip(tokens, examples, strict=True):
            texts = self.run.tokenizer.decode_batch(run_tokens)
            rows = groups.examples_for_rows(run_examples, group_size)
            run_rewards = [self.run.task.reward(t, ex) for t, ex in zip(texts, rows, strict=True)]
            guards.check_rewards(
                np.asarray(run_rewards, np.float32), texts, [ex.prompt for ex in rows]
            )
            out.append(run_rewards)
        return np.asarray(out, np.float32)
