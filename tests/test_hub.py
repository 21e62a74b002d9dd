"""`model=ORG/NAME`: hub ids resolved through the hub client's own cache and offline mode."""

import os
import subprocess
import sys
import textwrap

import pytest

from rl_jax import hub

pytest.importorskip("huggingface_hub")


def test_hub_ids_are_told_from_paths(tmp_path, monkeypatch):
    assert hub.is_hub_id("Qwen/Qwen2.5-0.5B-Instruct")
    assert not hub.is_hub_id("/abs/model") and not hub.is_hub_id("a/b/c")
    assert not hub.is_hub_id("../x") and not hub.is_hub_id("warm-start")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    monkeypatch.chdir(tmp_path)
    assert not hub.is_hub_id("org/name")  # an existing directory is a directory


# Run in a fresh process: the hub client reads HF_HUB_OFFLINE when it is imported.
SCRIPT = textwrap.dedent(
    """
    import pathlib, sys
    from rl_jax import hub
    cache = pathlib.Path(sys.argv[1])
    # The hub cache's own layout of one snapshot: refs/main names it, snapshots/<rev> holds it.
    repo = cache / "hub" / "models--tiny-org--tiny-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    print(hub.resolve("tiny-org/tiny-model"))
    try:
        hub.resolve("tiny-org/not-cached")
    except ValueError as error:
        print(error)
    """
)


def test_offline_mode_uses_the_cache_and_says_how_to_go_without_it(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RL_JAX_CACHE": str(tmp_path)}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    found, error = out.stdout.strip().splitlines()
    assert found == str(
        tmp_path / "hub" / "models--tiny-org--tiny-model" / "snapshots" / ("0" * 40)
    )
    assert "model='tiny-org/not-cached' is not a local directory" in error
    assert "offline mode" in error and "--local-dir DIR" in error and "model=DIR" in error


def test_the_cli_refuses_an_uncached_hub_model_offline_in_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RL_JAX_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    command = [sys.executable, "-m", "rl_jax.train", "embedded", "model=tiny-org/tiny-model",
               "steps=1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: model='tiny-org/tiny-model' is not a local directory")
    assert not out.exists()
