"""`rl_jax.cache`: one root for every cache, each part still movable on its own."""

import pathlib

import pytest

from rl_jax import cache, warm_start


def test_every_part_lives_under_the_root_unless_moved(monkeypatch, tmp_path):
    monkeypatch.setenv("RL_JAX_CACHE", str(tmp_path))
    for name in ("RL_JAX_COMPILATION_CACHE", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    assert {part: cache.path(part) for part in cache.OVERRIDES} == {
        part: tmp_path / part for part in cache.OVERRIDES
    }
    from rl_jax.tasks import ArithmeticTask

    task, config = ArithmeticTask(), warm_start.WarmStartConfig()
    assert warm_start.cache_dir(task, config).parent == tmp_path / "warm_start"
    monkeypatch.setenv("RL_JAX_COMPILATION_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_CACHE", "")
    assert cache.path("jax") == tmp_path / "elsewhere" and cache.path("hub") is None
    monkeypatch.delenv("RL_JAX_CACHE")
    assert cache.root() == pathlib.Path.home() / ".cache" / "rl_jax"


def test_an_unknown_part_is_named():
    with pytest.raises(ValueError, match="cache part must be one of"):
        cache.path("models")
