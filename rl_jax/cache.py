"""The one cache root of rl_jax and what lives under it.

    $RL_JAX_CACHE (default ~/.cache/rl_jax)
      warm_start/<hash>/   the embedded default's warm-started policy (`rl_jax.warm_start`)
      jax/                 JAX's persistent compilation cache (the experiments and the CLI)
      tfds/                GSM8K prepared as TFDS array_record files (`task_options.tfds_data_dir`)
      hub/                 Hugging Face models fetched for `model=ORG/NAME` (`rl_jax.hub`)

Each part can be moved on its own: `RL_JAX_COMPILATION_CACHE` (the compilation cache; '' turns
it off), `task_options.tfds_data_dir` (the prepared data), `HF_HUB_CACHE` (hub downloads).
"""

from __future__ import annotations

import os
import pathlib

ROOT_ENV = "RL_JAX_CACHE"
# The environment variable that moves each part on its own (None: only the root moves it).
OVERRIDES = {
    "warm_start": None,
    "jax": "RL_JAX_COMPILATION_CACHE",
    "tfds": None,
    "hub": "HF_HUB_CACHE",
}


def root() -> pathlib.Path:
    """`$RL_JAX_CACHE`, or `~/.cache/rl_jax`."""
    return pathlib.Path(os.environ.get(ROOT_ENV) or pathlib.Path.home() / ".cache" / "rl_jax")


def path(part: str) -> pathlib.Path | None:
    """Where `part` (a key of `OVERRIDES`) lives: its own variable when set, else under `root()`.

    None when the part's variable is set to '' (the compilation cache turned off).
    """
    if part not in OVERRIDES:
        raise ValueError(f"cache part must be one of {list(OVERRIDES)}, got {part!r}")
    variable = OVERRIDES[part]
    if variable is not None and variable in os.environ:
        value = os.environ[variable]
        return pathlib.Path(value).expanduser() if value else None
    return root().expanduser() / part


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> None:
    """Persist compiled programs under `directory` (default `path("jax")`), unless it is '' or a
    cache is already configured (a test's, or the user's own `jax.config`)."""
    import jax

    if directory is None:
        directory = path("jax")
    if not directory or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
