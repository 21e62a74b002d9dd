"""The learner part of `padding.py`: one update padded against the same update packed.

Both updates are `Learner.update` of the `grpo` preset (AdamW, clip 1.0, no reference KL, as
`learner.py` times it) on the reference model and the same batch: the workload's rows, prompts
left padded to the bucket, random tokens, response masks 1 on each row's length. The packed
time includes planning the packing on the host (`Learner.pack`), as the loop pays it every step.
After one compiling call of each, every round times one padded and one packed update, in turn.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rl_jax import algorithms, models
from rl_jax.config import OptimizerConfig
from rl_jax.learner import Learner, TrainBatch


def workload_batch(workload, vocab_size: int, seed: int = 0) -> TrainBatch:
    """A `TrainBatch` of random tokens with the workload's real prompt and response lengths."""
    rng = np.random.default_rng(seed)
    rows, prompt, cap = workload.rows, workload.prompt_bucket, workload.cap
    tokens = lambda n: jnp.asarray(rng.integers(1, vocab_size, (rows, n)), jnp.int32)
    padding = (prompt - workload.prompt_lengths)[:, None]
    return TrainBatch(
        prompt_tokens=tokens(prompt),
        prompt_mask=jnp.asarray(np.arange(prompt)[None] >= padding, jnp.int32),
        response_tokens=tokens(cap),
        response_mask=jnp.asarray(np.arange(cap)[None] < workload.response_lengths[:, None],
                                  jnp.float32),
        untruncated_logp=jnp.full((rows, cap), -np.log(vocab_size), jnp.float32),
        rewards=jnp.asarray(rng.integers(0, 2, (rows,)), jnp.float32),
    )  # fmt: skip


def run(workload, rounds: int) -> list[dict]:
    config, model = models.load_hf_checkpoint(workload.model_dir)
    graphdef, params = nnx.split(model)
    padded = Learner(
        graphdef=graphdef, algorithm=algorithms.get("grpo"),
        optimizer=OptimizerConfig(learning_rate=1e-5, grad_clip=1.0),
        group_size=workload.group_size, ref_metrics=False,
    )  # fmt: skip
    packed = dataclasses.replace(padded, packing=True)
    batch = workload_batch(workload, config.vocab_size)
    mask = np.asarray(batch.prompt_mask)
    states = {name: learner.init(jax.tree.map(jnp.copy, params)) for name, learner in
              (("padded", padded), ("packed", packed))}  # fmt: skip
    key = jax.random.key(0)

    def update(name):
        start = time.perf_counter()
        if name == "packed":
            pack = packed.pack(mask, workload.response_lengths, workload.cap)
            states[name], metrics = packed.update(states[name], batch, None, key, pack)
        else:
            states[name], metrics = padded.update(states[name], batch, None, key)
        loss = float(metrics["loss"])
        return time.perf_counter() - start, loss

    compile_s = {name: round(update(name)[0], 2) for name in ("padded", "packed")}
    pack = packed.pack(mask, workload.response_lengths, workload.cap)
    shape = f"{pack.source.shape[1]}x{pack.source.shape[2]}"
    records = []
    for i in range(rounds):
        load = os.getloadavg()[0]
        padded_s, padded_loss = update("padded")
        packed_s, packed_loss = update("packed")
        records.append({
            "round": i + 1, "padded_s": round(padded_s, 3), "packed_s": round(packed_s, 3),
            "speedup": round(padded_s / packed_s, 2), "packed_shape": shape,
            "padded_shape": f"{workload.rows}x{workload.prompt_bucket + workload.cap}",
            "loss_rel_diff": float(f"{abs(packed_loss - padded_loss) / abs(padded_loss):.2g}"),
            "first_call_s": compile_s, "loadavg_1m": round(load, 2),
        })  # fmt: skip
    return records
