"""CRC-32 checksums of a state's arrays, saved with every checkpoint and checked on restore
(`rl_jax.checkpoint`, "Integrity").

A leaf's checksum covers its dtype, shape and bytes. An array spread over several processes (not
fully addressable on one) is checksummed shard by shard, keyed by the region each shard covers
("0:4,0:8"): each process checksums the shards it owns (`_shard_plan`) and the checksums are
gathered, so every process holds them all. A restore checks the regions it can read: its own
shards with the same sharding, or every region of an array restored whole.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class ChecksumError(ValueError):
    """Restored arrays differ from the checksums saved with them (or none were saved)."""


def _leaf_checksum(leaf) -> str:
    """CRC-32 of a fully addressable leaf's dtype, shape and bytes, as 8 hex digits."""
    if isinstance(leaf, jax.Array):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        leaf = jax.device_get(leaf)  # explicit: the step runs under a transfer guard
    array = np.ascontiguousarray(np.asarray(leaf))
    crc = zlib.crc32(f"{array.dtype.str}{array.shape}".encode())
    return f"{zlib.crc32(array.view(np.uint8).reshape(-1), crc):08x}"


def _region_key(index: tuple, shape: tuple) -> str:
    """The region of a shard as "start:stop" per axis, e.g. "0:4,0:8" ("" for a scalar)."""
    return ",".join(
        f"{s.indices(n)[0]}:{s.indices(n)[1]}"
        for s, n in zip(index[: len(shape)], shape, strict=True)
    )


def _region(key: str) -> tuple[slice, ...]:
    return tuple(slice(*map(int, part.split(":"))) for part in key.split(",") if part)


def _shard_plan(leaf: jax.Array) -> list[tuple[str, int]]:
    """(region, owning process) of each distinct shard of a global array, in the same order on
    every process; a region held by several processes is owned by the lowest of them."""
    owners: dict[str, int] = {}
    for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
        key = _region_key(index, leaf.shape)
        owners[key] = min(owners.get(key, device.process_index), device.process_index)
    return sorted(owners.items(), key=lambda item: [s.start for s in _region(item[0])])


def _spread_checksums(leaves: list[jax.Array]) -> list[dict[str, str]]:
    """{region: checksum} of each array spread over processes (a collective: every process
    checksums the shards it owns, and one all-gather gives all of them to every process)."""
    from jax.experimental import multihost_utils

    plans = [_shard_plan(leaf) for leaf in leaves]
    mine = []
    for leaf, plan in zip(leaves, plans, strict=True):
        local = {
            _region_key(shard.index, leaf.shape): shard.data for shard in leaf.addressable_shards
        }
        for key, owner in plan:
            owned = owner == jax.process_index()
            mine.append(int(_leaf_checksum(local[key]), 16) if owned else 0)
    # uint32: JAX without x64 would truncate int64; one process contributes each, so no overflow
    gathered = multihost_utils.process_allgather(np.asarray(mine, np.uint32))
    crcs = iter(np.asarray(gathered).reshape(-1, len(mine)).sum(axis=0).tolist())
    return [{key: f"{next(crcs):08x}" for key, _ in plan} for plan in plans]


def of(state: PyTree) -> dict[str, str | dict[str, str]]:
    """{leaf path: checksum} of every leaf of `state` (see `_leaf_checksum`); for an array
    spread over several processes, {region: checksum} of its shards (a collective then)."""
    out, spread = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            spread[jax.tree_util.keystr(path)] = leaf
        else:
            out[jax.tree_util.keystr(path)] = _leaf_checksum(leaf)
    if spread:
        out.update(zip(spread, _spread_checksums(list(spread.values())), strict=True))
    return out


def _matches(saved, actual, leaf) -> bool:
    """Whether a restored leaf agrees with its saved checksum, on every region it can check."""
    if isinstance(saved, str) and isinstance(actual, str):
        return saved == actual
    if isinstance(saved, dict) and isinstance(actual, dict):  # same layout: the common regions
        return all(actual[key] == crc for key, crc in saved.items() if key in actual)
    if isinstance(saved, dict) and isinstance(actual, str):  # restored whole: every region
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)  # as saved: the key data, regions on leading axes
        whole = np.asarray(jax.device_get(leaf))
        return all(_leaf_checksum(whole[_region(key)]) == crc for key, crc in saved.items())
    return True  # checksummed whole, restored spread over processes: not checkable here


def verify(state: PyTree, expected: Mapping[str, str | dict | None] | None) -> None:
    if expected is None:
        raise ChecksumError(
            "no array checksums were saved with it (saved by an older rl_jax?), so its arrays "
            "cannot be verified"
        )
    actual = of(state)
    leaves = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
    }
    differ = [
        path
        for path, checksum in expected.items()
        if checksum is not None
        and path in actual
        and not _matches(checksum, actual[path], leaves[path])
    ]
    if differ or set(actual) != set(expected):
        differ = differ or sorted(set(actual) ^ set(expected))
        raise ChecksumError(
            f"{len(differ)} array(s) differ from the checksums saved with them, e.g. {differ[0]}: "
            "the files were damaged after the save"
        )
