"""Supervised warm start of the tiny policy on the embedded sum task, cached on disk.

RL fine-tuning (arXiv 2509.24203 §5) starts from a policy that already has the skills the task
needs and mostly re-weights behaviours it already shows. The warm start builds such a base
policy by teacher forcing on a mixture of three strategies per prompt:

- chain:  the worked chain of partial sums `3+5=8+2=10#10` (always correct);
- direct: `#S`, correct for two terms, otherwise off by 1..`direct_max_error`;
- ramble: filler words with no answer and no EOS, so sampling runs into the response cap.

Phase 1 teaches all three skills (mostly chains); phase 2 tilts the choice towards rambling
(mixture 0.2 chain, 0.1 direct, 0.7 ramble), so the base policy's held-out reward is low (~0.2)
while correct chains remain one re-weighting away. Most base responses are long, capped and
unrewarded, as in real RL on reasoning tasks, so RL shortens responses while it raises the
reward (seed 0: held-out reward 0.20, 69% rambles at the 25-token cap, 19% chains at 0.88
accuracy, 12% direct answers; mean length 20.9 tokens). With more short wrong direct answers in
phase 2, those dominate the bad behaviours and RL makes responses longer instead. Loss:
token-mean cross-entropy on response tokens (EOS included).

Results are cached under `$RL_JAX_CACHE/warm_start/<hash>` (default `~/.cache/rl_jax`), keyed by
the task, model and warm-start configs and the source of the modules the weights depend on, and
written atomically (temporary directory + rename). Processes that need the same missing policy at
once train it once: the first holds a lock beside the entry, the others wait and load its result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rl_jax import cache, models, run_lock, sampler, sampling
from rl_jax.tasks.arithmetic import ArithmeticTask, classify, parse_terms
from rl_jax.tasks.arithmetic import solution as chain_solution

STRATEGIES = ("chain", "direct", "ramble")
_RAMBLE_WORDS = ("so", "um", "well", "let", "me", "see", "hmm", "ok", "then", "wait", "and")
_CACHE_FORMAT = 1  # bump when the checkpoint layout or the training recipe changes meaning


@dataclasses.dataclass(frozen=True)
class Phase:
    """`steps` optimizer steps at peak learning rate `lr` (linear warmup, cosine decay to 10%)
    with strategies drawn per example from `mixture` (weights of chain, direct, ramble)."""

    steps: int
    lr: float
    mixture: tuple[float, float, float]

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"Phase.steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"Phase.lr must be > 0, got {self.lr}")
        if len(self.mixture) != 3 or min(self.mixture) < 0 or not sum(self.mixture) > 0:
            raise ValueError(
                f"Phase.mixture must be 3 non-negative weights for {STRATEGIES}, got {self.mixture}"
            )


@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
    """The warm-start recipe. `model` names a `rl_jax.models` preset (vocab set from the task).

    Small batches are deliberate: at a fixed number of sequences (~18k), batch 8 learned the
    partial-sum table better than 16, 32 or 64 (chain accuracy ~0.9 vs 0.8 / 0.8 / 0.16), at
    the lowest CPU cost per sequence.
    """

    model: str = "tiny"
    seed: int = 0
    batch_size: int = 8
    warmup_steps: int = 50
    grad_clip: float = 1.0
    direct_max_error: int = 5
    phases: tuple[Phase, ...] = (
        Phase(steps=1800, lr=7e-4, mixture=(0.7, 0.2, 0.1)),
        Phase(steps=400, lr=2e-4, mixture=(0.2, 0.1, 0.7)),
    )
    num_eval: int = 512

    def __post_init__(self):
        if self.model not in models.config_names():
            raise ValueError(f"model must be one of {models.config_names()}, got {self.model!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.direct_max_error < 1:
            raise ValueError(f"direct_max_error must be >= 1, got {self.direct_max_error}")
        if not self.phases:
            raise ValueError("phases must hold at least one Phase")


def model_config(task: ArithmeticTask, config: WarmStartConfig) -> models.ModelConfig:
    """The preset with the task tokenizer's vocabulary."""
    preset = models.get_config(config.model)
    return dataclasses.replace(preset, vocab_size=task.tokenizer.vocab_size)


# --- data --------------------------------------------------------------------------------------


