"""`TrainConfig`: everything one training run depends on, validated before anything compiles.

A run is described by one flat, frozen dataclass. Presets are named configs (`PRESETS`); a JSON
file gives the same fields; `key=value` overrides (values parsed as JSON, dotted keys for the
dict fields, e.g. `algorithm_overrides.eps_high=0.28`) are applied last.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence

from rl_jax import algorithms
from rl_jax.sync import SyncSchedule

TASKS = ("arithmetic", "gsm8k")
MAX_SEED = 2**32 - 1  # jax.random.key(seed) aliases seeds modulo 2**32
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings: warmup + decay learning-rate schedule, global-norm gradient clipping.

    `rl_jax.learner.make_optimizer` turns them into an optax transformation.
    """

    learning_rate: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0  # steps of the cosine/linear decay after warmup (0: constant)
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"optimizer.schedule must be one of {SCHEDULES}, got {self.schedule!r}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("warmup_steps", "decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One RL run (DESIGN.md §1). Field docs are the CLI help (`python -m rl_jax.train --help`).

    task: "arithmetic" (the embedded default) or "gsm8k".
    task_options: keyword arguments of the task (e.g. {"max_terms": 5}, {"data_dir": ...}).
    model: "warm-start" (the embedded default's cached SFT policy), a model preset name
      (`rl_jax.models.config_names()`, random init), or a Hugging Face model directory.
    algorithm: a preset of `rl_jax.algorithms.names()`; algorithm_overrides: its fields.
    prompts_per_step, group_size: the batch is prompts_per_step * group_size responses.
    max_response_len: new-token cap (None: the task's own, e.g. 25 for arithmetic); temperature, top_k (0 = off), top_p (1 = off): sampling.
    learning_rate ... grad_clip: AdamW (see `OptimizerConfig`).
    micro_batches: gradient-accumulation pieces per update.
    steps: learner updates; sync_interval, sync_offset: DESIGN.md §4.
    seed, num_seeds: trains seeds seed .. seed + num_seeds - 1 as one compiled program; with
      num_seeds > 1 each run writes to out_dir/seed_<s>/ and equals a single run of that seed.
    runs_per_batch: how many of those runs one vmapped computation holds; the program loops
      over num_seeds / runs_per_batch such batches (which it must divide). 1 (the default): the
      runs go one after another inside the program, the fastest way on a CPU, where batching
      the tiny policy's matmuls over runs only pushes them out of the caches (BENCHMARKS.md,
      "Many seeds in one program"); num_seeds: all at once, for an accelerator.
    eval_every, eval_prompts: held-out evaluation of the learner (0 disables).
    checkpoint_every, keep_checkpoints: orbax checkpoints (resumed automatically).
    ref_metrics: log KL to the initial policy (one extra forward pass per step).
    fsdp: devices per parameter shard (1 = replicated parameters, pure data parallelism).
    window_cap_gib: KV-cache GiB per device one generate call may use: the sampler generates
      the batches of up to sync_interval steps (same policy version) in one call within it;
      0 (the default) generates step by step. On this project's 2-core CPU a window is not
      reliably faster: a 20x larger decode batch does only 1.4x the rows per second, and
      windows measured 0.85-1.5x in sampling between runs (BENCHMARKS.md, "Sync throughput on
      the fourth host").
    decode_slots: rows the sampler decodes at a time, summed over devices (which it must
      divide); a row that ends frees its slot for the next row of the step or the window
      (`rl_jax.slots`). 0: all rows at once, until the longest is done (lock-step), the
      default: the fastest for the embedded preset, whose rows are nearly all as long as the
      cap (BENCHMARKS.md, "Slot decoding"). Changes the sampler's speed, not its draws.
    compute_dtype, param_dtype: "float32" | "bfloat16" activations / stored parameters (the
      optimizer moments stay float32); remat: "none" | "full" | "save-dots" recomputation of
      the decoder layers; attention: "xla" | "chunked" | "dot_product"; logprob_chunk: response
      positions per block of the log-prob / entropy / KL pass (0 = one block). README,
      "Accelerators", gives the settings for each machine.
    out_dir: where metrics, TensorBoard events, checkpoints and config.json go; rerunning into
      it resumes the run there, with the same fields but steps (which may grow) and the
      eval/checkpoint cadence (`rl_jax.run_dir`).
    """

    task: str = "arithmetic"
    task_options: Mapping[str, typing.Any] = dataclasses.field(default_factory=dict)
    model: str = "warm-start"
    algorithm: str = "grpo"
    algorithm_overrides: Mapping[str, typing.Any] = dataclasses.field(default_factory=dict)
    prompts_per_step: int = 8
    group_size: int = 8
    max_response_len: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    learning_rate: float = 2e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batches: int = 1
    steps: int = 400
    sync_interval: int = 1
    sync_offset: int = 0
    seed: int = 0
    num_seeds: int = 1
    runs_per_batch: int = 1
    eval_every: int = 20
    eval_prompts: int = 128
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    ref_metrics: bool = True
    fsdp: int = 1
    window_cap_gib: float = 0.0
    decode_slots: int = 0
    # Memory and precision at scale (issue 12); validated by _check_memory.
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"
    logprob_chunk: int = 0
    out_dir: str = "runs/default"

    def __post_init__(self):
        _check_types(self)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.algorithm not in algorithms.names():
            raise ValueError(
                f"algorithm must be one of {list(algorithms.names())}, got {self.algorithm!r}"
            )
        self.algorithm_preset()  # bad overrides raise ValueError here
        _check_task_options(self.task, self.task_options)
        positive = (
            "prompts_per_step",
            "max_response_len",
            "steps",
            "micro_batches",
            "fsdp",
            "num_seeds",
            "runs_per_batch",
        )
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}"
            )
        if not 0 <= self.seed <= MAX_SEED - (max(self.num_seeds, 1) - 1):
            raise ValueError(
                f"seed must be an integer in [0, {MAX_SEED}] (the last of num_seeds too), "
                f"got {self.seed}"
            )
        if self.num_seeds % self.runs_per_batch:
            raise ValueError(
                f"runs_per_batch must divide num_seeds = {self.num_seeds} (one of "
                f"{[d for d in range(1, self.num_seeds + 1) if self.num_seeds % d == 0]}), "
                f"got {self.runs_per_batch}"
            )
        if self.decode_slots < 0:
            raise ValueError(
                f"decode_slots must be >= 0 (0 = lock-step decode), got {self.decode_slots}"
            )
        if not self.window_cap_gib >= 0:
            raise ValueError(
                f"window_cap_gib must be >= 0 (0 = no windows), got {self.window_cap_gib}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}"
            )
        if (self.prompts_per_step * self.group_size) % self.micro_batches:
            raise ValueError(
                f"micro_batches={self.micro_batches} must divide the batch of "
                f"prompts_per_step * group_size = {self.prompts_per_step * self.group_size}"
            )
        for name in ("eval_every", "eval_prompts", "checkpoint_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        self.sync_schedule()
        self.optimizer()
        _check_memory(self)
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise ValueError(f"out_dir {self.out_dir!r} exists and is not a directory")

    def evaluates_at(self, step: int) -> bool:
        """Whether the held-out evaluation runs after learner step `step` (0: before the first).

        Every `eval_every` steps and at the last one; `eval_every=0` or `eval_prompts=0` disables it.
        """
        if not (self.eval_every and self.eval_prompts):
            return False
        return step % self.eval_every == 0 or step == self.steps

    def algorithm_preset(self) -> algorithms.Algorithm:
        return algorithms.get(self.algorithm, **dict(self.algorithm_overrides))

    def sync_schedule(self) -> SyncSchedule:
        return SyncSchedule(self.sync_interval, self.sync_offset)

    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(
            learning_rate=self.learning_rate,
            schedule=self.lr_schedule,
            warmup_steps=self.warmup_steps,
            decay_steps=max(0, self.steps - self.warmup_steps)
            if self.lr_schedule != "constant"
            else 0,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
        )

    def runs(self) -> tuple[TrainConfig, ...]:
        """The single-seed config of each run: itself for one seed; for many, seed s writing to
        out_dir/seed_<s> (each such directory is a complete single run's directory)."""
        if self.num_seeds == 1:
            return (self,)
        return tuple(
            dataclasses.replace(
                self,
                seed=s,
                num_seeds=1,
                runs_per_batch=1,
                out_dir=str(pathlib.Path(self.out_dir) / f"seed_{s}"),
            )  # fmt: skip
            for s in range(self.seed, self.seed + self.num_seeds)
        )

    def memory_options(self):
        """The decoder's `MemoryOptions` (imported here, not at module level: this module stays
        free of jax so that configs load and validate without it)."""
        from rl_jax.models import MemoryOptions

        return MemoryOptions(remat=self.remat, attention=self.attention)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


# Named starting points; experiments override fields of these.
PRESETS: dict[str, dict] = {
    # The embedded default: the warm-started tiny model on the arithmetic task (DESIGN.md, issue 6).
    "embedded": {},
    # The paper's GSM8K setup (arXiv 2509.24203 §5), for an accelerator: Qwen2.5-1.5B-Instruct
    # from a local HF directory, 96 prompts x 8 responses, lr 1e-6.
    "gsm8k-qwen2.5-1.5b": {
        "task": "gsm8k",
        "task_options": {
            "data_dir": "data/gsm8k",
            "tokenizer": "checkpoints/Qwen2.5-1.5B-Instruct",
        },
        "model": "checkpoints/Qwen2.5-1.5B-Instruct",
        "prompts_per_step": 96,
        "group_size": 8,
        "max_response_len": 1024,
        "learning_rate": 1e-6,
        "micro_batches": 8,
        "steps": 400,
        "eval_prompts": 0,
    },
}


def parse_overrides(items: Sequence[str]) -> dict:
    """["a=1", "b.c=x"] -> {"a": 1, "b": {"c": "x"}}; values parsed as JSON, else kept as text."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def build(base: str | None = None, overrides: Mapping | None = None, **fields) -> TrainConfig:
    """A config from a preset name or JSON file, then `overrides`, then keyword fields."""
    merged: dict = {}
    if base:
        if base in PRESETS:
            merged = json.loads(json.dumps(PRESETS[base]))
        elif pathlib.Path(base).is_file():
            merged = json.loads(pathlib.Path(base).read_text())
        else:
            raise ValueError(
                f"config {base!r} is neither a preset {sorted(PRESETS)} nor a JSON file"
            )
    for extra in (overrides or {}), fields:
        for key, value in extra.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(merged) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; allowed: {sorted(names)}")
    return TrainConfig(**merged)


def _checked(name: str, value, hint):
    """`value` if it has type `hint` (ints accepted as floats, floats finite), else ValueError."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):  # `int | None`
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    expected = typing.get_origin(hint) or hint
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise ValueError(
            f"{name} must be of type {getattr(expected, '__name__', expected)}, got {value!r}"
        )
    if expected is float and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def _check_types(config: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(config):
        value = _checked(field.name, getattr(config, field.name), hints[field.name])
        object.__setattr__(config, field.name, value)
    if config.lr_schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {config.lr_schedule!r}")


def _task_options_class(task: str) -> type:
    if task == "arithmetic":
        from rl_jax.tasks.arithmetic import ArithmeticConfig

        return ArithmeticConfig
    from rl_jax.tasks.gsm8k import GSM8KConfig

    return GSM8KConfig


def _check_task_options(task: str, options: Mapping) -> None:
    """Names, types and values of `task_options`, checked against the task's config dataclass."""
    options_class = _task_options_class(task)
    allowed = [field.name for field in dataclasses.fields(options_class)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown task_options key(s) {unknown} for task {task!r}; allowed: {allowed}"
        )
    hints = typing.get_type_hints(options_class)
    checked = {k: _checked(f"task_options.{k}", v, hints[k]) for k, v in options.items()}
    try:
        options_class(**checked)
    except ValueError as error:
        raise ValueError(f"task_options: {error}") from error


def _check_memory(config: TrainConfig) -> None:
    """The issue-12 block: dtypes, recomputation, attention and log-prob chunking."""
    for name in ("compute_dtype", "param_dtype"):
        if getattr(config, name) not in ("float32", "bfloat16"):
            raise ValueError(
                f"{name} must be 'float32' or 'bfloat16', got {getattr(config, name)!r}"
            )
    config.memory_options()  # unknown remat / attention names raise ValueError here
    if config.logprob_chunk < 0:
        raise ValueError(f"logprob_chunk must be >= 0 (0 = one block), got {config.logprob_chunk}")
