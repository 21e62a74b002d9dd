"""The jitted step (rl_jax/step.py): no hidden transfers, traced sync, independent keys, many
seeds in one program equal to single runs, lockstep resume, and the import structure."""

import ast
import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_jax import build, parallel, step
from rl_jax import config as config_lib
from rl_jax.host_side import HostSide
from rl_jax.metrics import read_metrics
from rl_jax.sync import SyncSchedule
from rl_jax.train import make_step, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = {"prompts_per_step": 2, "group_size": 4, "eval_every": 0, "learning_rate": 3e-4}


@pytest.mark.parametrize("interval,offset", [(1, 0), (20, 0), (1, 10), (4, 6), (1000, 0)])
def test_pending_snapshots_serve_every_version_the_schedule_asks_for(interval, offset):
    """Traced push/take over 70 steps: the sampler always holds v(k), with the learner's
    parameters of exactly that version, and no snapshot is ever lost for lack of a slot."""
    schedule = SyncSchedule(interval, offset)

    @jax.jit
    def transition(pending, held, held_params, k):
        version = schedule.version_for_step(k)
        snapshot, taken = pending.take(version)
        swap = held != version
        pending = jax.tree.map(lambda a, b: jnp.where(swap, a, b), taken, pending)
        held_params = jnp.where(swap, snapshot["w"], held_params)
        held = jnp.where(swap, version, held)
        pending = pending.push(k, {"w": jnp.full((2,), k, jnp.float32)}, schedule.snapshot_due(k))
        return pending, held, held_params

    pending = step.PendingSnapshots.empty({"w": jnp.zeros((2,))}, schedule.num_slots)
    held, held_params = jnp.int32(0), jnp.zeros((2,))
    for k in range(1, 71):
        pending, held, held_params = transition(pending, held, held_params, k)
        assert int(held) == schedule.version_for_step(k)
        np.testing.assert_array_equal(held_params, np.full((2,), int(held), np.float32))


def test_keys_of_seeds_and_purposes_are_all_distinct():
    """The old scheme used key(seed + 1) for the learner, so seed 1's sampler drew what seed 0's
    learner drew; every (seed, purpose, step) key is now distinct."""
    seen = set()
    for seed in range(4):
        root = jax.random.key(seed)
        for purpose in (step.SAMPLE, step.LEARN, step.EVAL):
            for k in (None, 1, 2, 3):
                data = tuple(np.asarray(jax.random.key_data(step.purpose_key(root, purpose, k))))
                assert data not in seen
                seen.add(data)
    sampler_seed1 = step.purpose_key(jax.random.key(1), step.SAMPLE, 5)
    learner_seed0 = step.purpose_key(jax.random.key(0), step.LEARN, 5)
    assert not np.array_equal(
        jax.random.key_data(sampler_seed1), jax.random.key_data(learner_seed0)
    )


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    config = config_lib.build(
        "embedded",
        **SMALL,
        steps=3,
        num_seeds=2,
        runs_per_batch=2,  # the vmapped path; the fixture two_seeds runs the default
        sync_interval=4,
        out_dir=str(tmp_path_factory.mktemp("h")),
    )
    run = build.build_run(config)
    mesh = parallel.make_mesh(1)
    return HostSide(config, run, make_step(config, run, mesh), mesh)


def _window(host, state, first, length):
    """(window rollouts, state, examples) of steps first .. first + length - 1."""
    n = host.config.prompts_per_step
    examples = [
        [host.run.task.sample_prompts((s, k), n) for k in range(first, first + length)]
        for s in (0, 1)
    ]
    tokens, mask = host._encode(examples)
    first = jax.device_put(np.int32(first))
    with jax.transfer_guard("disallow"):
        window, state, _ = host.step_fn.sample(state, tokens, mask, first)
    return window, state, examples


def test_jitted_sample_and_learn_make_no_implicit_transfers(host):
    config = host.config
    state = host.step_fn.init(host.run.params, [0, 1])
    window, state, examples = _window(host, state, 1, 1)
    rewards = host._rewards(np.asarray(window.response_tokens[:, 0]), [e[0] for e in examples], 4)
    rewards = jax.device_put(rewards[:, None])
    index, k = jax.device_put(np.int32(0)), jax.device_put(np.int32(1))
    with jax.transfer_guard("disallow"):
        state, metrics = host.step_fn.learn(state, window, rewards, index, k)
        jax.block_until_ready(metrics)
    assert metrics["loss"].shape == (2,)
    rows = config.rows
    assert window.response_tokens.shape[:3] == (2, 1, rows)