def target_response(terms: tuple[int, ...], strategy: str, rng, config, max_len: int) -> str:
    """The response text taught for `terms` under `strategy` (a ramble is cut at `max_len`)."""
    total = sum(terms)
    if strategy == "chain":
        return chain_solution(terms)
    if strategy == "direct":
        if len(terms) == 2:
            return f"#{total}"
        error = int(rng.integers(1, config.direct_max_error + 1))
        return f"#{total + error if total < error or rng.random() < 0.5 else total - error}"
    words = rng.choice(_RAMBLE_WORDS, size=max_len).tolist()
    return " ".join(words)[:max_len]


def training_batch(task: ArithmeticTask, rng: np.random.Generator, n: int, mixture, config):
    """Teacher-forcing batch: (tokens int32 [n, P+N], loss_mask float32 [n, P+N-1]).

    Rows are BOS + prompt left-padded to P = max_prompt_len, then the response (+ EOS unless it
    is a ramble) right-padded to N = max_response_len. loss_mask[b, i] = 1 where tokens[b, i+1]
    is a response token: the targets of next-token prediction.
    """
    tok, width_p, width_r = task.tokenizer, task.max_prompt_len, task.max_response_len
    weights = np.asarray(mixture, np.float64) / np.sum(mixture)
    tokens = np.full((n, width_p + width_r), tok.pad_id, np.int32)
    targets = np.zeros((n, width_p + width_r), np.float32)
    for b, example in enumerate(task.sample_prompts(rng, n)):
        strategy = STRATEGIES[rng.choice(3, p=weights)]
        text = target_response(parse_terms(example.prompt), strategy, rng, config, width_r)
        prompt = tok.encode(example.prompt, add_bos=True)
        response = tok.encode(text, add_eos=strategy != "ramble")[:width_r]
        tokens[b, width_p - len(prompt) : width_p] = prompt
        tokens[b, width_p : width_p + len(response)] = response
        targets[b, width_p : width_p + len(response)] = 1.0
    return tokens, targets[:, 1:]


def _attention_mask(tokens: jax.Array, prompt_width: int) -> jax.Array:
    """1 on real tokens: non-pad in the prompt block, everything up to EOS in the response."""
    real = tokens != 0
    response_started = jnp.arange(tokens.shape[1]) >= prompt_width
    return (real | response_started[None, :]).astype(jnp.int32)


# --- training ----------------------------------------------------------------------------------


def _schedule(config: WarmStartConfig) -> optax.Schedule:
    parts, boundaries, start = [], [], 0
    for phase in config.phases:
        warmup = min(config.warmup_steps, phase.steps - 1)
        parts.append(
            optax.warmup_cosine_decay_schedule(
                init_value=0.0,
                peak_value=phase.lr,
                warmup_steps=warmup,
                decay_steps=phase.steps,
                end_value=0.1 * phase.lr,
            )  # fmt: skip
        )
        start += phase.steps
        boundaries.append(start)
    return optax.join_schedules(parts, boundaries[:-1])


def _make_train_step(graphdef, optimizer, prompt_width: int):
    def loss_fn(params, tokens, loss_mask):
        inputs = tokens[:, :-1]
        logits = models.forward(
            graphdef, params, inputs, None, _attention_mask(inputs, prompt_width)
        )
        target_logp = sampling.gather_logp(
            sampling.tempered_log_softmax(logits, 1.0), tokens[:, 1:]
        )
        return -jnp.sum(target_logp * loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1.0)

    @jax.jit
    def train_step(params, opt_state, tokens, loss_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, loss_mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def train(task: ArithmeticTask, config: WarmStartConfig, log_every: int = 0):
    """Runs the warm start: (model_config, model, losses per step)."""
    cfg = model_config(task, config)
    model = models.init_model(cfg, seed=config.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.grad_clip), optax.adam(_schedule(config))
    )
    opt_state = optimizer.init(params)
    train_step = _make_train_step(graphdef, optimizer, task.max_prompt_len)
    rng = np.random.default_rng([config.seed, 1])
    losses, step = [], 0
    for phase in config.phases:
        for _ in range(phase.steps):
            tokens, loss_mask = training_batch(task, rng, config.batch_size, phase.mixture, config)
            params, opt_state, loss = train_step(params, opt_state, tokens, loss_mask)
            losses.append(loss)
            step += 1
            if log_every and step % log_every == 0:
                print(f"warm start step {step}: loss {float(loss):.3f}", flush=True)
    nnx.update(model, params)
    return cfg, model, [float(x) for x in losses]


# --- evaluation --------------------------------------------------------------------------------


