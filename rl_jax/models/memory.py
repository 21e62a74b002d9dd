"""How a differentiated forward of the decoder trades compute for memory and speed.

`MemoryOptions` (hashable: static under jit) picks the layer recomputation (`REMAT_POLICIES`),
the attention kernel of `rl_jax.models.attention` and whether the layers run as a `lax.scan` or
a Python loop. Every choice computes the same function (`attend_chunked` and
`attend_dot_product` up to rounding; the latter is cuDNN's flash attention on a GPU in bfloat16);
README, "The paper's GSM8K setup on a GPU or TPU", gives the settings per machine.
"""

from __future__ import annotations

import dataclasses

import jax

from rl_jax.models.attention import attend, attend_chunked, attend_dot_product

ATTENTION = ("xla", "chunked", "dot_product")
LOOP_MAX_LAYERS = 4  # MemoryOptions.scan_layers=None: deeper models scan their layers
# Recomputation of each decoder layer in the backward pass (`jax.checkpoint` policies).
REMAT_POLICIES = {
    "none": None,  # keep every layer's intermediates
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    "save-dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


@dataclasses.dataclass(frozen=True)
class MemoryOptions:
    """How a differentiated forward trades compute for memory (hashable: static under jit).

    remat: a `REMAT_POLICIES` name. attention: `xla` (`attend`, exact), `chunked`
    (`attend_chunked` with `attention_chunk` queries per block) or `dot_product`
    (`attend_dot_product`). scan_layers: True runs the layers as one `lax.scan` (one compiled
    layer body whatever the depth); False as a Python loop, which keeps no stacked residuals
    to zero-fill, write and read back for the backward pass: the same numbers bit for bit, and
    1.13x / 1.16x faster updates of the 2-layer embedded and 4-layer reference models on
    XLA:CPU (BENCHMARKS.md, "Where the learner update's time goes"); None: a loop up to
    `LOOP_MAX_LAYERS` layers, a scan above (compile time grows with the loop's depth).
    """

    remat: str = "none"
    attention: str = "xla"
    attention_chunk: int = 256
    scan_layers: bool | None = None

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if not (isinstance(self.attention_chunk, int) and self.attention_chunk >= 1):
            raise ValueError(f"attention_chunk must be an int >= 1, got {self.attention_chunk!r}")
        if self.scan_layers not in (True, False, None):
            raise ValueError(f"scan_layers must be True, False or None, got {self.scan_layers!r}")

    def scans(self, num_layers: int) -> bool:
        """Whether a forward over `num_layers` layers runs them as a `lax.scan`."""
        if self.scan_layers is None:
            return num_layers > LOOP_MAX_LAYERS
        return self.scan_layers

    def attend(self, q, k, v, allowed) -> jax.Array:
        if self.attention == "chunked":
            return attend_chunked(q, k, v, allowed, self.attention_chunk)
        if self.attention == "dot_product":
            return attend_dot_product(q, k, v, allowed)
        return attend(q, k, v, allowed)
