"""The timing half of `benchmarks/accelerator.py`: the paper's GSM8K step at Qwen2.5-1.5B shapes
with random weights on one device (`Paper`), the matmul peak, and how many rows fit the budget.

Phases: `sampler` (lock-step, every row to the cap) and `learner` (every row at full length), as
the step runs without packing or slots; then `sampler_slots` and `learner_packed` on rows of
paper-shaped lengths (prompts 39-59% of the bucket, responses log-normal with mean 0.2 of the
cap, the longest at it: `scale.real_lengths`, seed 0), at the same row counts, each with its
speedup over the phase before. Tokens/s and MFU count real tokens only.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import learner as learner_bench
import numpy as np
import padding
import padding_sampler
import peak
import scale
from flax import nnx

from rl_jax import models, parallel, sampler

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


def paper_settings(args, rows: int, lengths: str = "full", packing: bool = False):
    """`scale.py`'s arguments for `rows` with its recommended memory settings; the micro-batch
    count keeps the recommended rows per micro-batch of the requested row count. `lengths`,
    `packing`: as `scale.py`'s `--lengths` and `--packing`."""
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
        micro_batches=micro, ref_metrics=True, layer_copies="auto", lengths=lengths,
        packing=packing, decode_slots=0, **settings,
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
        """The phase's line; `estimate` None: no ahead-of-time estimate (a program compiled
        at its first call, whose `compile_s` then includes that call)."""
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
            "aot_peak_gib": round(estimate / GiB, 2) if estimate else None,
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

    def sampler_slots(self, rows: int, deadline: float, lockstep_s: float | None) -> dict:
        """Slot decoding (`rows // 4` slots) of `rows` rows of paper-shaped lengths
        (`scale.real_lengths`), each row ending at its drawn length as in
        `padding_sampler`; `speedup` against the lock-step phase's seconds for as many rows
        (`lockstep_s`): lock-step decodes every row until the longest, which is at the cap, so
        its work does not depend on the other rows' lengths."""
        a = self.args
        settings = paper_settings(a, rows, lengths="paper")
        mask, lengths = scale.real_lengths(settings)
        workload = padding.Workload(
            model_dir=None, num_prompts=rows // 8, group_size=8, prompt_bucket=a.prompt_len,
            cap=a.response_len, prompt_lengths=mask.sum(1), response_lengths=lengths,
        )  # fmt: skip
        slots = max(8, rows // 4)
        decode = padding_sampler._decoder(self.graphdef, self.params, workload, slots)
        rng = np.random.default_rng(0)
        tokens = (rng.integers(1, self.config.vocab_size, mask.shape) * mask).astype(np.int32)
        rows_in = (sampler.row_keys(jax.random.key(0), rows)[1], tokens, mask, lengths)
        start = time.perf_counter()
        jax.block_until_ready(decode(*rows_in))
        first_s = time.perf_counter() - start
        out = []
        times = self._timed(lambda: out.append(jax.block_until_ready(decode(*rows_in))), deadline)
        rollout, slot_steps = out[-1]
        kept = int(np.asarray(rollout.response_mask).sum())
        if kept != int(lengths.sum()):
            raise AssertionError(f"{kept} tokens kept, the drawn lengths sum to {lengths.sum()}")
        flops = sum(
            peak.forward_flops(self.config, np.arange(1, p + n))
            for p, n in zip(mask.sum(1), lengths, strict=True)
        )
        result = self._result(rows, settings, first_s, None, times, kept, flops)
        result.update(
            decode_slots=slots, real_fraction=round(float(lengths.mean() / a.response_len), 3),
            row_step_utilization=round(kept / int(slot_steps), 3),
        )  # fmt: skip
        if lockstep_s:
            result.update(lockstep_s=lockstep_s, speedup=round(lockstep_s / times[-1], 2))
        return result

    def learner(
        self, rows: int, deadline: float, packing: bool = False, padded_s: float | None = None
    ) -> dict:
        """One update of `rows` full-length rows, or (`packing`) of rows of paper-shaped lengths
        on packed sequences, with `speedup` over the padded update's `padded_s` seconds for as
        many rows (a padded update costs the same whatever the lengths); its tokens/s and FLOPs
        count the real tokens only."""
        a = self.args
        settings = paper_settings(a, rows, "paper" if packing else "full", packing)
        compiled, compile_s, estimate = self._compiled(scale.learner_program, settings)
        learner = scale.paper_learner(self.graphdef, settings, self.mesh)
        batch = learner_bench.random_batch(self.config, rows, a.prompt_len, a.response_len)
        mask, lengths = scale.real_lengths(settings)
        response_mask = np.arange(a.response_len)[None] < lengths[:, None]
        batch = batch.replace(
            prompt_mask=jnp.asarray(mask),
            response_mask=jnp.asarray(response_mask, jnp.float32),
            untruncated_logp=batch.untruncated_logp * response_mask,
        )
        batch = jax.device_put(batch, parallel.batch_sharding(self.mesh))
        pack = None
        if packing:
            pack = learner.pack(mask, lengths, a.response_len)
            pack = jax.device_put(pack, parallel.replicated(self.mesh))
        state = [learner.init(self.params)]

        def run():  # the reference policy is the initial parameters (not donated)
            state[0], metrics = compiled(state[0], batch, self.params, jax.random.key(0), pack)
            if not np.isfinite(float(metrics["loss"])):
                raise FloatingPointError(f"non-finite loss {float(metrics['loss'])}")

        times = self._timed(run, deadline)
        flops = 3 * sum(
            peak.forward_flops(self.config, np.arange(1, p + n + 1))
            for p, n in zip(mask.sum(1), lengths, strict=True)
        )
        result = self._result(rows, settings, compile_s, estimate, times, lengths.sum(), flops)
        if packing:
            result.update(
                packed_shape=settings.packed_shape,
                real_fraction=round(float(lengths.mean() / a.response_len), 3),
            )  # fmt: skip
        if padded_s:
            result.update(padded_s=padded_s, speedup=round(padded_s / times[-1], 2))
        return result


def measure_peak(device, small: bool) -> dict:
    sizes = (256,) if small else (2048, 4096, 8192)
    gflops = {n: peak.jax_matmul_gflops(n, 5, jnp.bfloat16) for n in sizes}
    name, published = published_peak(device)
    result = {"bf16_tflops": max(gflops.values()) / 1e3, "sizes": list(sizes)}
    if published:
        result.update(published=name, published_tflops=published / 1e12)
        result["of_published"] = round(result["bf16_tflops"] * 1e12 / published, 3)
    return {**result, "ok": True}
