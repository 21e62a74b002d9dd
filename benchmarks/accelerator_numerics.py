"""The numerics half of `benchmarks/accelerator.py`: a tiny random model run on the device and
on the CPU reference, and the checks that compare them (float32 unless said; the caller sets
`highest` matmul precision). Each check returns {"ok": bool, numbers...}.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rl_jax import algorithms, groups, models, sampler
from rl_jax.config import OptimizerConfig
from rl_jax.learner import Learner, TrainBatch
from rl_jax.models.attention import attend, attend_dot_product

# Tolerances. float32 against float32 (two compilers, other summation orders): 1e-4 of the
# largest reference value, ~100x the rounding seen between attention kernels on XLA:CPU.
F32_TOL = 1e-4
# A sampled token may differ only where the reference's two candidates tie within this (then
# the rows legitimately continue differently).
TIE_TOL = 1e-3
# bfloat16 keeps 8 significant bits (2^-9 relative rounding): the tiny models' gradients move
# by up to 3% of a leaf's largest value on XLA:CPU, which computes some bfloat16 operations in
# float32; an accelerator rounds every one. Also the tolerance of cuDNN (bfloat16 inputs) and
# of the device's default matmul precision.
BF16_TOL = 0.1


def _close(value, reference, tol, floor: float = 1.0) -> dict:
    """The largest difference relative to max(floor, largest |reference|): {max_diff, rel_diff,
    ok}. The floor of 1 makes values of order 1 (logits, log-probs) compare absolutely."""
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    diff = float(np.max(np.abs(value - reference), initial=0.0))
    rel = diff / max(floor, float(np.max(np.abs(reference), initial=0.0)))
    return {"max_diff": diff, "rel_diff": rel, "ok": bool(np.isfinite(rel) and rel <= tol)}


def _grads_close(grads, references, tol) -> dict:
    """`_close` per gradient leaf, relative to the leaf's largest value or, where smaller, to 1%
    of the largest of all leaves (the key bias's gradient is zero up to rounding: softmax
    ignores what is added to every key). The worst leaf is reported."""
    floor = 1e-2 * max(float(np.max(np.abs(r))) for r in references)
    results = [_close(a, b, tol, floor) for a, b in zip(grads, references, strict=True)]
    worst = max(results, key=lambda r: r["rel_diff"])
    return {**worst, "ok": all(r["ok"] for r in results), "leaves": len(results)}


def _metrics_close(metrics, references, tol) -> dict:
    """`_close` per metric (each against max(1, |reference|)); the worst reported."""
    results = [_close(metrics[k], references[k], tol) for k in sorted(references)]
    return {**max(results, key=lambda r: r["rel_diff"]), "ok": all(r["ok"] for r in results)}


_forward = jax.jit(models.forward)
_hidden = jax.jit(lambda *args: models.forward_hidden(*args)[0], static_argnums=(0, 4))


class Tiny:
    """The numerics workload: a random model, prompts with left padding, a batch to learn on.
    Parameters and data stay on the host; each method runs on the device it is given."""

    def __init__(self, config, rows: int = 8, group: int = 2, prompt: int = 8, response: int = 16):
        self.config, self.group, self.response = config, group, response
        graphdef, params = nnx.split(models.init_model(config, 0))
        self.graphdef, self.params = graphdef, jax.tree.map(np.asarray, params)
        rng = np.random.default_rng(0)
        vocab = config.vocab_size
        self.prompts = rng.integers(1, vocab, (rows // group, prompt)).astype(np.int32)
        self.prompt_mask = np.ones_like(self.prompts)
        for i in range(1, rows // group):
            self.prompt_mask[i, : i % prompt] = 0  # left padding of 0, 1, 2, ... tokens
        lengths = rng.integers(1, response + 1, rows)
        response_mask = (np.arange(response)[None] < lengths[:, None]).astype(np.float32)
        behaviour = -np.log(vocab) + 0.3 * rng.standard_normal((rows, response))
        self.batch = TrainBatch(
            prompt_tokens=groups.rows_from_prompts(self.prompts, group),
            prompt_mask=groups.rows_from_prompts(self.prompt_mask, group),
            response_tokens=rng.integers(1, vocab, (rows, response)).astype(np.int32),
            response_mask=response_mask,
            untruncated_logp=(behaviour * response_mask).astype(np.float32),
            rewards=rng.standard_normal(rows).astype(np.float32),  # no group of equal rewards
        )  # fmt: skip
        self.ref_params = jax.tree.map(
            lambda x: x + 0.01 * rng.standard_normal(x.shape).astype(x.dtype), self.params
        )
        self._updates = {}

    def learner(self, graphdef=None, attention: str = "xla") -> Learner:
        # AdamW's first update with eps = 1 (far above every |g|), lr 1, no clipping or decay
        # is u = -g / (|g| + 1), so g = -u / (1 - |u|) reads the gradient off the public update.
        return Learner(
            graphdef or self.graphdef, algorithms.get("grpo"),
            optimizer=OptimizerConfig(learning_rate=1.0, eps=1.0, grad_clip=0.0),
            group_size=self.group,
            memory=models.MemoryOptions(attention=attention, attention_chunk=4),
        )  # fmt: skip

    def update(self, device, learner: Learner) -> tuple[dict, list]:
        """(metrics, gradient leaves) of one `learner.update` on `device` (computed once)."""
        key = (device, learner)
        if key not in self._updates:
            put = lambda tree: jax.device_put(tree, device)
            params = put(self.params)
            state, metrics = learner.update(
                learner.init(params), put(self.batch), put(self.ref_params), jax.random.key(1)
            )
            steps = [
                np.asarray(after) - before
                for after, before in zip(
                    jax.tree.leaves(state.params), jax.tree.leaves(self.params), strict=True
                )
            ]
            grads = [-u / (1.0 - np.abs(u)) for u in steps]
            self._updates[key] = ({k: float(v) for k, v in metrics.items()}, grads)
        return self._updates[key]

    def logits(self, device, graphdef=None, tokens=None, mask=None) -> np.ndarray:
        tokens = self.batch.prompt_tokens if tokens is None else tokens
        mask = self.batch.prompt_mask if mask is None else mask
        params, tokens, mask = jax.device_put((self.params, tokens, mask), device)
        return np.asarray(_forward(graphdef or self.graphdef, params, tokens, mask))

    def hidden(self, device, attention: str) -> np.ndarray:
        memory = models.MemoryOptions(attention=attention, attention_chunk=4)
        batch = (self.params, self.batch.prompt_tokens, self.batch.prompt_mask)
        params, tokens, mask = jax.device_put(batch, device)
        return np.asarray(_hidden(self.graphdef, params, tokens, mask, memory))

    def sampling(self, greedy: bool) -> sampler.SamplingConfig:
        width = self.prompts.shape[1]
        return sampler.SamplingConfig(
            eos_id=self.config.vocab_size, greedy=greedy, max_new_tokens=self.response,
            prompt_buckets=(width,), generation_buckets=(self.response,),
        )  # fmt: skip

    def generate(self, device, greedy: bool):
        """A rollout (numpy) of every prompt, `group` rows each; EOS never drawn."""
        with jax.default_device(device):
            params = jax.device_put(self.params, device)
            state = sampler.SamplerState.create(params, jax.random.key(2))
            rollout, _ = sampler.generate(
                self.graphdef, state, self.prompts, self.prompt_mask, self.sampling(greedy),
                self.group,
            )  # fmt: skip
        return jax.tree.map(np.asarray, rollout)


def check_logits(tiny: Tiny, device, cpu, default_precision: bool = False) -> dict:
    """Logits on the device against the CPU; `default_precision`: the caller left the device's
    default matmul precision (TF32 on recent NVIDIA GPUs, bfloat16 passes on TPUs), compared
    at the bfloat16 tolerance."""
    tol = BF16_TOL if default_precision else F32_TOL
    return {**_close(tiny.logits(device), tiny.logits(cpu), tol), "tolerance": tol}


def check_sampler(tiny: Tiny, device, cpu, greedy: bool) -> dict:
    """Tokens equal up to a near tie; log-probs equal where the tokens are."""
    ours, ref = tiny.generate(device, greedy), tiny.generate(cpu, greedy)
    differs = ours.response_tokens != ref.response_tokens
    rows, width = differs.shape
    first = np.where(differs.any(1), differs.argmax(1), width)
    # The reference's scores of both candidates at each first divergence, on the device's prefix.
    tokens = np.concatenate([ours.prompt_tokens, ours.response_tokens], 1)
    mask = np.concatenate([ours.prompt_mask, np.ones_like(ours.response_tokens)], 1)
    logits = tiny.logits(cpu, tokens=tokens, mask=mask)[:, ours.prompt_tokens.shape[1] - 1 :]
    keys = sampler.row_keys(jax.random.key(2), rows)[1]  # documented: fold_in(row key, t)
    margins = []
    for r in np.flatnonzero(first < width):
        t = first[r]
        scores = logits[r, t]
        if not greedy:
            scores = scores + np.asarray(
                jax.random.gumbel(jax.random.fold_in(keys[r], t), scores.shape)
            )
        margins.append(abs(scores[ours.response_tokens[r, t]] - scores[ref.response_tokens[r, t]]))
    same = np.arange(width)[None] < first[:, None]
    logp = _close(
        np.where(same, ours.untruncated_logp, 0), np.where(same, ref.untruncated_logp, 0), F32_TOL
    )
    tie = max(margins, default=0.0)
    return {
        "tokens_equal": float(np.mean(~differs)), "diverged_rows": int((first < width).sum()),
        "max_tie_margin": float(tie), "logp_max_diff": logp["max_diff"],
        "ok": bool(logp["ok"] and tie <= TIE_TOL),
    }  # fmt: skip


def check_learner(tiny: Tiny, device, cpu) -> dict:
    metrics, grads = tiny.update(device, tiny.learner())
    ref_metrics, ref_grads = tiny.update(cpu, tiny.learner())
    values = _metrics_close(metrics, ref_metrics, F32_TOL)
    grad = _grads_close(grads, ref_grads, 10 * F32_TOL)  # per leaf: more relative rounding
    return {
        "loss": metrics["loss"], "ref_loss": ref_metrics["loss"],
        "grad_norm": metrics["grad_norm"], "metrics_max_diff": values["max_diff"],
        "grad_rel_diff": grad["rel_diff"], "grad_leaves": grad["leaves"],
        "ok": values["ok"] and grad["ok"] and metrics["grad_norm"] > 0,
    }  # fmt: skip


def check_attention(tiny: Tiny, device, attention: str) -> dict:
    """Hidden states, loss and gradients of `attention` against `xla` on the device."""
    hidden = _close(tiny.hidden(device, attention), tiny.hidden(device, "xla"), F32_TOL)
    metrics, grads = tiny.update(device, tiny.learner(attention=attention))
    ref_metrics, ref_grads = tiny.update(device, tiny.learner())
    grad = _grads_close(grads, ref_grads, 10 * F32_TOL)
    loss = _close(metrics["loss"], ref_metrics["loss"], F32_TOL)
    return {
        "hidden_rel_diff": hidden["rel_diff"], "loss_diff": loss["max_diff"],
        "grad_rel_diff": grad["rel_diff"], "ok": hidden["ok"] and loss["ok"] and grad["ok"],
    }  # fmt: skip


def check_cudnn(device, config) -> dict:
    """rl_jax's `attend_dot_product` in bfloat16 (cuDNN's fused attention on a GPU) against
    `attend` in float32 on the same inputs: output and input gradients over the rows that
    attend to something (left padding's rows attend to nothing; their output is never read).
    Also whether its program holds cuDNN's fused kernel, and whether cuDNN's gradients are
    finite without rl_jax's guard (a padded row attending to its own position)."""
    rng = np.random.default_rng(3)
    b, t, heads, kv, d = 2, 64, config.num_heads, config.num_kv_heads, config.head_dim
    q, k, v = (
        jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.bfloat16) for n in (heads, kv, kv)
    )
    pad = np.arange(t)[None] >= np.array([[0], [7]])  # row 1 left-padded by 7 tokens
    allowed = jnp.asarray(np.tril(np.ones((t, t), bool))[None] & pad[:, None, :])
    weights = jnp.asarray(rng.standard_normal((b, t, heads, d)), jnp.float32)

    def loss(fn, q, k, v):  # over the real rows only (where: NaN * 0 would be NaN)
        out = jnp.where(pad[:, :, None, None], fn(q, k, v).astype(jnp.float32), 0.0)
        return jnp.sum(out * weights)

    ours = lambda q, k, v: attend_dot_product(q, k, v, allowed)
    unguarded = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=allowed[:, None], implementation="cudnn"
    )
    exact = lambda q, k, v: attend(*(x.astype(jnp.float32) for x in (q, k, v)), allowed)
    grad = lambda fn: jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))
    put = lambda x: jax.device_put(x, device)
    q, k, v = put(q), put(k), put(v)
    out, ref = (np.asarray(jax.jit(f)(q, k, v), np.float32) for f in (ours, exact))
    grads, ref_grads = grad(ours)(q, k, v), grad(exact)(q, k, v)
    raw_grads = grad(unguarded)(q, k, v)
    real = pad[:, :, None, None]
    value = _close(out * real, ref * real, BF16_TOL)
    grad_close = _grads_close(
        [np.asarray(g, np.float32) for g in grads], [np.asarray(g) for g in ref_grads], BF16_TOL
    )
    hlo = jax.jit(ours).lower(q, k, v).compile().as_text()
    uses_cudnn = "__cudnn$fmha" in hlo  # the fused kernel
    return {
        "out_rel_diff": value["rel_diff"], "grad_rel_diff": grad_close["rel_diff"],
        "rl_jax_dot_product_uses_cudnn": uses_cudnn,
        "unguarded_grads_finite": all(bool(np.isfinite(np.asarray(g, np.float32)).all())
                                      for g in raw_grads),
        "ok": value["ok"] and grad_close["ok"] and uses_cudnn,
    }  # fmt: skip


