"""The sampler part of benchmarks/padding.py: slot decoding against the lock-step decode.

    python benchmarks/padding.py --part sampler [--json] [--rounds 3]

On the workload of `padding.paper_workload` (64 rows, prompt bucket 64, cap 448, response
lengths log-normal with mean ~0.2 of the cap, the longest at the cap) through the reference
model, three comparisons, alternated in each round:

- step: one step's 64 rows, lock-step (`decode_slots=0`: every row until the longest is done)
  against `STEP_SLOTS` decode slots refilled from the step's rows: `speedup`.
- window: a sync window of `WINDOW_STEPS` = 20 steps (sync_interval = 20: one policy version),
  20 lock-step calls as the trainer makes them step by step, against the window's 1,280 rows
  through `WINDOW_SLOTS` slots in one call: `window_speedup`.

A random-weight model would not end its rows at the drawn lengths, so each row's cap is set
to its drawn length (`knobs.max_new_tokens` per row): every row ends there, and each decode
step does the real work of its slots. `row_step_utilization` is kept tokens over decode
slots x decode steps (and `lockstep_utilization` the same for lock-step). The embedded
preset's own sample (the warm-started tiny policy, 64 rows, cap 25) is timed too: `embedded_*`.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from flax import nnx

from rl_jax import models, sampler
from rl_jax.sampler import SamplingConfig

STEP_SLOTS, WINDOW_SLOTS, WINDOW_STEPS = 16, 64, 20


def _prompts(workload, rng) -> tuple[np.ndarray, np.ndarray]:
    """`[rows, prompt_bucket]` left-padded random prompts of the workload's lengths."""
    width = workload.prompt_bucket
    mask = np.arange(width)[None] >= width - workload.prompt_lengths[:, None]
    tokens = rng.integers(1, 512, (workload.rows, width)) * mask
    return tokens.astype(np.int32), mask.astype(np.int32)


def _decoder(graphdef, params, workload, num_slots):
    """rows (keys, tokens, mask, lengths) -> (Rollout, slot-steps), jitted, each row ending at
    its length."""
    config = SamplingConfig(
        eos_id=10**6, max_new_tokens=workload.cap, generation_buckets=(workload.cap,),
        prompt_buckets=(workload.prompt_bucket,),
    )  # fmt: skip
    knobs = sampler._Knobs.of(config)
    program = sampler.GenerationProgram(graphdef, 0, False, workload.cap, num_slots)
    jitted = jax.jit(
        lambda params, keys, tokens, mask, lengths: sampler._generate_program(
            program, params, 0, keys, tokens, mask, knobs.replace(max_new_tokens=lengths)
        )
    )
    return lambda *rows: jitted(params, *rows)


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, out


def _embedded_runners():
    """The embedded preset's sample of step 1, lock-step and with slots: {name: () -> None}."""
    from rl_jax import build, parallel
    from rl_jax import config as config_lib
    from rl_jax.host_side import HostSide
    from rl_jax.train import make_step

    runners = {}
    for name, num_slots in (("lockstep", 0), ("slots", STEP_SLOTS)):
        config = config_lib.build("embedded", decode_slots=num_slots, out_dir="/tmp/unused")
        run = build.build_run(config)
        mesh = parallel.make_mesh(1)
        host = HostSide(config, run, make_step(config, run, mesh), mesh)
        examples = [[run.task.sample_prompts((0, 1), config.prompts_per_step)]]
        tokens, mask = host._encode(examples)
        state = host.step_fn.init(run.params, [0])

        def sample(host=host, state=state, tokens=tokens, mask=mask):
            fresh = jax.tree.map(lambda x: x.copy(), state)  # sample donates its state
            return host.step_fn.sample(fresh, tokens, mask, 1)[0]

        runners[name] = sample
    return runners


def run(workload, rounds: int) -> list[dict]:
    _, model = models.load_hf_checkpoint(workload.model_dir)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(1)
    tokens, mask = _prompts(workload, rng)
    rows = workload.rows
    lengths = [workload.response_lengths] + [
        _paper_lengths(rng, rows, workload.cap) for _ in range(WINDOW_STEPS - 1)
    ]
    keys = [sampler.row_keys(jax.random.key(k), rows)[1] for k in range(WINDOW_STEPS)]
    window = (
        jax.numpy.concatenate(keys), np.tile(tokens, (WINDOW_STEPS, 1)),
        np.tile(mask, (WINDOW_STEPS, 1)), np.concatenate(lengths),
    )  # fmt: skip
    lockstep = _decoder(graphdef, params, workload, 0)
    step_slots = _decoder(graphdef, params, workload, STEP_SLOTS)
    window_slots = _decoder(graphdef, params, workload, WINDOW_SLOTS)
    embedded = _embedded_runners()
    step = (keys[0], tokens, mask, lengths[0])
    for fn, args in ((lockstep, step), (step_slots, step), (window_slots, window)):
        rollout, _ = fn(*args)  # compile; every row ends at its drawn length
        np.testing.assert_array_equal(rollout.response_length, args[3])
    for fn in embedded.values():
        jax.block_until_ready(fn())
    records = []
    for r in range(rounds):
        load = os.getloadavg()[0]
        t_lock, (_, lock_steps) = _timed(lockstep, *step)
        t_slots, (_, slot_steps) = _timed(step_slots, *step)
        t_window_lock = 0.0
        for k in range(WINDOW_STEPS):
            t, _ = _timed(lockstep, keys[k], tokens, mask, lengths[k])
            t_window_lock += t
        t_window, (_, window_steps) = _timed(window_slots, *window)
        t_emb_lock, _ = _timed(embedded["lockstep"])
        t_emb_slots, _ = _timed(embedded["slots"])
        kept = int(np.sum(lengths[0]))
        records.append({
            "round": r,
            "lockstep_s": round(t_lock, 3),
            "slots_s": round(t_slots, 3),
            "speedup": round(t_lock / t_slots, 2),
            "window_lockstep_s": round(t_window_lock, 2),
            "window_slots_s": round(t_window, 2),
            "window_speedup": round(t_window_lock / t_window, 2),
            "row_step_utilization": round(kept / int(slot_steps), 3),
            "window_row_step_utilization": round(int(np.sum(window[3])) / int(window_steps), 3),
            "lockstep_utilization": round(kept / int(lock_steps), 3),
            "embedded_lockstep_s": round(t_emb_lock, 4),
            "embedded_slots_s": round(t_emb_slots, 4),
            "embedded_speedup": round(t_emb_lock / t_emb_slots, 3),
            "step_slots": STEP_SLOTS,
            "window_slots": WINDOW_SLOTS,
            "load_1min": round(load, 2),
        })  # fmt: skip
    return records


def _paper_lengths(rng, rows, cap):
    from padding import paper_lengths  # benchmarks/ is on sys.path (padding.main)

    return paper_lengths(rng, rows, cap)


if __name__ == "__main__":
    raise SystemExit("run it through benchmarks/padding.py --part sampler")