def evaluate(task: ArithmeticTask, graphdef, params, num_eval: int, seed: int = 0) -> dict:
    """Held-out reward of temperature-1 samples, one per eval prompt, and the strategy mix.

    Returns reward (mean), share/<s> and accuracy/<s> for s in chain, direct, other,
    response_length (mean tokens, EOS included) and clip_ratio (share that hit the cap).
    """
    examples = task.eval_examples(num_eval)
    tokens, mask = task.tokenizer.encode_batch([ex.prompt for ex in examples], add_bos=True)
    sampling = sampler.SamplingConfig(
        eos_id=task.tokenizer.eos_id, pad_id=task.tokenizer.pad_id,
        max_new_tokens=task.max_response_len,
    )  # fmt: skip
    state = sampler.SamplerState.create(params, jax.random.key(seed))
    rollout, _ = sampler.generate(graphdef, state, tokens, mask, sampling)
    texts = task.tokenizer.decode_batch(np.asarray(rollout.response_tokens))
    rewards = np.array([task.reward(t, ex) for t, ex in zip(texts, examples, strict=True)])
    kinds = np.array([classify(t) for t in texts])
    metrics = {
        "reward": float(rewards.mean()),
        "response_length": float(np.mean(rollout.response_length)),
        "clip_ratio": float(np.mean(rollout.truncated)),
    }
    for kind in ("chain", "direct", "other"):
        chosen = kinds == kind
        metrics[f"share/{kind}"] = float(chosen.mean())
        metrics[f"accuracy/{kind}"] = float(rewards[chosen].mean()) if chosen.any() else 0.0
    return metrics


# --- cache -------------------------------------------------------------------------------------


# The code the trained weights depend on, bit for bit: an edit to any of these files trains the
# warm start anew instead of reusing weights an older version of the code produced.
_SOURCES = (
    "warm_start.py", "sampling.py", "tokenizer.py", "tasks/arithmetic.py", "models/decoder.py",
    "models/attention.py", "models/config.py",
)  # fmt: skip


def _source_digest() -> str:
    package = pathlib.Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((package / name).read_bytes())
    return digest.hexdigest()


def cache_key(task: ArithmeticTask, config: WarmStartConfig) -> str:
    """Hash of everything the checkpoint depends on: task, model, recipe, alphabet, code."""
    spec = {
        "format": _CACHE_FORMAT,
        "code": _source_digest(),
        "task": dataclasses.asdict(task.config),
        "alphabet": task.tokenizer.alphabet,
        "model": dataclasses.asdict(model_config(task, config)),
        "warm_start": dataclasses.asdict(config),
    }
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_dir(task: ArithmeticTask, config: WarmStartConfig) -> pathlib.Path:
    return cache.path("warm_start") / cache_key(task, config)


def read_report(path: pathlib.Path) -> dict:
    """The `warm_start.json` saved beside a cached checkpoint (configs, metrics, timings)."""
    return json.loads((pathlib.Path(path) / "warm_start.json").read_text())


def _save_atomically(path: pathlib.Path, model_cfg, model, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        models.save_hf_checkpoint(tmp, model_cfg, model)
        (tmp / "warm_start.json").write_text(json.dumps(report, indent=2, default=str))
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "warm_start.json").exists():  # another process won the race: keep it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_train(
    task: ArithmeticTask | None = None,
    config: WarmStartConfig | None = None,
    *,
    verbose: bool = False,
):
    """The warm-started base policy: (model_config, model), trained once per config and cached."""
    task = task or ArithmeticTask()
    config = config or WarmStartConfig()
    path = cache_dir(task, config)
    # One process trains a missing policy; the others wait for it and load its result.
    with run_lock.exclusive(path.parent / f".{path.name}.lock"):
        if not (path / "warm_start.json").exists():
            start = time.perf_counter()
            model_cfg, model, losses = train(task, config, log_every=100 if verbose else 0)
            train_seconds = time.perf_counter() - start
            split = nnx.split(model, nnx.Param)
            metrics = evaluate(task, *split, config.num_eval, seed=config.seed)
            report = {
                "task": dataclasses.asdict(task.config),
                "warm_start": dataclasses.asdict(config),
                "final_loss": float(np.mean(losses[-20:])),
                "train_seconds": train_seconds,
                "eval": metrics,
            }
            _save_atomically(path, model_cfg, model, report)
            if verbose:
                print(f"warm start saved to {path}", flush=True)
        elif verbose:
            print(f"warm start loaded from {path}", flush=True)
    return models.load_hf_checkpoint(path)
