"""Tests for rl_jax.checkpoint: exact round trips, retention, schedule and damaged checkpoints."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_jax.checkpoint import (
    CHECKSUMS_KEY,
    Checkpointer,
    CheckpointSaveError,
    CheckpointWarning,
)


def _state(seed):
    """A small training-like state: float32/int32 arrays, typed and raw keys, scalars, None."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((4, 3)).astype(np.float32)
    weights[0, :3] = [np.nan, -0.0, np.inf]  # bit patterns that a float round trip could lose
    return {
        "learner": {
            "params": {
                "w": jnp.asarray(weights),
                "b": jnp.arange(3, dtype=jnp.bfloat16) + seed,
                # Incompressible 16 KiB: its file is the largest, stored raw, so bytes written
                # into it decode without an error (what happened to issue 17's float weights).
                "noise": jnp.asarray(rng.integers(0, 2**32, (64, 64), dtype=np.uint32)),
            },
            "step": jnp.int32(seed),
            "key": jax.random.key(seed),
        },
        "sampler": {
            "params": {"w": jnp.asarray(weights[::-1].copy())},
            "version": np.int32(seed - 1),
            "keys": jax.random.split(jax.random.key(seed + 100), 2),
            "raw_key": jax.random.PRNGKey(seed),
        },
        "pending": [jnp.full((2,), seed, jnp.int32)],
        "stale": None,
        "data_epoch": seed,
    }


def _bits(leaf):
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return (
            "key",
            str(jax.random.key_impl(leaf)),
            np.asarray(jax.random.key_data(leaf)).tobytes(),
        )
    array = np.asarray(leaf)
    return type(leaf).__name__, array.dtype.str, array.shape, array.tobytes()


def _assert_bit_identical(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert _bits(got) == _bits(want)


def _abstract(state):
    """jax.Array leaves -> ShapeDtypeStruct without sharding; other leaves as they are."""
    to_abstract = lambda x: (
        jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x
    )
    return jax.tree.map(to_abstract, state)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Checkpoints of steps 2, 4 and 6 (keep=3), written once per module."""
    directory = tmp_path_factory.mktemp("pristine") / "ckpt"
    with Checkpointer(directory, save_every=2, keep=3) as checkpointer:
        for step in (2, 4, 6):
            checkpointer.save(step, _state(step), {"step": step, "data": {"position": 10 * step}})
    return directory


@pytest.fixture
def saved(pristine, tmp_path):
    """A private copy of the pristine checkpoints that a test may damage."""
    return shutil.copytree(pristine, tmp_path / "ckpt")


def test_round_trip_is_bit_identical_for_concrete_and_abstract_targets(saved):
    with Checkpointer(saved, save_every=2) as checkpointer:
        step, state, meta = checkpointer.restore_latest(_state(0))
        _assert_bit_identical(state, _state(6))
        assert step == 6 and meta == {"step": 6, "data": {"position": 60}}
        assert type(state["data_epoch"]) is int and type(state["sampler"]["version"]) is np.int32
        step, state, _ = checkpointer.restore_latest(_abstract(_state(0)))
        _assert_bit_identical(state, _state(6))


def test_keeps_the_last_k_and_saves_on_schedule(tmp_path):
    with Checkpointer(tmp_path, save_every=3, keep=2) as checkpointer:
        schedule = [step for step in range(1, 11) if checkpointer.should_save(step, 10)]
        assert schedule == [3, 6, 9, 10]
        for step in schedule:
            checkpointer.save(step, {"x": jnp.float32(step)}, {})
        assert checkpointer.steps == [9, 10]
    assert sorted(os.listdir(tmp_path)) == ["10", "9"]
    for kwargs, field in [
        ({"save_every": 0}, "save_every"),
        ({"save_every": 1, "keep": 0}, "keep"),
    ]:
        with pytest.raises(ValueError, match=field):
            Checkpointer(tmp_path, **kwargs)


def _truncate_data_files(step_dir):
    """What a full disk does to the array data (kept in `d/` folders of the ocdbt store)."""
    for path in step_dir.rglob("*"):
        if path.is_file() and path.parent.name == "d":
            os.truncate(path, path.stat().st_size // 2)


def _overwrite_largest_data_file(step_dir, num_bytes=4096):
    """Issue 17's damage: random bytes over the middle of the largest array file, same size."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(files, key=lambda p: p.stat().st_size)
    size = largest.stat().st_size
    num_bytes = min(num_bytes, size)
    with open(largest, "r+b") as file:
        file.seek((size - num_bytes) // 2)
        file.write(np.random.default_rng(17).bytes(num_bytes))
    assert largest.stat().st_size == size


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_overwrite_largest_data_file, "ChecksumError: .* differ from the checksums"),
        (_truncate_data_files, "Error"),
        (lambda step_dir: (step_dir / "meta" / "metadata").unlink(), "FileNotFoundError"),
        (lambda step_dir: (step_dir / "state" / "_METADATA").write_text('{"tree'), "Error"),
        (lambda step_dir: shutil.rmtree(step_dir / "state"), "Error"),
    ],
    ids=["random-bytes", "truncated-array", "missing-meta", "torn-metadata", "missing-state"],
)
# A failed orbax read can leave tensorstore callbacks that hit a closed event loop later.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_latest_is_skipped_and_set_aside(saved, damage, reason):
    damage(saved / "6")
    with Checkpointer(saved, save_every=2) as checkpointer:
        with pytest.warns(CheckpointWarning, match=f"step 6 .*{reason}"):
            step, state, meta = checkpointer.restore_latest(_state(0))
        assert step == 4 and meta["step"] == 4
        _assert_bit_identical(state, _state(4))
        # The resumed run re-saves step 6; the damaged one is renamed, not deleted.
        with pytest.warns(CheckpointWarning, match="set aside .* step 6 as 6.unusable"):
            checkpointer.save(6, _state(60), {"step": 6})
        assert checkpointer.restore_latest(_state(0))[0] == 6
    assert sorted(os.listdir(saved)) == ["2", "4", "6", "6.unusable"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_without_checksums_is_not_trusted(saved):
    meta_file = saved / "6" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta[CHECKSUMS_KEY]
    meta_file.write_text(json.dumps(meta))
    with Checkpointer(saved, save_every=2) as checkpointer:
        with pytest.warns(CheckpointWarning, match="step 6 .*no array checksums were saved"):
            assert checkpointer.restore_latest(_state(0))[0] == 4


def test_failed_save_is_one_line_naming_directory_and_cause(tmp_path, capfd, monkeypatch):
    checkpointer = Checkpointer(tmp_path / "ckpt", save_every=1)

    def full_disk(*args, **kwargs):  # what orbax does on ENOSPC: noise on fd 2, a ValueError
        os.write(2, b"Traceback (most recent call last): RuntimeError: Event loop is closed\n" * 50)
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing "x/0" in OCDBT database: Failed to write 1300595 '
            "bytes to file 21: No space left on device [OS error 28: No space left on device]"
        )

    monkeypatch.setattr(checkpointer._manager, "save", full_disk)
    with pytest.raises(CheckpointSaveError) as error:
        checkpointer.save(1, {"x": jnp.zeros(3)}, {})
    assert str(error.value) == (
        f"could not save the checkpoint of step 1 in {tmp_path / 'ckpt'}: No space left on device"
    )
    assert "Event loop" not in capfd.readouterr().err
    monkeypatch.undo()
    with pytest.raises(ValueError, match="reserved"):
        checkpointer.save(1, {"x": jnp.zeros(3)}, {CHECKSUMS_KEY: {}})
    checkpointer.save(1, {"x": jnp.zeros(3)}, {})  # a working save still succeeds afterwards
    assert checkpointer.steps == [1]
    checkpointer.close()


