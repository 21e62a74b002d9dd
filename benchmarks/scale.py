"""Ahead-of-time per-device memory of the learner update and of `generate` at scale (issue 12).

    python benchmarks/scale.py --model qwen2.5-1.5b --rows 768 --prompt-len 256 \\
        --response-len 1024 --devices 8 --fsdp 8 [--micro-batches M] [--dtype bfloat16] \\
        [--param-dtype float32] [--remat none|full|save-dots] [--attention xla|chunked|dot_product]
        [--logprob-chunk C] [--program learner|generate|both] [--decode-slots S]
        [--no-ref-metrics] [--json] [--lengths full|paper] [--packing]

Nothing is allocated: parameters, optimizer state and batch are abstract `ShapeDtypeStruct`s
carrying their shardings over `--devices` virtual CPU devices (a `[data, fsdp]` mesh), and each
program is only lowered and compiled (`jax.jit(f).lower(...).compile().memory_analysis()`). The
learner program is `Learner.traced_update` with the state donated, as `Learner.update` runs it, on the
state placement `Learner.init` produces (`Learner.state_shardings`); the sampler program is the compiled `generate` (prefill
+ decode loop; `--decode-slots S`: S slots over all devices, `rl_jax.slots`). Per-device peak = arguments + outputs - aliased + temporaries. The largest
buffers are the largest array shapes in the optimised HLO (top-level instructions; fusions'
internals are never materialised). Flags left out take the settings the README recommends for
the model's size and device count (`recommended`). XLA:CPU upcasts bfloat16 arithmetic to
float32 and keeps those copies, so bfloat16 figures here overstate a TPU or GPU.

`--lengths` gives the rows' real lengths: `full` (every prompt and response at its bucket: the
padded layout's worst case) or `paper` (the paper step's: prompts of 0.39-0.59 of the bucket,
~100-150 of 256 tokens in a chat template, one per group; responses log-normal with a mean of
0.2 of the cap, the tail clipped at the cap and the longest at it, `padding.paper_lengths`;
seed 0). `--packing` compiles the packed learner (`rl_jax.packing`) for the packed shape those
lengths plan, with the mesh as the training loop passes it; the padded learner's memory does
not depend on the lengths.
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # the virtual device count must be set before jax is imported
    _pre = argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--devices", type=int, default=8)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_pre.parse_known_args()[0].devices}"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import collections  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import padding  # noqa: E402
from flax import nnx  # noqa: E402

from rl_jax import algorithms, parallel, sampler  # noqa: E402
from rl_jax.learner import Learner, TrainBatch  # noqa: E402
from rl_jax.models import Decoder, MemoryOptions, config_names, get_config  # noqa: E402
from rl_jax.models.memory import ATTENTION, REMAT_POLICIES  # noqa: E402

GiB = 2**30
_SHAPE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ((?:\w+)\[[\d,]*\])")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


# The README's settings ("Accelerators") for the paper's GSM8K step and the MATH setup, with the
# micro-batches per machine: (preset, devices) -> micro_batches. Elsewhere: pieces of at most
# 16,384 tokens per device, the TPU v5e-8 setting (12 rows of 1,280 tokens).
RECOMMENDED = {
    "dtype": "bfloat16", "param_dtype": "float32", "remat": "full", "attention": "chunked",
    "logprob_chunk": 128,
}  # fmt: skip
MICRO_BATCHES = {
    ("qwen2.5-1.5b-instruct", 8): 8,  # TPU v5e-8, 16 GiB per chip
    ("qwen2.5-1.5b-instruct", 1): 16,  # one 80 GiB GPU
    ("llama-3.1-8b", 8): 2,  # eight 80 GiB GPUs
}
_TOKENS_PER_PIECE = 16384


def recommended_micro_batches(name: str, rows: int, seq_len: int, devices: int) -> int:
    if (name, devices) in MICRO_BATCHES:
        return MICRO_BATCHES[name, devices]
    pieces = 1
    while rows % (2 * pieces * devices) == 0 and rows // (pieces * devices) * seq_len > (
        _TOKENS_PER_PIECE
    ):
        pieces *= 2
    return pieces


def resolve_model(name: str) -> str:
    """A preset name, or the one preset it is a prefix of (`qwen2.5-1.5b` -> `-instruct`)."""
    if name in config_names():
        return name
    matches = [n for n in config_names() if n.startswith(name)]
    if len(matches) != 1:
        raise SystemExit(f"--model {name!r}: choose one of {config_names()}")
    return matches[0]


def abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def largest_buffers(hlo_text: str, top: int) -> list[tuple[int, str]]:
    """The `top` largest array shapes of top-level (non-fused) HLO instructions."""
    sizes: dict[str, int] = collections.Counter()
    fused = False
    for line in hlo_text.splitlines():
        if line.startswith(("%", "ENTRY")) and "{" in line:
            fused = "fused" in line.split(" ")[0] or "fusion" in line.split(" ")[0]
            continue
        m = _SHAPE.match(line)
        if fused or not m:
            continue
        shape = m.group(2)
        dtype, dims = shape.split("[")
        if dtype not in _BYTES:
            continue
        dims = [int(d) for d in dims.rstrip("]").split(",") if d]
        op = line.split("=", 1)[1].split("(")[0].split()[-1]
        sizes[f"{shape} {op}"] = max(sizes[f"{shape} {op}"], _BYTES[dtype] * int(np.prod(dims)))
    return sorted(((b, k) for k, b in sizes.items()), reverse=True)[:top]


def report(program: str, compiled, info: dict, top: int) -> dict:
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )  # fmt: skip
    return {
        "program": program,
        **info,
        "peak_bytes": int(peak),
        "peak_gib": round(peak / GiB, 2),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "largest": [[b, k] for b, k in largest_buffers(compiled.as_text(), top)],
    }


def real_lengths(args, group_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(prompt mask `[rows, prompt_len]` left padded, response lengths `[rows]`): `--lengths`."""
    rows, prompt, cap = args.rows, args.prompt_len, args.response_len
    if args.lengths == "full":
        return np.ones((rows, prompt), np.int32), np.full((rows,), cap, np.int32)
    rng = np.random.default_rng(0)
    low, high = max(1, round(0.39 * prompt)), max(1, round(0.59 * prompt))
    prompts = np.repeat(rng.integers(low, high + 1, rows // group_size), group_size)
    mask = (np.arange(prompt)[None] >= (prompt - prompts)[:, None]).astype(np.int32)
    return mask, padding.paper_lengths(rng, rows, cap)


def paper_learner(graphdef, args, mesh=None) -> Learner:
    """The learner of the paper's step (grpo, group 8) with the memory settings of `args`; with
    `--packing`, packing over `mesh` (each device packs its own rows)."""
    return Learner(
        graphdef, algorithms.get("grpo"), group_size=8, micro_batches=args.micro_batches,
        ref_metrics=args.ref_metrics, logprob_chunk=args.logprob_chunk,
        memory=MemoryOptions(args.remat, args.attention, args.attention_chunk),
        mesh=mesh if args.packing else None, packing=args.packing,
    )  # fmt: skip


def learner_program(config, mesh, args):
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    params = abstract(params, parallel.param_shardings(params, mesh))
    learner = paper_learner(graphdef, args, mesh)
    state = abstract(jax.eval_shape(learner.init, params), learner.state_shardings(params))
    rows, prompt, response = args.rows, args.prompt_len, args.response_len
    batch_sharding = parallel.batch_sharding(mesh)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    batch = TrainBatch(
        prompt_tokens=spec((rows, prompt), jnp.int32),
        prompt_mask=spec((rows, prompt), jnp.int32),
        response_tokens=spec((rows, response), jnp.int32),
        response_mask=spec((rows, response), jnp.float32),
        untruncated_logp=spec((rows, response), jnp.float32),
        rewards=spec((rows,), jnp.float32),
    )
    update = jax.jit(learner.traced_update, donate_argnums=0)
    ref = params if args.ref_metrics else None
    pack = None
    if args.packing:
        pack = learner.pack(*real_lengths(args), response)
        args.packed_shape = "x".join(map(str, pack.source.shape))
        whole = parallel.replicated(mesh)  # as the training loop places it
        pack = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), pack)
    return update.lower(state, batch, ref, jax.random.key(0), pack).compile()