def test_a_window_generates_the_tokens_of_step_by_step_generation(host):
    """Steps 1..3 in one call equal three calls of one step: the same tokens; the log-probs to
    float rounding (the batched matmuls of the window sum in another order), which is relative:
    1e-5 plus 1e-5 of the value (a log-prob of -1.4 measured 1.07e-5 apart on one host)."""
    state = host.step_fn.init(host.run.params, [0, 1])
    window, state, _ = _window(host, state, 1, 3)
    for j in range(3):
        single, state, _ = _window(host, state, 1 + j, 1)
        np.testing.assert_array_equal(single.response_tokens[:, 0], window.response_tokens[:, j])
        np.testing.assert_array_equal(single.response_mask[:, 0], window.response_mask[:, j])
        for name in ("sampled_logp", "untruncated_logp"):
            np.testing.assert_allclose(
                getattr(single, name)[:, 0], getattr(window, name)[:, j], atol=1e-5, rtol=1e-5,
                err_msg=name,
            )  # fmt: skip
    np.testing.assert_array_equal(window.policy_version, 0)


def test_decode_slots_sample_a_window_as_lockstep_does(host):
    """2 vmapped runs, 3 steps of 8 rows: 4 decode slots refilled from the window's 24 rows give
    each row its lock-step tokens (log-probs to the rounding of other matmul shapes, as above),
    and keep the slots busier than lock-step keeps its 24."""
    sampling = dataclasses.replace(host.step_fn.sampling, decode_slots=4)
    slotted = dataclasses.replace(host.step_fn, sampling=sampling)
    (lockstep, _, used), (window, _, busier) = (
        step_fn.sample(step_fn.init(host.run.params, [0, 1]), *_prompts(host))
        for step_fn in (host.step_fn, slotted)
    )
    for name in ("response_tokens", "response_mask", "truncated"):
        np.testing.assert_array_equal(getattr(window, name), getattr(lockstep, name), name)
    for name in ("sampled_logp", "untruncated_logp"):
        np.testing.assert_allclose(
            getattr(window, name), getattr(lockstep, name), atol=1e-5, rtol=1e-5, err_msg=name
        )
    lengths = np.asarray(lockstep.response_length)
    assert lengths.min() < lengths.max()  # rows end at different steps
    assert np.all(np.asarray(used) < np.asarray(busier)) and np.all(np.asarray(busier) <= 1)


def _prompts(host):
    """(tokens, mask, first step) of steps 1..3 of both runs."""
    n = host.config.prompts_per_step
    examples = [[host.run.task.sample_prompts((s, k), n) for k in (1, 2, 3)] for s in (0, 1)]
    return (*host._encode(examples), 1)