def check_dot_product_bfloat16(tiny: Tiny, device) -> dict:
    """One bfloat16 learner update with attention=dot_product (cuDNN on a GPU) against
    attention=xla, both bfloat16 on the device: loss, metrics and gradients."""
    config = dataclasses.replace(tiny.config, dtype="bfloat16")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: models.Decoder(config, rngs=nnx.Rngs(0))))
    metrics, grads = tiny.update(device, tiny.learner(graphdef, attention="dot_product"))
    ref_metrics, ref_grads = tiny.update(device, tiny.learner(graphdef))
    values = _metrics_close(metrics, ref_metrics, BF16_TOL)
    grad = _grads_close(grads, ref_grads, BF16_TOL)
    return {
        "loss": metrics["loss"], "ref_loss": ref_metrics["loss"],
        "metrics_max_diff": values["max_diff"], "grad_rel_diff": grad["rel_diff"],
        "tolerance": BF16_TOL, "ok": values["ok"] and grad["ok"],
    }  # fmt: skip


def check_bfloat16(tiny: Tiny, device) -> dict:
    """bfloat16 compute (the same float32 parameters) against float32, on the device."""
    config = dataclasses.replace(tiny.config, dtype="bfloat16")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: models.Decoder(config, rngs=nnx.Rngs(0))))
    logits = _close(tiny.logits(device, graphdef), tiny.logits(device), BF16_TOL)
    metrics, grads = tiny.update(device, tiny.learner(graphdef))
    ref_metrics, ref_grads = tiny.update(device, tiny.learner())
    loss = _close(metrics["loss"], ref_metrics["loss"], BF16_TOL)
    grad = _grads_close(grads, ref_grads, BF16_TOL)
    return {
        "logits_rel_diff": logits["rel_diff"], "loss_diff": loss["max_diff"],
        "grad_rel_diff": grad["rel_diff"], "tolerance": BF16_TOL,
        "ok": logits["ok"] and loss["ok"] and grad["ok"],
    }  # fmt: skip
