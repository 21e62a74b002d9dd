"""XLA memory analysis of one KV-cache decode step, with and without donating the cache.

    python -m benchmarks.model_memory --config qwen2.5-0.5b-instruct --batch 64 --max-len 1024

Nothing is allocated: parameters and cache are abstract (`eval_shape`), the step is only
lowered and compiled for the default backend. With the cache donated, `alias` equals the cache
size (the output cache is the input buffer, updated in place) and `temp` stays near one layer's
keys/values plus one layer's parameters instead of a full cache copy.
"""

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from rl_jax.models import config_names, decode, get_config, init_cache, init_model


def decode_step_memory(config, batch: int, max_len: int, donate: bool) -> dict[str, int]:
    """Byte counts of the compiled decode step (T = 1) for `config` on the default backend."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(config, 0)))
    cache = jax.eval_shape(lambda: init_cache(config, batch, max_len))
    token = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    cache_mask = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)
    step = jax.jit(decode, static_argnums=0, donate_argnums=(4,) if donate else ())
    compiled = step.lower(graphdef, params, token, token, cache, jnp.int32(0), cache_mask).compile()
    analysis = compiled.memory_analysis()
    return {
        "cache": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)),
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "alias": analysis.alias_size_in_bytes,
        "temp": analysis.temp_size_in_bytes,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", choices=config_names())
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    args = parser.parse_args()
    config = get_config(args.config, dtype=args.dtype)
    print(f"{args.config} ({args.dtype} compute) batch {args.batch} max_len {args.max_len} "
          f"on {jax.default_backend()}")  # fmt: skip
    for donate in (True, False):
        sizes = decode_step_memory(config, args.batch, args.max_len, donate)
        row = "  ".join(f"{k} {v / 2**20:9.1f} MiB" for k, v in sizes.items())
        print(f"  donate={donate!s:5}  {row}")


if __name__ == "__main__":
    main()
