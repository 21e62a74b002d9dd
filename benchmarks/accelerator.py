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

Each check prints one line (`--json`: a JSON object with backend, check, ok and numbers;
progress and tracebacks go to stderr); a check that raises is `ok: false` with its error and
the run goes on. Bad input (an absent backend, shapes the device cannot hold, a missing
package) is one `error:` line and exit 2 before anything compiles. Exit 1 if a check failed.
Public, stable JAX APIs only (`jax.devices`, `jit(...).lower(...).compile()`,
`memory_analysis()`, `memory_stats()`, `default_device`, `default_matmul_precision`).
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
    import jax.numpy as jnp
    import jaxlib
    import numpy as np
    import optax
    from flax import nnx

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import accelerator_numerics as numerics
    import learner as learner_bench
    import peak
    import scale

    from rl_jax import models, parallel
    from rl_jax.models.memory import ATTENTION
except ModuleNotFoundError as missing:
    print(
        f"error: the package {missing.name!r} is missing: install it (pip install -e . from the "
        "repository root), or run with PYTHONPATH=<repository root> for rl_jax itself",
        file=sys.stderr,
    )
    sys.exit(2)

GiB = 2**30
# Dense bfloat16 FLOP/s per chip from the vendors' spec sheets (NVIDIA H200 / H100 / A100
# datasheets without sparsity; Google Cloud TPU system architecture pages), matched in order
# against the lower-cased `device_kind`.
PUBLISHED_PEAKS = (
    ("h200", "NVIDIA H200 SXM", 989e12),
    ("h100 pcie", "NVIDIA H100 PCIe", 756e12),
    ("h100 80gb hbm3", "NVIDIA H100 SXM", 989e12),
    ("a100", "NVIDIA A100", 312e12),
    ("tpu v4", "TPU v4", 275e12),
    ("tpu v5 lite", "TPU v5e", 197e12),
    ("tpu v5e", "TPU v5e", 197e12),
    ("tpu v5p", "TPU v5p", 459e12),
    ("tpu v5", "TPU v5p", 459e12),
    ("tpu v6", "TPU v6e", 918e12),
)
# Planning only (rows per phase): the assumed fraction of the measured bfloat16 matmul peak
# that useful FLOPs reach, and a compile time, before either is measured.
PLAN_UTILISATION = {"sampler": 0.1, "learner": 0.3}
PLAN_COMPILE_S = 60.0


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


def published_peak(device) -> tuple[str, float] | tuple[None, None]:
    kind = device.device_kind.lower()
    for pattern, name, flops in PUBLISHED_PEAKS:
        if pattern in kind:
            return name, flops
    return None, None


def memory_limit(device, memory_gib: float | None = None) -> int | None:
    """Bytes the device can hold: `memory_gib` if given, else `memory_stats()["bytes_limit"]`;
    None where neither says (a CPU)."""
    if memory_gib:
        return int(memory_gib * GiB)
    return (device.memory_stats() or {}).get("bytes_limit")


def static_bytes(config, rows: int, seq: int) -> int:
    """A lower bound on one device's memory for the timed programs, from the shapes alone:
    learner: float32 parameters (also the reference), the state's copy, two AdamW moments and
    the gradient; sampler: the parameters, their compute-dtype copy and the bfloat16 KV cache."""
    n = config.num_params
    kv = rows * seq * config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
    return max(20 * n, 6 * n + kv)


