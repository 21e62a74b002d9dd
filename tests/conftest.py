"""Test-wide settings: strict rank promotion, a persistent compilation cache, and hypothesis
examples drawn from a fixed seed (set HYPOTHESIS_PROFILE=explore for fresh random ones)."""

import os
import pathlib

import hypothesis
import jax

hypothesis.settings.register_profile("ci", derandomize=True)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "RL_JAX_COMPILATION_CACHE",
        str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax"),
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# The warm-started base policy is trained once per checkout and shared by every test that uses it.
os.environ.setdefault(
    "RL_JAX_CACHE", str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "rl_jax")
)

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
