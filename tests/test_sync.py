"""The sync schedule of DESIGN.md §4, pinned against hand-written version sequences."""

import jax.numpy as jnp
import numpy as np
import pytest

from rl_jax.sync import PendingSnapshots, SyncSchedule


def versions(schedule, steps):
    return [schedule.version_for_step(k) for k in range(1, steps + 1)]


def test_on_policy():
    s = SyncSchedule(1, 0)
    assert versions(s, 5) == [0, 1, 2, 3, 4]
    assert [s.staleness(k) for k in range(1, 6)] == [0] * 5


def test_interval_20_cycles_staleness():
    s = SyncSchedule(20, 0)
    assert versions(s, 45) == [0] * 20 + [20] * 20 + [40] * 5
    assert [s.staleness(k) for k in range(1, 41)] == list(range(20)) * 2


def test_offset_10_holds_staleness_10():
    s = SyncSchedule(1, 10)
    assert versions(s, 14) == [0] * 11 + [1, 2, 3]
    assert [s.staleness(k) for k in range(1, 15)] == list(range(11)) + [10, 10, 10]


def test_offline_is_version_zero():
    s = SyncSchedule(10_000, 0)
    assert set(versions(s, 400)) == {0}
    assert not any(s.snapshot_due(k) for k in range(1, 401))


def test_snapshots_due_for_every_version_a_longer_run_uses():
    for interval, offset, total in [(1, 0, 30), (20, 0, 100), (1, 10, 40), (4, 6, 50)]:
        s = SyncSchedule(interval, offset)
        due = {k for k in range(1, total + 1) if s.snapshot_due(k)}
        assert due == set(range(interval, total + 1, interval)), (interval, offset)
        # The run extended after its last step samples from versions up to `total`.
        extended = total + offset + 1
        assert set(versions(s, extended)) - {0} == due, (interval, offset)


def test_pending_snapshots_fifo_within_slots():
    s = SyncSchedule(1, 10)
    params = {"w": jnp.zeros((2,))}
    pending = PendingSnapshots.empty(params, s.num_slots)
    held = 0
    for k in range(1, 40):
        v = s.version_for_step(k)
        if v != held:
            taken, pending = pending.take(v)
            np.testing.assert_array_equal(taken["w"], np.full((2,), v, np.float32))
            held = v
        if s.snapshot_due(k):
            pending = pending.push(k, {"w": jnp.full((2,), k, jnp.float32)})
    with pytest.raises(KeyError, match="never snapshotted"):
        pending.take(3)


@pytest.mark.parametrize("interval,offset", [(0, 0), (1, -1), (1.5, 0)])
def test_bad_schedule_names_field(interval, offset):
    with pytest.raises(ValueError, match="sync_"):
        SyncSchedule(interval, offset)
