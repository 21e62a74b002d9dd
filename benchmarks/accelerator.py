"""Checks and measures whatever backend JAX finds: one command for a lent GPU or a TPU VM.

    PYTHONPATH=. python3 benchmarks/accelerator.py --json        # one device, ~8 minutes
    python benchmarks/accelerator.py --small --json              # tiny shapes: the CPU test

Numerics (`accelerator_numerics.py`), float32 with matmuls at `highest` precision, a tiny
random model (the `tiny-qwen2` shape; `tiny` with --small), one device:
- `logits`, `sampler/greedy`, `sampler/sampled` (a fixed key), `learner` (loss, metrics and
  every gradient of one `Learner.update`): the device against the same programs on the CPU
  backend. On a CPU backend both sides are the CPU: the checks still run (the CI test) and the
  `environment` line says `reference: "same device"`. `logits/default_precision`: the device's
  default matmul precision (TF32 on recent NVIDIA GPUs, bfloat16 passes on TPUs) against the CPU.
- `attention/chunked`, `attention/dot_product`: hidden states, loss and gradients against
  `attention=xla` on the device; on a GPU also `attention/cudnn`: rl_jax's `dot_product` path in
  bfloat16 (cuDNN's fused attention there) against `attend` in float32, whether its program holds
  the fused kernel, and whether cuDNN's gradients are finite without rl_jax's guard for rows
  with nothing to attend to.
- `bfloat16`: bfloat16 compute (the same float32 parameters) against float32.
- `attention/dot_product_bf16`: one bfloat16 learner update with attention=dot_product against
  attention=xla, loss, metrics and gradients.
Timings (`timing/...`), random weights, the paper's GSM8K step (Qwen2.5-1.5B, rows x (256 +
1024)) with the memory settings `benchmarks/scale.py` recommends (bfloat16 compute, float32
master weights, remat=full, attention=chunked or `--attention`, logprob_chunk=128, its
micro-batches per row):
`matmul_peak` (measured, bfloat16); `sampler` and `learner`: compile seconds, seconds per call,
response tokens/s, MFU = useful FLOPs (`peak.sequence_flops`; the learner's is 3x a forward, so
its recomputed and reference forwards are not counted) / seconds / the device's published
dense bfloat16 peak (`PUBLISHED_PEAKS`; omitted, with a note, for other devices), and the
process's peak device memory so far (`memory_stats()` has no reset: the learner's line covers
both phases) next to the compiled program's own estimate (`scale.report`). Rows: `--rows`
(768), halved until the phase's estimate fits its share of `--budget-s`; each line says how many.
Then the same row counts with the paper's length distribution (`accelerator_timing.py`):
`sampler_slots` (rows // 4 decode slots, each row ending at its drawn length) and
`learner_packed` (`packing=true`), each with `speedup` over its lock-step or padded phase,
`real_fraction` and, for slots, `row_step_utilization`; their tokens/s and MFU count real tokens.

Each check prints one line (`--json`: a JSON object with backend, check, ok and numbers;
progress and tracebacks go to stderr); a check that raises is `ok: false` with its error and
the run goes on. Bad input (an absent backend, shapes the device cannot hold, a missing
package) is one `error:` line and exit 2 before anything compiles. Exit 1 if a check failed.
Public, stable JAX APIs only (`jax.devices`, `jit(...).lower(...).compile()`,
`memory_analysis()`, `memory_stats()`, `default_device`, `default_matmul_precision`); the slot
phase drives rl_jax's generation program as `padding_sampler.py` does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time
import traceback

try:
    import flax
    import jax
    import jaxlib
    import optax

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import accelerator_numerics as numerics
    import learner as learner_bench
    import scale
    from accelerator_timing import PLAN_COMPILE_S, GiB, Paper, measure_peak, memory_limit, plan_rows

    from rl_jax import models
    from rl_jax.models.memory import ATTENTION
except ModuleNotFoundError as missing:
    print(
        f"error: the package {missing.name!r} is missing: install it (pip install -e . from the "
        "repository root), or run with PYTHONPATH=<repository root> for rl_jax itself",
        file=sys.stderr,
    )
    sys.exit(2)


def fail(message: str):
    """Bad input: one `error:` line, exit 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class Report:
    """Prints each check's line and remembers whether all passed."""

    def __init__(self, backend: str, as_json: bool):
        self.backend, self.as_json, self.failed, self.start = backend, as_json, [], time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def progress(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {text}", file=sys.stderr, flush=True)

    def emit(self, check: str, ok: bool, **numbers) -> None:
        record = {"backend": self.backend, "check": check, "ok": bool(ok), **numbers}
        if not ok:
            self.failed.append(check)
        if self.as_json:
            print(json.dumps(record, default=float), flush=True)
        else:
            items = " ".join(f"{k}={v}" for k, v in numbers.items())
            print(f"{check:26s} {'ok' if ok else 'FAIL':4s} {items}", flush=True)

    def run(self, check: str, fn, *args) -> dict | None:
        """Runs `fn(*args)` -> {"ok": bool, numbers...}; an exception is `ok: false`."""
        self.progress(f"{check} ...")
        try:
            result = fn(*args)
        except Exception as error:  # one check's failure must not end the run
            traceback.print_exc(file=sys.stderr)
            self.emit(check, False, error=f"{type(error).__name__}: {error}".splitlines()[0])
            return None
        self.emit(check, result.pop("ok"), **result)
        return result


def static_bytes(config, rows: int, seq: int) -> int:
    """A lower bound on one device's memory for the timed programs, from the shapes alone:
    learner: float32 parameters (also the reference), the state's copy, two AdamW moments and
    the gradient; sampler: the parameters, their compute-dtype copy and the bfloat16 KV cache."""
    n = config.num_params
    kv = rows * seq * config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
    return max(20 * n, 6 * n + kv)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", help="cpu, gpu, tpu (default: JAX's default backend)")
    parser.add_argument("--small", action="store_true", help="tiny shapes: the CPU test")
    parser.add_argument("--json", action="store_true", help="one JSON object per check")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole run's seconds")
    parser.add_argument("--model", default="qwen2.5-1.5b", help="a preset of rl_jax.models")
    parser.add_argument("--rows", type=int, default=768, help="rows of the timed step")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=1024)
    parser.add_argument(
        "--attention",
        choices=ATTENTION,
        default=scale.RECOMMENDED["attention"],
        help="the timed step's attention (default: %(default)s)",
    )
    parser.add_argument("--attention-chunk", type=int, default=256)
    parser.add_argument(
        "--memory-gib", type=float, help="the device's memory (default: what it reports)"
    )
    args = parser.parse_args(argv)
    if args.small:
        args.model, args.rows, args.prompt_len, args.response_len = "tiny", 16, 8, 16
        args.attention_chunk = 8
    try:
        args.model = scale.resolve_model(args.model)
    except SystemExit as error:
        fail(str(error))
    for name in ("rows", "prompt_len", "response_len", "attention_chunk", "budget_s"):
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.rows % 8:
        fail(f"--rows must be whole groups of 8, got {args.rows}")
    return args


def pick_devices(backend: str | None):
    """(the first device of `backend`, the CPU device of the reference); exit 2 if absent."""
    try:
        device = jax.devices(backend)[0]
    except RuntimeError:
        found = sorted({d.platform for d in jax.devices()})
        fail(
            f"--backend {backend}: JAX finds no such device here, only {found}. On a TPU VM "
            "install jax for TPUs first (pip install -e '.[tpu]'), on NVIDIA GPUs "
            "pip install -e '.[cuda]' (or '.[cuda13]'); or leave --backend out"
        )
    try:
        return device, jax.devices("cpu")[0]
    except RuntimeError:
        fail(
            "the CPU reference needs JAX's cpu platform: unset JAX_PLATFORMS or add cpu to it "
            f"(JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r})"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    device, cpu = pick_devices(args.backend)
    paper_config = models.get_config(args.model)
    limit = memory_limit(device, args.memory_gib)
    need = static_bytes(paper_config, args.rows, args.prompt_len + args.response_len)
    if limit and need > limit:
        fail(
            f"{args.model} at {args.rows} rows x ({args.prompt_len} + "
            f"{args.response_len}) needs more than {need / GiB:.1f} GiB on one device "
            f"(parameters, optimizer state, KV cache), the {device.device_kind} holds "
            f"{limit / GiB:.1f} GiB: pass a smaller --rows or --model"
        )
    report = Report(device.platform, args.json)
    same = device.platform == "cpu"
    report.emit(
        "environment", True, device_kind=device.device_kind, devices=jax.device_count(),
        memory_gib=round(limit / GiB, 1) if limit else None, host=platform.node(),
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        python=platform.python_version(), jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        flax=flax.__version__, optax=optax.__version__,
        reference="same device" if same else "cpu", budget_s=args.budget_s,
        note="a CPU backend: the numerics compare the CPU with itself" if same else "",
    )  # fmt: skip
    with jax.default_device(device):
        run_checks(args, report, device, cpu)
    report.emit(
        "summary", not report.failed, failed=report.failed, elapsed_s=round(report.elapsed(), 1)
    )
    return 1 if report.failed else 0


def run_checks(args, report: Report, device, cpu) -> None:
    """The numerics, then the timings within what is left of `--budget-s`."""
    config = models.get_config("tiny") if args.small else learner_bench.MODELS["tiny-qwen2"]
    tiny = numerics.Tiny(config)
    with jax.default_matmul_precision("highest"):
        report.run("logits", numerics.check_logits, tiny, device, cpu)
        report.run("sampler/greedy", numerics.check_sampler, tiny, device, cpu, True)
        report.run("sampler/sampled", numerics.check_sampler, tiny, device, cpu, False)
        report.run("learner", numerics.check_learner, tiny, device, cpu)
        for attention in ("chunked", "dot_product"):
            report.run(f"attention/{attention}", numerics.check_attention, tiny, device, attention)
        if device.platform == "gpu":
            report.run("attention/cudnn", numerics.check_cudnn, device, config)
        report.run("bfloat16", numerics.check_bfloat16, tiny, device)
        report.run("attention/dot_product_bf16", numerics.check_dot_product_bfloat16, tiny, device)
    report.run("logits/default_precision", numerics.check_logits, tiny, device, cpu, True)
    measured = report.run("timing/matmul_peak", measure_peak, device, args.small)
    peak_flops = measured["bf16_tflops"] * 1e12 if measured else 1e12
    made = {}

    def setup():
        start = time.perf_counter()
        made["paper"] = paper = Paper(args, device)
        seconds = time.perf_counter() - start
        return {"model": args.model, "params_b": paper.config.num_params / 1e9, "init_s": seconds,
                "ok": True}  # fmt: skip

    if report.run("timing/setup", setup) is None:
        return
    paper = made["paper"]
    end = report.start + args.budget_s
    # (phase, measure, FLOPs per run of r rows for planning, share of the seconds left); the
    # learner's FLOPs + the recomputed and the reference forward: 5 forwards' worth of work.
    learner_flops = lambda r: paper.flops(r)["train"] * 5 / 3
    phases = (
        ("sampler", paper.sampler, lambda r: paper.flops(r)["sample"], 0.3),
        ("sampler_slots", paper.sampler_slots, None, 0.35),
        ("learner", paper.learner, learner_flops, 0.7),
        (
            "learner_packed",
            lambda r, d, s: paper.learner(r, d, packing=True, padded_s=s),
            None,
            1.0,
        ),
    )
    done = {}
    for phase, measure, flops, share in phases:
        share_s = share * (end - time.monotonic())
        if end - time.monotonic() < PLAN_COMPILE_S:
            report.emit(f"timing/{phase}", False, error="the budget is spent: raise --budget-s")
            continue
        if flops is None:  # the padded phase's rows, for a side-by-side ratio
            before = done.get(phase.split("_")[0])
            if before is None:
                report.emit(f"timing/{phase}", False, error=f"no {phase.split('_')[0]} line")
                continue
            rows, args_ = before["rows"], (before["run_s"][-1],)
        else:
            rows, args_ = plan_rows(args, phase, flops, peak_flops, share_s), ()
        report.progress(f"{phase}: {rows} of {args.rows} rows")
        done[phase] = report.run(
            f"timing/{phase}", measure, rows, time.monotonic() + share_s, *args_
        )


if __name__ == "__main__":
    sys.exit(main())
