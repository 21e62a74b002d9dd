"""The step's peak memory, estimated from the config before anything compiles, and the refusal
of a run that would not fit (instead of the kernel's OOM kill, exit 137 and no message).

Per device, with P parameters (1/fsdp of them on each device), p = bytes per stored parameter,
c = bytes per activation (compute dtype), R = rows per device of one micro-batch, T = prompt +
response positions, H, I, L, V: hidden size, MLP width, layers, vocabulary:

- state: the learner's parameters and AdamW moments (p + 8 bytes per parameter), the sampler's
  and the reference's copies and the sync schedule's snapshot slots (p each), the initial
  parameters the run starts from (p), for each of the `num_seeds` runs;
- update temporaries: the gradient (p) and AdamW's new moments and update (12 bytes) per
  parameter, for the `runs_per_batch` runs computed together;
- KV cache: rows of the generation window x T x 2 L x kv_heads x head_dim x c;
- activations of the backward pass: per layer R T (6 H + 3 I) c and, with XLA attention,
  R x heads x T^2 x 4 scores; all L layers without recomputation, the layer inputs (R T H c)
  plus one layer with `remat="full"`, about two thirds with "save-dots"; and the float32 logits
  of the log-prob pass, 3 R x positions x V x 4 (positions: `logprob_chunk`, else the response).

It is an estimate (XLA may fuse temporaries away or keep a few more), meant to catch runs that
are several times too large, like a 0.5B model in float32 on a 24 GiB CPU host. On the CPU every
device's share lives in host memory and is compared with `MemAvailable`; on an accelerator one
device's share is compared with its free memory (`memory_stats`). `RL_JAX_MEMORY_LIMIT` (bytes,
or with a KiB/MiB/GiB suffix) replaces the available memory, for tests and for leaving room.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

LIMIT_ENV = "RL_JAX_MEMORY_LIMIT"
_BYTES = {"float32": 4, "bfloat16": 2}
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes of each part of the peak (module docstring) and their sum."""

    state: float
    update: float
    kv_cache: float
    activations: float

    @property
    def total(self) -> float:
        return self.state + self.update + self.kv_cache + self.activations


def estimate(config, model, num_params: int, positions: int, response_len: int, window: int,
             devices: int) -> Estimate:  # fmt: skip
    """Peak bytes per device of a step of `config` (a `TrainConfig`) on `model` (a
    `ModelConfig`) with `num_params` parameters, `positions` = prompt + response tokens."""
    memory = config.memory
    p, c = _BYTES[memory.param_dtype], _BYTES[memory.compute_dtype]
    shard = num_params / memory.fsdp
    copies = 1 + 1 + 1 + config.sync.num_slots + 1  # learner, sampler, ref, slots, init
    state = config.num_seeds * shard * (copies * p + 8)
    update = config.runs_per_batch * shard * (p + 12)
    rows = config.rows * config.runs_per_batch / devices
    kv = rows * window * positions * 2 * model.num_layers * model.num_kv_heads * model.head_dim * c
    micro = max(rows / memory.micro_batches, 1)
    layer = micro * positions * (6 * model.hidden_size + 3 * model.intermediate_size) * c
    if memory.attention == "xla":
        layer += micro * model.num_heads * positions**2 * 4
    inputs = model.num_layers * micro * positions * model.hidden_size * c
    kept = {"none": model.num_layers * layer, "full": inputs + layer}
    kept["save-dots"] = inputs + layer + (model.num_layers - 1) * layer * 2 / 3
    logits = 3 * micro * (memory.logprob_chunk or response_len) * model.vocab_size * 4
    return Estimate(state, update, kv, kept[memory.remat] + logits)


def memory_limit(environ=None) -> int | None:
    """`RL_JAX_MEMORY_LIMIT` in bytes, or None when unset."""
    raw = (os.environ if environ is None else environ).get(LIMIT_ENV, "").strip()
    if not raw:
        return None
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]iB|B)?", raw)
    if not found:
        raise ValueError(f"{LIMIT_ENV} must be a byte count like 4GiB or 512MiB, got {raw!r}")
    return int(float(found.group(1)) * _UNITS[found.group(2) or "B"])


def available(environ=None) -> tuple[int | None, str, bool]:
    """(bytes available, where, per_device): the override, an accelerator's free memory, or the
    host's MemAvailable (None where none of them is known)."""
    limit = memory_limit(environ)
    if limit is not None:
        return limit, f"are allowed by {LIMIT_ENV}", False
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return free, f"are free on each {device.device_kind}", True
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "are available on this host", False
    except OSError:
        pass
    try:
        return (
            os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
            "are free on this host",
            False,
        )
    except (ValueError, OSError):
        return None, "", False


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**28 else f"{n / 2**20:.3g} MiB"


# Single changes tried when a run does not fit, in the order they are suggested.
def _alternatives(config, devices: int) -> list[dict]:
    """Single changes, as {dotted config path: value}."""
    memory = config.memory
    out = [{"memory.micro_batches": m} for m in (2, 4, 8, 16, 32)
           if m > memory.micro_batches and config.rows % m == 0]  # fmt: skip
    out += [{"memory.remat": "full"}] if memory.remat != "full" else []
    if memory.param_dtype != "bfloat16" or memory.compute_dtype != "bfloat16":
        out.append({"memory.param_dtype": "bfloat16", "memory.compute_dtype": "bfloat16"})
    out += [{"memory.fsdp": f} for f in (2, 4, 8) if f > memory.fsdp and devices % f == 0]
    out += [{"runs_per_batch": 1}] if config.runs_per_batch > 1 else []
    return out


def _changed(config, change: dict):
    """`config` with `change` ({"memory.fsdp": 2, "runs_per_batch": 1}) applied."""
    memory = {k.split(".", 1)[1]: v for k, v in change.items() if k.startswith("memory.")}
    run = {k: v for k, v in change.items() if "." not in k}
    return dataclasses.replace(config, memory=dataclasses.replace(config.memory, **memory), **run)


def check(config, run, window: int) -> None:
    """Raises `ValueError` (one line: the estimate by part, the memory available and single
    settings that would fit) when the step of `config` on `run` would not fit."""
    import jax

    limit, where, per_device = available()
    if limit is None:
        return
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(run.params))
    positions = run.task.max_prompt_len + run.max_response_len
    devices, local = jax.device_count(), jax.local_device_count()
    scale = 1 if per_device else local  # CPU devices share the host's memory

    def needed(cfg) -> Estimate:
        part = estimate(cfg, run.model_config, num_params, positions, run.max_response_len,
                        window, devices)  # fmt: skip
        return Estimate(*(scale * getattr(part, f.name) for f in dataclasses.fields(part)))

    need = needed(config)
    if need.total <= limit:
        return
    fits = []
    for change in _alternatives(config, devices):
        if needed(_changed(config, change)).total <= limit:
            fits.append(" ".join(f"{k.split('.')[-1]}={v}" for k, v in change.items()))
    advice = (
        f"settings that would fit: {'; '.join(fits)}"
        if fits
        else "no single change of micro_batches, remat, bfloat16 or fsdp fits: use a smaller "
        "model or batch, or a machine with more memory"
    )
    raise ValueError(
        f"the run needs about {_gib(need.total)} {'per device' if per_device else 'in all'} "
        f"(state {_gib(need.state)}, update {_gib(need.update)}, KV cache "
        f"{_gib(need.kv_cache)}, activations {_gib(need.activations)}) but {_gib(limit)} "
        f"{where}; {advice}"
    )
