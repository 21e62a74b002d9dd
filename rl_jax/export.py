"""Writes a trained run's policy as a Hugging Face model directory (transformers, vLLM, lm-eval).

    python -m rl_jax.export RUN_DIR OUT_DIR [--step N] [--dtype bfloat16]

Restores the learner's parameters of the newest checkpoint (or of `--step`) of the run in RUN_DIR
(`rl_jax.saved_run`; a `num_seeds` directory names one `seed_<s>/` run to export) and writes:

    config.json              Qwen2ForCausalLM (q/k/v biases) or LlamaForCausalLM, with the
                             tokenizer's bos / eos / pad ids
    model.safetensors        the parameters in --dtype (default: the run's param_dtype)
    tokenizer files          a Hugging Face tokenizer directory's files, chat template included,
                             copied (GSM8K's task_options.tokenizer); for the embedded tasks'
                             character tokenizer a tokenizer.json built with `tokenizers` (BOS
                             prepended as rl_jax prompts have it; no chat template: the prompts
                             are raw text such as `3+5+2=`)
    generation_config.json   the run's sampling: temperature, top_k, top_p, max_new_tokens, ids

transformers' `AutoModelForCausalLM.from_pretrained(OUT_DIR)` gives the logits rl_jax computes
(tests/test_export.py: within 1e-4 in float32). OUT_DIR must not exist or be empty; everything is
written into a temporary sibling directory that is renamed to OUT_DIR at the end, so an export
that fails leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys

from flax import nnx

from rl_jax import host_memory, models, run_dir, saved_run

DTYPES = ("float32", "bfloat16", "float16")


def check_out_dir(out: pathlib.Path) -> None:
    """ValueError unless `out` is absent or an empty directory."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory; export into a new one")


def generation_config(saved: saved_run.SavedRun) -> dict:
    """The run's sampling settings in transformers' `GenerationConfig` fields."""
    sampling, tokenizer = saved.step_fn.sampling, saved.run.tokenizer
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,  # 0: off, as here (transformers' default is 50)
        "top_p": sampling.top_p,
        "max_new_tokens": sampling.max_new_tokens,
    }


def write_model_dir(saved: saved_run.SavedRun, path: pathlib.Path, dtype: str) -> None:
    """Writes the directory's files (module docstring) into the existing directory `path`."""
    run = saved.run
    model = nnx.merge(run.graphdef, saved.params(0))
    models.save_hf_checkpoint(path, run.model_config, model, dtype=dtype)
    generation = generation_config(saved)
    config = json.loads((path / "config.json").read_text())
    config.update({k: v for k, v in generation.items() if k.endswith("_token_id")})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    run.tokenizer.save(path)


def one_run(files: saved_run.RunFiles) -> None:
    """ValueError for a `num_seeds` directory, naming the runs in it."""
    if len(files.runs) > 1:
        dirs = ", ".join(str(path) for _, path in files.runs)
        raise ValueError(f"{files.directory} holds {len(files.runs)} runs; export one of {dirs}")


def export(saved: saved_run.SavedRun, out: str | os.PathLike, dtype: str | None = None) -> None:
    """Writes the run's policy at `saved.step` as a HF directory `out` (absent or empty), via a
    temporary sibling renamed at the end."""
    out = pathlib.Path(out).absolute()
    check_out_dir(out)
    one_run(saved.files)
    dtype = dtype or saved.files.config.memory.param_dtype
    created = run_dir.created_root(out.parent)  # removed again if the export fails
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        partial.mkdir()
        write_model_dir(saved, partial, dtype)
        if out.exists():
            out.rmdir()  # empty (checked above)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(created or partial, ignore_errors=True)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rl_jax.export",
        description="Write a trained run's policy as a Hugging Face model directory.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run's --out directory (one seed's)")
    parser.add_argument("out_dir", help="the model directory to write (absent or empty)")
    parser.add_argument("--step", type=int, metavar="N",
                        help="the checkpoint of step N (default: the newest)")  # fmt: skip
    parser.add_argument("--dtype", choices=DTYPES,
                        help="tensor dtype (default: the run's param_dtype)")  # fmt: skip
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out_dir)
    try:
        check_out_dir(out)
        files = saved_run.find(args.run_dir, args.step)
        one_run(files)
        export(saved_run.load(files), out, args.dtype)
    except (ValueError, OSError) as error:  # build.InputError and RunInputError are ValueErrors
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {out} (step {files.step} of {files.directory})")
    return 0


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    sys.exit(main())
