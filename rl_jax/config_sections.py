"""The parts of a `TrainConfig`, one frozen dataclass per concern, each validating itself once.

    task       TaskConfig        which task, and its options (`rl_jax.tasks.TASKS`)
    algorithm  AlgorithmConfig   an `rl_jax.algorithms` preset and overrides of its fields
    sampling   SamplerConfig     how the sampler draws responses, and its generation windows
    optimizer  OptimizerConfig   AdamW and its learning-rate schedule (`build(steps)` -> optax)
    memory     MemoryConfig      micro-batches, parameter sharding, dtypes, recomputation
    sync       SyncSchedule      when the sampler takes the learner's parameters (`rl_jax.sync`)

A rule another module owns is checked by calling that owner: the draw settings by
`rl_jax.sampling`, the recomputation and attention names by `rl_jax.models.MemoryOptions`, the
algorithm's fields by `rl_jax.algorithms`, the task options by the task's own options class.
Those owners import jax or a task's dependencies, so they are imported inside the checks: this
module (and `rl_jax.config`) import without jax.

Adding a field to a part is one line plus its check in the part's `__post_init__`; the CLI, the
help, the run directory's identity and the JSON layout follow from the dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from rl_jax import algorithms, tasks

SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("float32", "bfloat16")


def checked(name: str, value, hint):
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


def check_types(config, prefix: str = "") -> None:
    """Checks (and for ints given as floats, converts) every field of a frozen dataclass."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = checked(prefix + field.name, getattr(config, field.name), hints[field.name])
        object.__setattr__(config, field.name, value)


