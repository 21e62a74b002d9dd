"""Float settings checked in the dtype that computes with them: float32.

A Python float up to 1.8e308 is finite, but the jitted step computes in float32, where anything
above 3.4e38 is infinite and anything below 1.4e-45 is zero: `temperature=1e39` would sample
uniformly and `learning_rate=1e-50` would not learn, both silently. `check(config)` walks the
float fields of a config (nested dataclasses and the dict fields' values included) and refuses,
naming the field:

- a value that is not finite in float32;
- a learning rate that is 0 in float32.

(The temperature's lower bound is the sampler's rule: `rl_jax.sampling.check_temperature`.)

Fields that only the host computes with (`HOST_FIELDS`) keep Python's range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

HOST_FIELDS = frozenset({"window_cap_gib"})
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check(config) -> None:
    """Raises ValueError naming the first float field of `config` (a dataclass) out of bounds."""
    for name, value in _floats(config, ""):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in HOST_FIELDS:
            continue
        if not abs(value) <= _FLOAT32_MAX:
            raise ValueError(
                f"{name} must be finite in float32 (|x| <= {_FLOAT32_MAX:.4g}), got {value!r}"
            )
        if leaf == "learning_rate" and value > 0 and np.float32(value) == 0:
            raise ValueError(f"{name}={value!r} is 0 in float32; it must be >= 1.4e-45")


def _floats(node, prefix: str):
    """(dotted name, value) of every float under a dataclass or mapping."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        items = ((f.name, getattr(node, f.name)) for f in dataclasses.fields(node))
    elif isinstance(node, Mapping):
        items = node.items()
    else:
        return
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, float):
            yield name, value
        else:
            yield from _floats(value, f"{name}.")
