"""Sampler sharded over 4 CPU devices gives what one device gives (DESIGN.md §6), in lock-step
and with decode slots (4 slots: one per device, each device's 2 rows one after the other).

The device count is fixed when JAX starts, so the comparison runs in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = """
import dataclasses, json, os
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_compilation_cache_dir", os.environ["CACHE_DIR"])
from rl_jax import models, sampler

config = dataclasses.replace(models.get_config("tiny"), vocab_size=32)
graphdef, params = nnx.split(models.init_model(config, seed=0))
lengths = np.array([5, 3, 1, 4])
mask = (np.arange(5)[None] >= 5 - lengths[:, None]).astype(np.int32)
tokens = (np.random.default_rng(0).integers(3, 32, (4, 5)) * mask).astype(np.int32)
sampling = sampler.SamplingConfig(eos_id=4, temperature=0.9, top_k=8, top_p=0.95, max_new_tokens=12)
state = sampler.SamplerState.create(params, jax.random.key(0), policy_version=2)
single, _ = sampler.generate(graphdef, state, tokens, mask, sampling, group_size=2)

result = {"devices": jax.device_count()}
meshes = {
    "data": Mesh(np.array(jax.devices()), ("data",)),
    "data_fsdp": Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp")),
}
runs = [(name, mesh, 0) for name, mesh in meshes.items()] + [("data_slots", meshes["data"], 4)]
for name, mesh, slots in runs:
    placed = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    sharded, next_state = sampler.generate(
        graphdef, placed, tokens, mask, dataclasses.replace(sampling, decode_slots=slots),
        group_size=2, mesh=mesh,
    )
    result[name] = {
        "shards": len(sharded.response_tokens.addressable_shards),
        "shard_rows": sharded.response_tokens.addressable_shards[0].data.shape[0],
        "tokens_equal": bool(np.array_equal(single.response_tokens, sharded.response_tokens)),
        "masks_equal": bool(np.array_equal(single.response_mask, sharded.response_mask)),
        "max_logp_diff": float(max(
            np.max(np.abs(single.sampled_logp - sharded.sampled_logp)),
            np.max(np.abs(single.untruncated_logp - sharded.untruncated_logp)),
        )),
        "lengths_equal": bool(np.array_equal(single.response_length, sharded.response_length)),
        "truncated_equal": bool(np.array_equal(single.truncated, sharded.truncated)),
        "versions": np.asarray(sharded.policy_version).tolist(),
    }
result["ends"] = int(np.sum(~np.asarray(single.truncated)))
print("RESULT", json.dumps(result))
"""


def test_sharded_over_four_devices_equals_one_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["CACHE_DIR"] = env.get("RL_JAX_COMPILATION_CACHE", str(ROOT / ".cache" / "jax"))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["devices"] == 4
    assert result["ends"] > 0  # some rows stop at EOS, so masking is compared too
    for name in ("data", "data_fsdp", "data_slots"):
        got = result[name]
        assert (got["shards"], got["shard_rows"]) == (4, 2), name
        assert got["tokens_equal"] and got["masks_equal"], name
        assert got["lengths_equal"] and got["truncated_equal"], name
        assert got["max_logp_diff"] < 1e-5, (name, got["max_logp_diff"])
        assert got["versions"] == [2] * 8, name