def generate_program(config, mesh, args):
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    params = abstract(params, parallel.param_shardings(params, mesh))
    sharding = parallel.batch_sharding(mesh)
    prompts = jax.ShapeDtypeStruct((args.rows, args.prompt_len), jnp.int32, sharding=sharding)
    sampling = sampler.SamplingConfig(
        eos_id=1,
        max_new_tokens=args.response_len,
        generation_buckets=(args.response_len,),
        decode_slots=args.decode_slots,
    )
    if args.layer_copies != "auto":
        sampler.LAYER_COPY_MAX_BYTES = float("inf") if args.layer_copies == "on" else -1
    program = jax.jit(
        lambda p, key, tokens, mask: sampler.generate_rows(
            graphdef,
            p,
            jnp.int32(0),
            sampler.row_keys(key, args.rows)[1],
            tokens,
            mask,
            sampling,
            mesh,
        )
    )
    return program.lower(params, jax.random.key(0), prompts, prompts).compile()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--rows", type=int, default=768)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=1024)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--fsdp", type=int, default=None, help="default: all devices")
    parser.add_argument("--micro-batches", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--remat", choices=tuple(REMAT_POLICIES), default=None)
    parser.add_argument("--attention", choices=ATTENTION, default=None)
    parser.add_argument("--attention-chunk", type=int, default=256)
    parser.add_argument("--logprob-chunk", type=int, default=None)
    parser.add_argument("--layer-copies", choices=("auto", "on", "off"), default="auto")
    parser.add_argument(
        "--decode-slots", type=int, default=0, help="the sampler's decode slots (0: lock-step)"
    )
    parser.add_argument("--program", choices=("learner", "generate", "both"), default="both")
    parser.add_argument("--no-ref-metrics", dest="ref_metrics", action="store_false")
    parser.add_argument("--lengths", choices=("full", "paper"), default="full",
                        help="the rows' real lengths (module docstring)")  # fmt: skip
    parser.add_argument("--packing", action="store_true", help="the packed learner")
    parser.add_argument("--top", type=int, default=8, help="largest buffers to list")
    parser.add_argument("--json", action="store_true", help="one JSON object per program")
    args = parser.parse_args(argv)
    name = resolve_model(args.model)
    if jax.device_count() != args.devices:
        raise SystemExit(f"{jax.device_count()} devices, not {args.devices}: run as a script")
    args.fsdp = args.fsdp or args.devices
    for field, value in RECOMMENDED.items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    if args.micro_batches is None:
        seq_len = args.prompt_len + args.response_len
        args.micro_batches = recommended_micro_batches(name, args.rows, seq_len, args.devices)
    config = get_config(name, dtype=args.dtype, param_dtype=args.param_dtype)
    mesh = parallel.make_mesh(args.fsdp)
    info = {
        "model": name, "devices": args.devices, "fsdp": args.fsdp, "rows": args.rows,
        "prompt_len": args.prompt_len, "response_len": args.response_len,
        "dtype": args.dtype, "param_dtype": args.param_dtype,
    }  # fmt: skip
    programs = ("learner", "generate") if args.program == "both" else (args.program,)
    for program in programs:
        start = time.perf_counter()
        if program == "learner":
            extra = {
                "micro_batches": args.micro_batches, "remat": args.remat,
                "attention": args.attention, "logprob_chunk": args.logprob_chunk,
                "ref_metrics": args.ref_metrics, "lengths": args.lengths,
                "packing": args.packing,
            }  # fmt: skip
            compiled = learner_program(config, mesh, args)
            if args.packing:  # [micro-batches, packed rows, width]
                extra["packed_shape"] = args.packed_shape
        else:
            extra = {"layer_copies": args.layer_copies, "decode_slots": args.decode_slots}
            compiled = generate_program(config, mesh, args)
        row = report(program, compiled, {**info, **extra}, args.top)
        row["compile_s"] = round(time.perf_counter() - start, 1)
        if args.json:
            print(json.dumps(row), flush=True)
            continue
        settings = " ".join(f"{k}={v}" for k, v in {**info, **extra}.items())
        print(f"{program}: {row['peak_gib']:.2f} GiB per device  ({settings})")
        for key in ("argument", "output", "alias", "temp"):
            print(f"  {key:9} {row[key + '_bytes'] / GiB:8.2f} GiB")
        for size, what in row["largest"]:
            print(f"  {size / GiB:8.3f} GiB  {what}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