def _at_least(config, names: tuple[str, ...], low: int) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The task: name, a key of `rl_jax.tasks.TASKS` ("arithmetic", the embedded default, or
    "gsm8k"); options, keyword fields of the task's options class (e.g. {"max_terms": 5} for
    arithmetic, {"data_dir": ..., "tokenizer": ...} for gsm8k)."""

    name: str = "arithmetic"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check_types(self, "task.")
        if self.name not in tasks.TASKS:
            raise ValueError(f"task must be one of {tuple(tasks.TASKS)}, got {self.name!r}")
        options_class = tasks.options_class(self.name)
        allowed = [field.name for field in dataclasses.fields(options_class)]
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown task_options key(s) {unknown} for task {self.name!r}; allowed: {allowed}"
            )
        hints = typing.get_type_hints(options_class)
        options = {k: checked(f"task_options.{k}", v, hints[k]) for k, v in self.options.items()}
        try:
            options_class(**options)
        except ValueError as error:
            raise ValueError(f"task_options: {error}") from error
        object.__setattr__(self, "options", options)

    def make(self) -> tasks.Task:
        """The task itself (reads its data, builds its tokenizer)."""
        return tasks.make(self.name, self.options)


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    """name: a preset of `rl_jax.algorithms.names()`; overrides: fields of its advantage and
    loss settings (e.g. {"eps_high": 0.28})."""

    name: str = "grpo"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check_types(self, "algorithm.")
        # REC-OneSide-NoIS (the figures' spelling) is rec-oneside-nois; else one error line
        # with the closest presets.
        object.__setattr__(self, "name", algorithms.canonical_name(self.name, field="algorithm"))
        object.__setattr__(self, "overrides", dict(self.overrides))
        self.preset()  # bad overrides raise ValueError here

    def preset(self) -> algorithms.Algorithm:
        return algorithms.get(self.name, **self.overrides)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How the sampler draws responses (`rl_jax.sampling.SamplingConfig` gets these).

    temperature: z / T (> 0); the learner scores the same softmax(z / T). top_k: keep the k
      largest logits (0 = off); top_p: nucleus mass (1 = off).
    max_response_len: new-token cap (None: the task's own, e.g. 25 for arithmetic).
    window_cap_gib: KV-cache GiB per device one generate call may use: the sampler generates
      the batches of up to sync_interval steps (same policy version) in one call within it;
      0 (the default) generates step by step. On a 2-core CPU a window is not reliably faster
      (a 20x larger decode batch does only 1.4x the rows per second; BENCHMARKS.md, "Sync
      throughput").
    decode_slots: rows the sampler decodes at a time, summed over devices (which it must
      divide); a row that ends frees its slot for the next row of the step or the window
      (`rl_jax.slots`). 0 (the default): all rows at once until the longest is done
      (lock-step). For the embedded preset 16 slots sample a step 1.6-1.75x faster, but a
      100-step run pays more for their compile than it saves (BENCHMARKS.md, "Slot decoding");
      on GSM8K-shaped lengths (`benchmarks/padding.py`) 16 slots are 3.7-4.2x faster. Changes
      the sampler's speed, not its draws.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_response_len: int | None = None
    window_cap_gib: float = 0.0
    decode_slots: int = 0

    def __post_init__(self):
        check_types(self, "sampling.")
        # The owner of these rules (imports jax).
        from rl_jax.sampling import check_decode_slots, check_draw_settings

        check_draw_settings(self.temperature, self.top_k, self.top_p)
        check_decode_slots(self.decode_slots)
        _at_least(self, ("max_response_len",), 1)
        if not self.window_cap_gib >= 0:
            raise ValueError(
                f"window_cap_gib must be >= 0 (0 = no windows), got {self.window_cap_gib}"
            )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (b1, b2, eps, weight_decay) after global-norm gradient clipping (grad_clip, 0 = off),
    with a learning-rate schedule: linear warmup over warmup_steps to learning_rate, then
    "constant", or a "cosine" / "linear" decay to 0 over the run's remaining steps."""

    learning_rate: float = 2e-5
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        check_types(self, "optimizer.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        _at_least(self, ("warmup_steps",), 0)
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip}")

    def decay_steps(self, steps: int) -> int:
        """Steps of the cosine / linear decay after warmup in a run of `steps` (0: constant)."""
        return 0 if self.schedule == "constant" else max(0, steps - self.warmup_steps)

    def learning_rate_schedule(self, steps: int):
        """The optax schedule of a run of `steps` learner steps."""
        import optax

        peak, warmup, decay_steps = self.learning_rate, self.warmup_steps, self.decay_steps(steps)
        if decay_steps == 0:
            decay = optax.constant_schedule(peak)
        elif self.schedule == "cosine":
            decay = optax.cosine_decay_schedule(peak, decay_steps)
        else:
            decay = optax.linear_schedule(peak, 0.0, decay_steps)
        if warmup == 0:
            return decay
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])

    def build(self, steps: int):
        """The optax transformation of a run of `steps` learner steps: AdamW with the schedule,
        after global-norm clipping (`grad_clip` 0 disables it)."""
        import optax

        adamw = optax.adamw(
            self.learning_rate_schedule(steps), self.b1, self.b2, self.eps,
            weight_decay=self.weight_decay,
        )  # fmt: skip
        if self.grad_clip == 0:
            return adamw
        return optax.chain(optax.clip_by_global_norm(self.grad_clip), adamw)


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """Memory and precision at scale: README, "Accelerators", gives the settings per machine.

    micro_batches: gradient-accumulation pieces per update (must divide the batch).
    fsdp: devices per parameter shard (1 = replicated parameters, pure data parallelism).
    compute_dtype, param_dtype: "float32" | "bfloat16" activations / stored parameters (the
      optimizer moments stay float32).
    remat: "none" | "full" | "save-dots" recomputation of the decoder layers; attention: "xla" |
      "chunked" | "dot_product" (`rl_jax.models.MemoryOptions`; "dot_product" is cuDNN's flash
      attention on a GPU in bfloat16, the fastest there).
    logprob_chunk: response positions per block of the log-prob / entropy / KL pass (0 = one
      block).
    packing: the learner's forward passes on packed sequences (each micro-batch's rows laid end
      to end without their padding, `rl_jax.packing`): the same loss, metrics and gradients,
      for the cost of the real tokens. Off by default: the embedded default's short, varied
      batches compile a new packed shape every few steps (BENCHMARKS.md, "Packed sequences").
    """

    micro_batches: int = 1
    fsdp: int = 1
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"
    logprob_chunk: int = 0
    packing: bool = False

    def __post_init__(self):
        check_types(self, "memory.")
        _at_least(self, ("micro_batches", "fsdp"), 1)
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"{name} must be 'float32' or 'bfloat16', got {getattr(self, name)!r}"
                )
        self.options()  # unknown remat / attention names raise ValueError here
        if self.logprob_chunk < 0:
            raise ValueError(
                f"logprob_chunk must be >= 0 (0 = one block), got {self.logprob_chunk}"
            )

    def options(self):
        """The decoder's `MemoryOptions` (imported here: it needs jax)."""
        from rl_jax.models import MemoryOptions

        return MemoryOptions(remat=self.remat, attention=self.attention)

    @property
    def dtypes(self) -> dict[str, str]:
        """The model config's dtype fields: {"dtype": compute_dtype, "param_dtype": ...}."""
        return {"dtype": self.compute_dtype, "param_dtype": self.param_dtype}