def test_vmapped_runs_compute_what_runs_one_at_a_time_compute(host):
    """runs_per_batch = 2 (one vmapped batch) against 1 (a loop over runs): the same tokens, the
    same updates to float rounding (the batched matmuls sum in another order)."""
    looped = dataclasses.replace(host.step_fn, runs_per_batch=1)
    results = []
    for step_fn in (host.step_fn, looped):
        state = step_fn.init(host.run.params, [0, 1])
        examples = [
            [host.run.task.sample_prompts((s, 1), host.config.prompts_per_step)] for s in (0, 1)
        ]
        tokens, mask = host._encode(examples)
        window, state, _ = step_fn.sample(state, tokens, mask, 1)
        rewards = host._rewards(
            np.asarray(window.response_tokens[:, 0]), [e[0] for e in examples], 4
        )
        state, metrics = step_fn.learn(state, window, jnp.asarray(rewards[:, None]), 0, 1)
        results.append((window, metrics))
    (vmapped, vmapped_metrics), (one_by_one, looped_metrics) = results
    np.testing.assert_array_equal(vmapped.response_tokens, one_by_one.response_tokens)
    np.testing.assert_allclose(vmapped.untruncated_logp, one_by_one.untruncated_logp, atol=1e-5)
    for name, value in looped_metrics.items():
        np.testing.assert_allclose(vmapped_metrics[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_generation_windows_are_cut_from_sync_blocks():
    assert [SyncSchedule(20, 0).window(k, 8) for k in (1, 9, 17, 20, 21)] == [
        (1, 8), (9, 8), (17, 4), (17, 4), (21, 8)
    ]  # fmt: skip
    assert [SyncSchedule(1, 10).window(k, 4) for k in (1, 9, 11, 12)] == [
        (1, 4), (9, 3), (9, 3), (12, 1)
    ]  # fmt: skip
    assert [SyncSchedule(1, 0).window(k, 4) for k in (1, 2)] == [(1, 1), (2, 1)]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    fields = {**SMALL, "steps": 4, "sync_interval": 2, "checkpoint_every": 2}
    many = train(config_lib.build("embedded", **fields, num_seeds=2, out_dir=str(out / "many")))
    one = train(config_lib.build("embedded", **fields, seed=1, out_dir=str(out / "one")))
    return out, many, one


def test_run_i_of_many_equals_a_single_run_of_seed_i(two_seeds):
    out, many, one = two_seeds
    assert [m["step"] for m in read_metrics(out / "many" / "seed_1")] == [1, 2, 3, 4]
    assert (out / "many" / "seed_0" / "checkpoints" / "4").is_dir()
    stored = json.loads((out / "many" / "seed_1" / "config.json").read_text())
    assert (stored["seed"], stored["num_seeds"]) == (1, 1)
    # Runs one at a time (runs_per_batch = 1, the default): run i computes seed i's run. The
    # many-seed program (a loop over runs) and the single run are two programs, which XLA:CPU
    # may vectorise differently (an entropy 4e-7 relative apart on an AVX-512 host), so metrics
    # and parameters agree to 1e-6 relative, not bit for bit (they were equal on AMD hosts).
    untimed = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))}
    for got, want in zip(many.run_metrics[1], one.metrics, strict=True):
        got, want = untimed(got), untimed(want)
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-12), name
    assert many.run_metrics[0] != many.run_metrics[1]  # the seeds are different runs
    for got, want in zip(
        jax.tree.leaves(many.state.learner.params), jax.tree.leaves(one.state.learner.params),
        strict=True,
    ):  # fmt: skip
        np.testing.assert_allclose(got[1], want[0], rtol=1e-6, atol=1e-9)


def test_many_seeds_resume_in_lockstep_from_their_common_checkpoint(two_seeds):
    """A kill between two runs' saves leaves them one checkpoint apart: both resume from the
    older one, and finish as if never interrupted."""
    out, many, _ = two_seeds
    shutil.rmtree(out / "many" / "seed_1" / "checkpoints" / "4")
    fields = {**SMALL, "steps": 4, "sync_interval": 2, "checkpoint_every": 2}
    again = train(config_lib.build("embedded", **fields, num_seeds=2, out_dir=str(out / "many")))
    assert [m["step"] for m in again.run_metrics[0]] == [3, 4]
    untimed = lambda ms: [
        {k: v for k, v in m.items() if not k.startswith(("time", "through"))} for m in ms
    ]
    for i in range(2):
        assert untimed(again.run_metrics[i]) == untimed(many.run_metrics[i][2:])


def test_settings_modules_import_no_jax():
    code = (
        "import sys; import rl_jax.config, rl_jax.algorithms, rl_jax.sync, rl_jax.groups; "
        "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every `rl_jax` import in a file, at any depth (lazy imports count)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rl_jax"):
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("rl_jax")]
    return out


def test_no_import_cycles_and_no_private_cross_module_imports():
    package = ROOT / "rl_jax"
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in package.rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        deps = set()
        for module, names in _imports(path):
            assert not [n for n in names if n.startswith("_")], (name, module, names)
            for n in names:  # `from rl_jax import losses` imports the module rl_jax.losses
                if f"{module}.{n}" in modules:
                    deps.add(f"{module}.{n}")
            if module in modules and not module.endswith("rl_jax"):
                deps.add(module)
        graph[name] = deps - {name}

    def visit(node, stack):
        assert node not in stack, "import cycle: " + " -> ".join([*stack, node])
        for dep in graph.get(node, ()):
            if not dep.startswith(node + "."):  # a package importing its own submodules
                visit(dep, [*stack, node])

    for name in graph:
        visit(name, [])
