"""`TrainConfig`: everything one training run depends on, validated before anything compiles.

A run is a frozen dataclass of parts by concern (`rl_jax.config_sections`: task, algorithm,
sampling, optimizer, memory, sync) and the run's own fields (model, batch shape, length, seeds,
evaluation, checkpoints, out_dir). Each part validates itself; `TrainConfig` checks only the
rules that join fields of several parts.

Every field has a dotted path (`optimizer.learning_rate`, `steps`). A config is built in layers,
later layers winning: a preset (`PRESETS`) or JSON file, then overrides, then keyword fields. A
layer may be nested (`{"optimizer": {"learning_rate": 1e-6}}`), dotted (`"optimizer.learning_rate"`)
or use shorthands: a field's last name where only one field has it (`learning_rate`, `steps`),
and the names of the flat layout before the parts existed (`ALIASES`: `task`, `task_options`,
`algorithm`, `algorithm_overrides`, `lr_schedule`, `sync_interval`, `sync_offset`). So every
`key=value` of that layout, and a run directory's flat `config.json`, still mean what they meant.
The mappings `task.options` and `algorithm.overrides` merge key by key across layers.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import pathlib
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from rl_jax import algorithms, groups, numeric_bounds
from rl_jax.config_sections import (
    AlgorithmConfig,
    MemoryConfig,
    OptimizerConfig,
    SamplerConfig,
    TaskConfig,
    check_types,
)
from rl_jax.sync import SyncSchedule

__all__ = [
    "ALIASES", "PRESETS", "AlgorithmConfig", "MemoryConfig", "OptimizerConfig", "SamplerConfig",
    "SyncSchedule", "TaskConfig", "TrainConfig", "build", "defaults", "describe", "field_paths",
    "flatten", "merge", "parse_overrides", "resolve",
]  # fmt: skip

MAX_SEED = 2**32 - 1  # jax.random.key(seed) aliases seeds modulo 2**32


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One RL run (DESIGN.md §1). `python -m rl_jax.train --help` lists every field.

    model: "warm-start" (the embedded default's cached SFT policy), a model preset name
      (`rl_jax.models.config_names()`, random init), or a Hugging Face model directory.
    prompts_per_step, group_size: the batch is prompts_per_step * group_size responses (G >=
      2). The batch shape belongs to no one part: the sampler draws it, the learner groups it,
      memory.micro_batches and the devices split it; the rules joining them are checked here.
    steps: learner updates.
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
    out_dir: where metrics, TensorBoard events, checkpoints and config.json go; rerunning into
      it resumes the run there, with the same fields but steps (which may grow) and the
      eval/checkpoint cadence (`rl_jax.run_dir`).
    """

    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    model: str = "warm-start"
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    sampling: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
    sync: SyncSchedule = dataclasses.field(default_factory=SyncSchedule)
    prompts_per_step: int = 8
    group_size: int = 8
    steps: int = 400
    seed: int = 0
    num_seeds: int = 1
    runs_per_batch: int = 1
    eval_every: int = 20
    eval_prompts: int = 128
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    ref_metrics: bool = True
    out_dir: str = "runs/default"

    def __post_init__(self):
        check_types(self)
        for name in ("prompts_per_step", "steps", "num_seeds", "runs_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        groups.check_group_size(self.group_size)
        if not 0 <= self.seed <= MAX_SEED - (self.num_seeds - 1):
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
        if self.rows % self.memory.micro_batches:
            raise ValueError(
                f"micro_batches={self.memory.micro_batches} must divide the batch of "
                f"prompts_per_step * group_size = {self.rows}"
            )
        for name in ("eval_every", "eval_prompts", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        numeric_bounds.check(self)  # every float finite in float32
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise ValueError(f"out_dir {self.out_dir!r} exists and is not a directory")

    @property
    def rows(self) -> int:
        """Responses per step of one run: prompts_per_step * group_size."""
        return self.prompts_per_step * self.group_size

    def evaluates_at(self, step: int) -> bool:
        """Whether the held-out evaluation runs after learner step `step` (0: before the first).

        Every `eval_every` steps and at the last one; `eval_every=0` or `eval_prompts=0` disables it.
        """
        if not (self.eval_every and self.eval_prompts):
            return False
        return step % self.eval_every == 0 or step == self.steps

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

    def to_json(self) -> str:
        """The nested layout: {"optimizer": {"learning_rate": ...}, ..., "steps": ...}."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


# Named starting points; experiments override fields of these.
PRESETS: dict[str, dict] = {
    # The embedded default: the warm-started tiny model on the arithmetic task (DESIGN.md, issue 6).
    "embedded": {},
    # The paper's GSM8K setup (arXiv 2509.24203 §5), for an accelerator: Qwen2.5-1.5B-Instruct
    # from a local HF directory, 96 prompts x 8 responses, lr 1e-6.
    "gsm8k-qwen2.5-1.5b": {
        "task": {
            "name": "gsm8k",
            "options": {
                "data_dir": "data/gsm8k",
                "tokenizer": "checkpoints/Qwen2.5-1.5B-Instruct",
            },
        },
        "model": "checkpoints/Qwen2.5-1.5B-Instruct",
        "sampling": {"max_response_len": 1024},
        "optimizer": {"learning_rate": 1e-6},
        "memory": {"micro_batches": 8},
        "prompts_per_step": 96,
        "group_size": 8,
        "steps": 400,
        "eval_prompts": 0,
    },
}

# Names of the flat layout (every field at the top level, before the parts existed) that are
# not the last name of their field: still accepted in overrides, JSON files and config.json.
ALIASES = {
    "task": "task.name",
    "task_options": "task.options",
    "algorithm": "algorithm.name",
    "algorithm_overrides": "algorithm.overrides",
    "lr_schedule": "optimizer.schedule",
    "sync_interval": "sync.interval",
    "sync_offset": "sync.offset",
}


def _parts() -> dict[str, type]:
    """{field name: dataclass} of the parts of a TrainConfig."""
    hints = typing.get_type_hints(TrainConfig)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(TrainConfig)
        if dataclasses.is_dataclass(hints[f.name])
    }


@functools.cache
def field_paths() -> dict[str, tuple[Any, Any]]:
    """{dotted path: (type hint, default)} of every field: the run's own and each part's."""
    out = {}
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        part = hints[field.name]
        if not dataclasses.is_dataclass(part):
            out[field.name] = (part, field.default)
            continue
        part_hints = typing.get_type_hints(part)
        for sub in dataclasses.fields(part):
            default = (
                sub.default if sub.default_factory is dataclasses.MISSING else sub.default_factory()
            )
            out[f"{field.name}.{sub.name}"] = (part_hints[sub.name], default)
    return out


def defaults() -> dict[str, Any]:
    """{dotted path: default} of every field."""
    return {path: default for path, (_, default) in field_paths().items()}


def _is_mapping_field(path: str) -> bool:
    return typing.get_origin(field_paths()[path][0]) is Mapping


def resolve(key: str) -> str:
    """The dotted path `key` names: a path, a flat-layout name (`ALIASES`), or a last name that
    only one field has. An unknown or ambiguous key is a ValueError that lists the choices."""
    paths = field_paths()
    if key in paths:
        return key
    if key in ALIASES:
        return ALIASES[key]
    matches = [path for path in paths if path.rpartition(".")[2] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"config field {key!r} is ambiguous: write one of {matches}")
    names = {*paths, *ALIASES, *(path.rpartition(".")[2] for path in paths)}
    raise ValueError(
        f"unknown config field {key!r}{algorithms.did_you_mean(key, sorted(names))}; allowed: "
        f"{sorted(paths)} and their shorthands (python -m rl_jax.train --help)"
    )


def flatten(layer: Mapping, *, strict: bool = True) -> dict[str, Any]:
    """{dotted path: value} of a layer written nested, dotted, flat or with shorthands.

    `strict=False` drops unknown keys instead of raising (a config stored by another version).
    """
    out: dict[str, Any] = {}
    parts = _parts()

    def put(path: str, value) -> None:
        if _is_mapping_field(path) and isinstance(value, Mapping):
            value = {**out.get(path, {}), **value}
        out[path] = value

    for key, value in layer.items():
        head, dot, rest = key.partition(".")
        if dot:  # "optimizer.learning_rate=..." / "task_options.max_terms=..."
            key, value = head, {rest: value}
        if key in parts and isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                sub_head, sub_dot, sub_rest = sub_key.partition(".")
                path = f"{key}.{sub_head}"
                if path not in field_paths():
                    if strict:
                        fields = [f.name for f in dataclasses.fields(parts[key])]
                        hint = algorithms.did_you_mean(sub_head, fields)
                        raise ValueError(f"unknown config field {path!r}{hint}; {key} has {fields}")
                    continue
                put(path, {sub_rest: sub_value} if sub_dot else sub_value)
            continue
        try:
            put(resolve(key), value)
        except ValueError:
            if strict:
                raise
    return out


def merge(*layers: Mapping) -> dict[str, Any]:
    """{dotted path: value} of `layers` applied in order (later wins; the mapping fields
    `task.options` and `algorithm.overrides` merge key by key)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for path, value in flatten(layer).items():
            if _is_mapping_field(path) and isinstance(value, Mapping):
                value = {**out.get(path, {}), **value}
            out[path] = value
    return out


def _from_paths(values: Mapping[str, Any]) -> TrainConfig:
    fields: dict[str, Any] = {}
    parts: dict[str, dict] = {name: {} for name in _parts()}
    for path, value in values.items():
        head, dot, rest = path.partition(".")
        if dot:
            parts[head][rest] = value
        else:
            fields[head] = value
    built = {name: part(**parts[name]) for name, part in _parts().items()}
    return TrainConfig(**built, **fields)


def load_base(base: str | None) -> dict:
    """The layer of a preset name or JSON file (nested or flat); {} for None."""
    if not base:
        return {}
    if base in PRESETS:
        return json.loads(json.dumps(PRESETS[base]))
    if pathlib.Path(base).is_file():
        try:
            layer = json.loads(pathlib.Path(base).read_text())
        except (UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"config file {base} is not readable JSON ({error})") from None
        if not isinstance(layer, dict):
            raise ValueError(
                f"config file {base} must hold a JSON object of fields, got {type(layer).__name__}"
            )
        return layer
    raise ValueError(f"config {base!r} is neither a preset {sorted(PRESETS)} nor a JSON file")


def build(base: str | None = None, overrides: Mapping | None = None, **fields) -> TrainConfig:
    """A config from a preset name or JSON file, then `overrides`, then keyword fields (each a
    layer of any layout: `build("embedded", {"optimizer.learning_rate": 1e-6}, steps=5)`)."""
    return _from_paths(merge(load_base(base), overrides or {}, fields))


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


def _shorthands(path: str) -> list[str]:
    names = [alias for alias, target in ALIASES.items() if target == path]
    last = path.rpartition(".")[2]
    if last != path and [p.rpartition(".")[2] for p in field_paths()].count(last) == 1:
        names.append(last)
    return names


def describe() -> str:
    """The CLI help of every field: its path, default and shorthands, grouped by part."""
    lines = [
        "Fields: key=value, values parsed as JSON. A key is a field's dotted path, its last name",
        "where only one field has it, or a name of the flat layout (`ALIASES`); the mappings",
        "task.options and algorithm.overrides take dotted keys (task_options.max_terms=5).",
    ]
    parts = _parts()
    for group in [None, *parts]:
        doc = inspect.cleandoc((parts[group] if group else TrainConfig).__doc__ or "")
        lines += ["", f"[{group or 'run'}]", *("  " + line for line in doc.splitlines()), ""]
        for path, (_, default) in field_paths().items():
            if path.partition(".")[0] == group or (group is None and "." not in path):
                names = _shorthands(path)
                also = f"  (also: {', '.join(names)})" if names else ""
                lines.append(f"    {path} = {json.dumps(default)}{also}")
    return "\n".join(lines)