def test_interrupted_save_is_ignored_with_a_warning(saved):
    # A kill mid-save leaves the step's temporary directory, possibly half written.
    shutil.copytree(saved / "6", saved / "8.orbax-checkpoint-tmp")
    _truncate_data_files(saved / "8.orbax-checkpoint-tmp")
    with Checkpointer(saved, save_every=2) as checkpointer:
        with pytest.warns(CheckpointWarning, match="8.orbax-checkpoint-tmp: a save that was"):
            step, state, _ = checkpointer.restore_latest(_state(0))
        assert step == 6
        checkpointer.save(8, _state(8), {})
        assert checkpointer.steps == [4, 6, 8]
    assert not (saved / "8.orbax-checkpoint-tmp").exists()


def test_refuses_to_overwrite_and_reports_nothing_usable(saved, tmp_path):
    with Checkpointer(saved, save_every=2) as checkpointer:
        with pytest.raises(FileExistsError, match=r"steps \[4, 6\] >= 3"):
            checkpointer.save(3, _state(3), {})
        with pytest.raises(TypeError, match="JSON-serialisable"):
            checkpointer.save(8, _state(8), {"config": object()})
        wrong_target = {**_state(0), "extra": jnp.zeros(2)}
        with pytest.warns(CheckpointWarning) as record:
            assert checkpointer.restore_latest(wrong_target) is None
        messages = [str(warning.message) for warning in record]
        assert [message.split()[5] for message in messages[:3]] == ["6", "4", "2"]
        assert "[2, 4, 6]" in messages[3] and "does not match" in messages[3]
    with Checkpointer(tmp_path / "empty", save_every=2) as checkpointer:
        assert checkpointer.restore_latest(_state(0)) is None


def _check_sharded_restore(directory):
    """Save arrays sharded one way over a 2x2 mesh and restore them sharded another way."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    sharding = lambda *spec: NamedSharding(mesh, PartitionSpec(*spec))
    state = {
        "w": jax.device_put(jnp.arange(32.0).reshape(8, 4), sharding("data", "fsdp")),
        "keys": jax.device_put(jax.random.split(jax.random.key(3), 4), sharding("data")),
    }
    target = {
        "w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding(None, "data")),
        "keys": jax.ShapeDtypeStruct((4,), state["keys"].dtype, sharding=sharding("fsdp")),
    }
    with Checkpointer(directory, save_every=1) as checkpointer:
        checkpointer.save(1, state, {})
        _, restored, _ = checkpointer.restore_latest(target)
    for name in state:
        assert restored[name].sharding == target[name].sharding, name
    _assert_bit_identical(restored, state)


def test_sharded_arrays_restore_with_the_target_sharding(tmp_path):
    if jax.device_count() >= 4:
        _check_sharded_restore(tmp_path / "ckpt")
        return
    # One device here: emulate four CPU devices in a fresh process (the flag precedes jax's start).
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path / "ckpt")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


if __name__ == "__main__":
    _check_sharded_restore(sys.argv[1])