def paper_settings(args, rows: int):
    """`scale.py`'s arguments for `rows` with its recommended memory settings; the micro-batch
    count keeps the recommended rows per micro-batch of the requested row count."""
    seq = args.prompt_len + args.response_len
    per_request = scale.recommended_micro_batches(args.model, args.rows, seq, 1)
    micro = max(1, per_request * rows // args.rows)
    while rows % micro:
        micro -= 1
    settings = {
        **scale.RECOMMENDED,
        "attention": args.attention,
        "attention_chunk": args.attention_chunk,
    }
    if args.small:  # blocks smaller than the tiny shapes, so the chunked paths run
        settings["logprob_chunk"] = 8
    return argparse.Namespace(
        rows=rows, prompt_len=args.prompt_len, response_len=args.response_len,
        micro_batches=micro, ref_metrics=True, layer_copies="auto", lengths="full",
        packing=False, decode_slots=0, **settings,
    )  # fmt: skip


def plan_rows(args, phase: str, flops_per_run, peak_flops: float, share_s: float) -> int:
    """The requested rows, halved (whole groups of 8) until compile + 2 runs are estimated to
    fit `share_s` at `PLAN_UTILISATION` of the measured matmul peak."""
    estimate = lambda r: (
        PLAN_COMPILE_S + 2 * flops_per_run(r) / (PLAN_UTILISATION[phase] * peak_flops)
    )
    rows = args.rows
    while rows % 16 == 0 and estimate(rows) > share_s:
        rows //= 2
    return rows


class Paper:
    """The timed workload: random weights of `args.model` on one device, the recommended
    settings, programs compiled by `benchmarks/scale.py`."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.limit = memory_limit(device, args.memory_gib)
        self.config = models.get_config(
            args.model, dtype=scale.RECOMMENDED["dtype"], param_dtype="float32"
        )
        self.mesh = parallel.make_mesh(1, [device])
        with jax.default_device(device):
            self.graphdef, params = nnx.split(models.init_model(self.config, 0))
        self.params = jax.device_put(params, parallel.param_shardings(params, self.mesh))
        self.name, self.peak = published_peak(device)

    def flops(self, rows: int) -> dict:
        a = self.args
        return peak.sequence_flops(self.config, rows, a.prompt_len, a.response_len)

    def _compiled(self, program, settings) -> tuple:
        start = time.perf_counter()
        compiled = program(self.config, self.mesh, settings)
        compile_s = time.perf_counter() - start
        estimate = scale.report("", compiled, {}, top=1)["peak_bytes"]
        if self.limit and estimate > self.limit:
            raise MemoryError(
                f"the compiled program needs {estimate / GiB:.1f} GiB, the device holds "
                f"{self.limit / GiB:.1f} GiB: pass a smaller --rows"
            )
        return compiled, compile_s, estimate

    def _timed(self, run, deadline: float) -> list[float]:
        """Seconds of each call of `run`: two, or one when a second would pass `deadline`."""
        times = []
        while len(times) < 2 and (not times or time.monotonic() + times[-1] < deadline):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return times

    def _result(self, rows, settings, compile_s, estimate, times, tokens, flops) -> dict:
        seconds = times[-1]
        stats = self.device.memory_stats() or {}
        result = {
            "model": self.args.model, "rows": rows, "requested_rows": self.args.rows,
            "prompt_len": self.args.prompt_len, "response_len": self.args.response_len,
            "micro_batches": settings.micro_batches, "dtype": settings.dtype,
            "remat": settings.remat, "attention": settings.attention,
            "logprob_chunk": settings.logprob_chunk, "compile_s": round(compile_s, 1),
            "rows_note": "" if rows == self.args.rows else "fewer rows: the budget",
            "run_s": [round(t, 3) for t in times], "response_tokens_per_s": tokens / seconds,
            "tflops": round(flops / seconds / 1e12, 3),
            "aot_peak_gib": round(estimate / GiB, 2),
            "device_peak_gib": round(stats["peak_bytes_in_use"] / GiB, 2)
            if "peak_bytes_in_use" in stats else None,
        }  # fmt: skip
        if self.peak:
            result.update(mfu=round(flops / seconds / self.peak, 4), peak_of=self.name)
        else:
            result["mfu_note"] = f"no published peak for {self.device.device_kind!r}"
        return {**result, "ok": True}

    def sampler(self, rows: int, deadline: float) -> dict:
        settings = paper_settings(self.args, rows)
        compiled, compile_s, estimate = self._compiled(scale.generate_program, settings)
        rng = np.random.default_rng(0)
        shape = (rows, self.args.prompt_len)
        tokens = rng.integers(1, self.config.vocab_size, shape).astype(np.int32)
        tokens, mask = jax.device_put(
            (tokens, np.ones(shape, np.int32)), parallel.batch_sharding(self.mesh)
        )
        out = []
        run = lambda: out.append(
            jax.block_until_ready(compiled(self.params, jax.random.key(0), tokens, mask))
        )
        times = self._timed(run, deadline)
        rollout, _ = out[-1]  # (Rollout, slot-steps)
        generated = float(np.asarray(rollout.response_mask).sum())
        flops = self.flops(rows)["sample"]
        return self._result(rows, settings, compile_s, estimate, times, generated, flops)

    def learner(self, rows: int, deadline: float) -> dict:
        settings = paper_settings(self.args, rows)
        compiled, compile_s, estimate = self._compiled(scale.learner_program, settings)
        learner = scale.paper_learner(self.graphdef, settings)
        a = self.args
        batch = learner_bench.random_batch(self.config, rows, a.prompt_len, a.response_len)
        batch = jax.device_put(batch, parallel.batch_sharding(self.mesh))
        state = [learner.init(self.params)]

        def run():  # the reference policy is the initial parameters (not donated)
            state[0], metrics = compiled(state[0], batch, self.params, jax.random.key(0), None)
            if not np.isfinite(float(metrics["loss"])):
                raise FloatingPointError(f"non-finite loss {float(metrics['loss'])}")

        times = self._timed(run, deadline)
        tokens = rows * a.response_len
        flops = self.flops(rows)["train"]
        return self._result(rows, settings, compile_s, estimate, times, tokens, flops)


def measure_peak(device, small: bool) -> dict:
    sizes = (256,) if small else (2048, 4096, 8192)
    gflops = {n: peak.jax_matmul_gflops(n, 5, jnp.bfloat16) for n in sizes}
    name, published = published_peak(device)
    result = {"bf16_tflops": max(gflops.values()) / 1e3, "sizes": list(sizes)}
    if published:
        result.update(published=name, published_tflops=published / 1e12)
        result["of_published"] = round(result["bf16_tflops"] * 1e12 / published, 3)
    return {**result, "ok": True}


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
    phases = (
        ("sampler", paper.sampler, lambda r: paper.flops(r)["sample"], 0.4),
        # + the recomputed and the reference forward: 5 forwards' worth of work
        ("learner", paper.learner, lambda r: paper.flops(r)["train"] * 5 / 3, 1.0),
    )
    for phase, measure, flops, share in phases:  # share: of the seconds left
        share_s = share * (end - time.monotonic())
        if end - time.monotonic() < PLAN_COMPILE_S:
            report.emit(f"timing/{phase}", False, error="the budget is spent: raise --budget-s")
            continue
        rows = plan_rows(args, phase, flops, peak_flops, share_s)
        report.progress(f"{phase}: {rows} of {args.rows} rows")
        report.run(f"timing/{phase}", measure, rows, time.monotonic() + share_s)


if __name__ == "__main__":
    sys.exit(main())
