"""Issue 12 at small scale: fsdp 2 and 4 equal fsdp 1 with the memory options on, the update
compiles once (optimizer state placed like the parameters), the sampler's two layer paths agree,
and benchmarks/scale.py reports per-device peaks."""

import json
import pathlib
import subprocess
import sys
import textwrap

from tests.test_learner import run_script

FSDP = textwrap.dedent(
    """
    import dataclasses, jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from rl_jax import algorithms, learner as learner_lib, models, parallel, sampler
    from rl_jax.learner import Learner
    from tests.test_learner import G, VOCAB, make_batch
    assert jax.device_count() == 4
    config = dataclasses.replace(models.get_config("tiny"), vocab_size=VOCAB)
    graphdef, params = nnx.split(models.init_model(config, 0))
    _, ref = nnx.split(models.init_model(config, 1))
    memory = models.MemoryOptions(remat="full", attention="chunked", attention_chunk=4)
    learner = Learner(graphdef, algorithms.get("grpo"), group_size=G, micro_batches=2,
                      memory=memory, logprob_chunk=3)
    results = {}
    for fsdp in (1, 2, 4):
        mesh = parallel.make_mesh(fsdp)
        put = lambda tree: jax.device_put(tree, parallel.param_shardings(tree, mesh))
        p = put(params)
        state = learner.init(jax.tree.map(jnp.copy, p))
        mu = state.opt_state[1][0].mu
        for a, b, c in zip(*map(jax.tree.leaves, (mu, state.params, p)), strict=True):
            assert a.sharding == b.sharding and a.sharding.is_equivalent_to(c.sharding, c.ndim)
        before = learner_lib._jitted_update._cache_size()
        for step in range(2):
            batch = parallel.shard_batch(jax.device_get(make_batch(step)), mesh)
            state, metrics = learner.update(state, batch, put(ref), jax.random.key(step))
        assert learner_lib._jitted_update._cache_size() == before + 1, fsdp  # one compile
        results[fsdp] = (jax.device_get(state.params), jax.device_get(metrics))
    p1, m1 = results[1]
    for fsdp in (2, 4):
        p, m = results[fsdp]
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p), strict=True):
            np.testing.assert_allclose(a, b, atol=2e-5)
        for k in m1:
            np.testing.assert_allclose(m1[k], m[k], rtol=1e-5, atol=1e-6, err_msg=k)

    # The sampler with per-call layer copies and with per-step slices: the same rollout.
    state = sampler.SamplerState.create(params, jax.random.key(3))
    cfg = sampler.SamplingConfig(eos_id=1, max_new_tokens=6)
    prompts, mask = np.full((4, 5), 7, np.int32), np.ones((4, 5), np.int32)
    rollouts = []
    for limit in (sampler.LAYER_COPY_MAX_BYTES, -1):
        sampler.LAYER_COPY_MAX_BYTES = limit
        jax.clear_caches()
        rollouts.append(jax.device_get(sampler.generate(graphdef, state, prompts, mask, cfg, 2)[0]))
    for a, b in zip(jax.tree.leaves(rollouts[0]), jax.tree.leaves(rollouts[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    print("OK")
    """
)


def test_fsdp_equals_one_device_and_compiles_once():
    out = run_script(FSDP, "--xla_force_host_platform_device_count=4")
    assert out.strip().endswith("OK")


def test_scale_benchmark_reports_per_device_peaks():
    root = pathlib.Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable, "benchmarks/scale.py", "--model", "tiny", "--rows", "16",
        "--prompt-len", "8", "--response-len", "8", "--devices", "2", "--fsdp", "2",
        "--micro-batches", "2", "--dtype", "float32", "--json",
    ]  # fmt: skip
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["program"] for r in rows] == ["learner", "generate"]
    for r in rows:
        assert r["model"] == "tiny" and r["devices"] == 2 and r["fsdp"] == 2
        expected = r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
        assert r["peak_bytes"] == expected > 0
        assert r["largest"] and all(size > 0 for size, _ in r["largest"])


def test_scale_benchmark_compiles_the_packed_learner():
    """`--lengths paper --packing`: the packed learner's program for the planned shape."""
    root = pathlib.Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable, "benchmarks/scale.py", "--model", "tiny", "--rows", "16",
        "--prompt-len", "8", "--response-len", "24", "--devices", "2", "--fsdp", "2",
        "--micro-batches", "2", "--dtype", "float32", "--program", "learner",
        "--lengths", "paper", "--packing", "--json",
    ]  # fmt: skip
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    # 2 micro-batches; each device packs its 4 rows (of 32 positions) into fewer.
    micro, packed, width = map(int, row["packed_shape"].split("x"))
    assert micro == 2 and packed < 8 and width <= 32 and row["peak_bytes"] > 0
